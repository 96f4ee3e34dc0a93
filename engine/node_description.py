"""A node's description of itself, checked: no database here (a node's agent builds one,
engine/nodes.py keeps it).

    description = describe(hostname, gpu_slots=2, cpu_slots=1, gpus=list_gpus(), facts=...)
    description = validated(json_from_a_node)       # InvalidNode (422) when it is not one

Every field a node sends is hostile: the size and type of each is bounded, a name is a
host-name-like word, text is printable, numbers are finite and not negative.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import EpreuveError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_SLOTS = 1024
MAX_GPUS = 64
MAX_TEXT = 200  # a GPU's uuid, model, driver
MAX_FACTS_BYTES = 16 << 10
SAMPLE_FIELDS = ("utilisation_percent", "memory_used_mib", "power_watts",
                 "energy_millijoules")


class InvalidNode(EpreuveError):
    """A node's description or GPU reading that does not validate: refused, nothing kept."""


@dataclass(frozen=True)
class NodeDescription:
    name: str
    gpu_slots: int = 0
    cpu_slots: int = 1
    gpus: tuple[dict[str, Any], ...] = ()  # {uuid, model, driver, memory_bytes}
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gpu_slots": self.gpu_slots, "cpu_slots": self.cpu_slots,
                "gpus": [dict(g) for g in self.gpus], "facts": dict(self.facts)}


def describe(name: str, *, gpu_slots: int, cpu_slots: int, gpus: list[Any],
             facts: Mapping[str, Any]) -> NodeDescription:
    """A node's description from what it knows (gpu.inventory's GPUs, node_facts), made
    valid on the node's side: a host name with other characters is rewritten."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip(".-_")[:63] or "node"
    return validated({"name": safe, "gpu_slots": gpu_slots, "cpu_slots": cpu_slots,
                      "gpus": [{"uuid": g.uuid, "model": g.name, "driver": g.driver_version,
                                "memory_bytes": g.memory_bytes} for g in gpus],
                      "facts": json.loads(json.dumps(dict(facts), default=str))})


def validated(data: Any) -> NodeDescription:
    """A description as a node sent it, checked field by field; InvalidNode otherwise."""
    if not isinstance(data, Mapping):
        raise InvalidNode("a node's description is an object")
    unknown = set(data) - {"name", "gpu_slots", "cpu_slots", "gpus", "facts"}
    if unknown:
        raise InvalidNode(f"unknown field(s) in the node's description: "
                          f"{', '.join(sorted(map(str, unknown)))[:200]}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidNode("a node's name is 1 to 63 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit; got {str(name)[:80]!r}")
    gpus = data.get("gpus", [])
    if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
        raise InvalidNode(f"a node's gpus are a list of at most {MAX_GPUS}")
    facts = data.get("facts", {})
    if not isinstance(facts, Mapping) or len(json.dumps(facts)) > MAX_FACTS_BYTES:
        raise InvalidNode(f"a node's facts are an object of at most {MAX_FACTS_BYTES} bytes")
    return NodeDescription(name=name, gpu_slots=_count(data.get("gpu_slots", 0), "gpu_slots"),
                           cpu_slots=_count(data.get("cpu_slots", 1), "cpu_slots"),
                           gpus=tuple(_gpu(g) for g in gpus), facts=dict(facts))


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SLOTS:
        raise InvalidNode(f"{what} is a whole number from 0 to {MAX_SLOTS}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT \
            or not value.isprintable():
        raise InvalidNode(f"a GPU's {what} is printable text of 1 to {MAX_TEXT} characters")
    return value


def _gpu(data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidNode("a GPU is an object {uuid, model, driver, memory_bytes}")
    memory = data.get("memory_bytes")
    if isinstance(memory, bool) or not isinstance(memory, int) or not 0 <= memory < 1 << 50:
        raise InvalidNode("a GPU's memory_bytes is a whole number of bytes")
    return {"uuid": _text(data.get("uuid"), "uuid"), "model": _text(data.get("model"), "model"),
            "driver": _text(data.get("driver"), "driver"), "memory_bytes": memory}


def validated_samples(declared: list[dict[str, Any]], data: Any) -> dict[str, dict[str, Any]]:
    """The latest reading of each of a node's GPUs, {uuid: {index, utilisation_percent,
    memory_used_mib, power_watts, energy_millijoules}}: only GPUs the node declared."""
    if not isinstance(data, Mapping) or len(data) > MAX_GPUS:
        raise InvalidNode(f"GPU samples are an object of at most {MAX_GPUS} GPUs")
    known = {gpu["uuid"] for gpu in declared}
    samples = {}
    for uuid, reading in data.items():
        if uuid not in known:
            raise InvalidNode(f"GPU {str(uuid)[:80]!r} is not one the node declared")
        if not isinstance(reading, Mapping) or set(reading) - {"index", *SAMPLE_FIELDS}:
            raise InvalidNode("a GPU sample is an object of index and "
                              f"{', '.join(SAMPLE_FIELDS)}")
        index = reading.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_GPUS:
            raise InvalidNode("a GPU sample's index is a whole number")
        sample: dict[str, Any] = {"index": index}
        for name in SAMPLE_FIELDS:
            value = reading.get(name)
            if value is None and name == "energy_millijoules":
                sample[name] = None  # GPUs before Volta have no energy counter
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise InvalidNode(f"a GPU sample's {name} is a finite number >= 0")
            sample[name] = value
        samples[uuid] = sample
    return samples
