"""The node's tags, guarded around a `docker load`: an archive the platform loads names no
tag, so a tag that a load moved is put back where it was (or removed if it was new).

A tag such as `epreuve/base:3.11` or an evaluator's names what organisers trust; a load
that repointed it would make the next build or evaluation run someone else's image.
"""

from __future__ import annotations

import contextlib
import re

import docker.errors

# What the daemon answers for each tag a load set (`Loaded image ID: sha256:...` sets none)
LOADED_TAG = re.compile(r"^Loaded image: (\S+)\s*$", re.MULTILINE)
MAX_TAGS = 64


def tag_targets(api, tags: list[str]) -> dict[str, str | None]:
    """Each tag's image id on this node (None: no such tag)."""
    targets = {}
    for tag in tags[:MAX_TAGS]:
        try:
            targets[tag] = api.inspect_image(tag)["Id"]
        except (docker.errors.ImageNotFound, docker.errors.APIError):
            targets[tag] = None
    return targets


def all_tags(api) -> dict[str, str]:
    """Every tag of the node and the image id it names."""
    return {tag: image["Id"] for image in api.images()
            for tag in image.get("RepoTags") or [] if tag != "<none>:<none>"}


def put_back(api, tag: str, target: str | None) -> None:
    """Point `tag` at `target` again, or remove it where it did not exist."""
    with contextlib.suppress(docker.errors.APIError):
        if target is None:
            api.remove_image(tag, noprune=True)
        else:
            repository, _, name = tag.rpartition(":")
            api.tag(target, repository, name, force=True)


def tags_loaded(messages: list) -> list[str]:
    """The tags a load reports it set, from the daemon's answer."""
    tags = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("stream"), str):
            tags += LOADED_TAG.findall(message["stream"])
    return tags
