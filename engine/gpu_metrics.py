"""GPU readings kept for /metrics under the names of NVIDIA's dcgm-exporter.

No database here: a node's agent (engine/worker/agent.py) feeds it from its telemetry
sampler (`gpu_sample_recorder`, the sampler's `on_sample`), and engine/metrics.py's
registry reads it at scrape time (`GPUCollector`). engine.metrics re-exports every name.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from gpu.telemetry import GPUReading
from runners.base import MiB

log = logging.getLogger(__name__)

GPU_TABLE_SIZE = 1024  # GPUs remembered at most: a runaway feeder cannot grow the table
GPU_STALE_SECONDS = 60.0  # a GPU not heard from for this long is no longer reported
MAX_LABEL_LENGTH = 200


# -- GPUs, as dcgm-exporter reports them -----------------------------------------------------

@dataclass(frozen=True)
class GPUSample:
    node: str
    index: int
    uuid: str
    utilisation_percent: float
    memory_used_mib: float
    power_watts: float
    energy_millijoules: float | None
    at: float  # time.monotonic() when recorded


class GPUSamples:
    """The latest sample of each (node, GPU): at most `capacity`, none older than
    `stale_after` seconds (a node that stopped reporting stops being reported)."""

    def __init__(self, capacity: int = GPU_TABLE_SIZE, stale_after: float = GPU_STALE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.stale_after = stale_after
        self.clock = clock
        self._samples: OrderedDict[tuple[str, str], GPUSample] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, node: str, index: int, uuid: str, util: float, mem_used_mib: float,
               power_w: float, energy_mj: float | None) -> None:
        _check_label("node", node)
        _check_label("uuid", uuid)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"GPU index must be a whole number >= 0, got {index!r}")
        for name, value in (("util", util), ("mem_used_mib", mem_used_mib),
                            ("power_w", power_w), ("energy_mj", energy_mj)):
            if value is None and name == "energy_mj":
                continue  # GPUs before Volta have no energy counter
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"GPU {name} must be a finite number >= 0, got {value!r}")
        sample = GPUSample(node, index, uuid, util, mem_used_mib, power_w, energy_mj,
                           self.clock())
        with self._lock:
            self._samples[node, uuid] = sample
            self._samples.move_to_end((node, uuid))
            while len(self._samples) > self.capacity:
                self._samples.popitem(last=False)  # the one heard from longest ago

    def fresh(self) -> list[GPUSample]:
        cutoff = self.clock() - self.stale_after
        with self._lock:
            for key in [key for key, s in self._samples.items() if s.at < cutoff]:
                del self._samples[key]
            return sorted(self._samples.values(), key=lambda s: (s.node, s.index, s.uuid))

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()


def _check_label(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL_LENGTH \
            or not value.isprintable():
        raise ValueError(f"GPU {name} must be printable text of 1 to {MAX_LABEL_LENGTH} "
                         f"characters, got {value!r:.80}")


GPU_SAMPLES = GPUSamples()


def record_gpu_sample(node: str, index: int, uuid: str, util: float, mem_used_mib: float,
                      power_w: float, energy_mj: float | None) -> None:
    """One reading of one GPU (gpu/telemetry.py's sampler feeds it); ValueError if it is
    no reading."""
    GPU_SAMPLES.record(node, index, uuid, util, mem_used_mib, power_w, energy_mj)


# The names and units of NVIDIA's dcgm-exporter. Its energy is a counter, but this client
# would print the TYPE line as ..._total: a gauge keeps the name dashboards query (rate()
# reads a gauge alike).
DCGM_FIELDS = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "utilisation_percent"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "memory_used_mib"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_watts"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy consumption since boot (in mJ).",
     "energy_millijoules"),
)


class GPUCollector:
    def __init__(self, samples: GPUSamples):
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        fresh = self.samples.fresh()
        for name, documentation, attribute in DCGM_FIELDS:
            family = GaugeMetricFamily(name, documentation, labels=["gpu", "UUID", "Hostname"])
            for sample in fresh:
                value = getattr(sample, attribute)
                if value is not None:
                    family.add_metric([str(sample.index), sample.uuid, sample.node], value)
            yield family


def gpu_sample_recorder(node: str, samples: GPUSamples | None = None,
                        ) -> Callable[[GPUReading], None]:
    """The `on_sample` of a gpu.telemetry.TelemetrySampler: each reading into the GPU table
    (bytes to MiB, as DCGM reports framebuffer use); a reading that is no reading is logged
    and dropped."""
    table = samples or GPU_SAMPLES

    def record(reading: GPUReading) -> None:
        try:
            table.record(node, reading.index, reading.uuid, reading.utilisation_percent,
                         reading.memory_used_bytes / MiB, reading.power_watts,
                         reading.energy_millijoules)
        except ValueError as exc:
            log.warning("GPU reading dropped: %s", exc)

    return record
