"""/api/v1/nodes: the machines that run jobs (engine/nodes.py), for organisers and admins.

Each node with its slots, its GPUs (model, driver, memory, and each one's latest reading:
utilisation, memory used, power, energy), its last heartbeat and state (active | lost),
and the jobs it runs now: an organiser's challenges' jobs listed, the others counted. A
node is shared by every challenge: participants and reviewers are refused (403), worker
tokens too.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from engine.api.auth import Principal, require_role
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES
from engine.nodes import node_views
from engine.tokens import Role

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"])


class NodeGpu(BaseModel):
    uuid: str
    model: str
    driver: str
    memory_bytes: int
    sample: dict[str, Any] | None  # the latest reading; None before the first


class NodeJob(BaseModel):
    job: int
    submission: int
    status: str


class NodeOut(BaseModel):
    id: int
    name: str
    state: str
    slots: dict[str, int]
    gpus: list[NodeGpu]
    first_seen: str
    last_heartbeat: str
    seconds_since_heartbeat: float
    jobs: list[NodeJob]
    other_jobs: int  # running for challenges the caller does not organise: counted only


class NodesOut(BaseModel):
    items: list[NodeOut]


@router.get("", response_model=NodesOut, responses=AUTH_RESPONSES)
def list_nodes(session: DbSession, principal: Principal = Depends(
        require_role(Role.ADMIN, Role.ORGANISER))) -> dict:
    scope = None if principal.role == Role.ADMIN else principal.challenge_ids
    return {"items": node_views(session, challenge_ids=scope)}
