"""/api/v1/nodes: the machines that run jobs (engine/nodes.py), for organisers and admins.

Each node with its slots, its GPUs (model, driver, memory, and each one's latest reading:
utilisation, memory used, power, energy), its last heartbeat and state (active | lost),
and the jobs it runs now: an organiser's challenges' jobs listed, the others counted. A
node is shared by every challenge: participants and reviewers are refused (403), worker
tokens too.

POST /api/v1/nodes/{id}/retire (admins): a machine gone for good leaves the list and the
"node lost" alert; refused (409) while jobs run there. It is active again if it is ever
heard from.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from engine.api.auth import Principal, require_role
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES, NOT_FOUND, ErrorBody
from engine.api.pagination import RowId
from engine.db.models import utcnow
from engine.nodes import node_views, retire, view
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
        require_role(Role.ADMIN, Role.ORGANISER)),
        retired: bool = Query(False, description="Retired nodes too")) -> dict:
    scope = None if principal.role == Role.ADMIN else principal.challenge_ids
    return {"items": node_views(session, challenge_ids=scope, include_retired=retired)}


@router.post("/{node_id}/retire", response_model=NodeOut,
             responses={**AUTH_RESPONSES, **NOT_FOUND,
                        409: {"model": ErrorBody, "description": "Jobs run on the node"}})
def retire_node(node_id: RowId, session: DbSession,
                principal: Principal = Depends(require_role(Role.ADMIN))) -> dict:
    """Take a node gone for good out of the registry (it stays in its runs' provenance)."""
    node = retire(session, node_id, principal.actor)
    return view(node, [], 0, utcnow())
