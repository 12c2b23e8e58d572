"""The Open Inference Protocol's model repository, as far as a gateway of deployments has one:
its index (``POST /v2/repository/index``, what ``tritonclient``'s
``get_model_repository_index`` and MLServer's clients call) lists every version that holds a
role of a deployment, ``READY`` when that role has a live worker; and which roles of a
deployment have a live worker, which the ``/ready`` routes read too.

Load and unload are refused (400, as Triton refuses them when it polls its repository): a
deployment serves its models for as long as it exists, and the admin API is what changes it.
So the index is served, but ``model_repository`` is not named among the server's extensions,
which would promise all three.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError

from gateway.dataplane.deployments import DeploymentCache
from gateway.problems import Problem, encoding_fault, not_json
from models.deployments import Deployment
from rendezvous import names
from rendezvous.bus import clock

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"

LOAD_REFUSAL = (
    "models are not loaded or unloaded through the Open Inference Protocol here: a deployment "
    "serves its models while it exists; create, change or delete it with the admin API "
    "(POST /admin/deployments, POST /admin/deployments/{d}/promote, DELETE /admin/deployments/{d})"
)


class IndexRequest(BaseModel):
    """The index request's body (every member optional; an empty body asks for everything)."""

    model_config = ConfigDict(extra="ignore")
    repository_name: StrictStr = ""
    ready: StrictBool = False


class IndexRefused(Exception):
    """An index request this gateway does not answer; ``problem`` says why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


def index_request(raw: bytes) -> IndexRequest:
    """The body of an index request, or ``IndexRefused``: 400 naming what is wrong with it, 404
    for a repository other than the one this gateway has."""
    if not raw.strip():
        return IndexRequest()
    fault = encoding_fault(raw)  # Python's JSON reads a UTF-8 mark and UTF-16: no body does
    if fault is not None:
        raise IndexRefused(Problem(400, fault[1]))
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IndexRefused(Problem(400, not_json(raw, exc))) from None
    if not isinstance(doc, dict):
        raise IndexRefused(Problem(400, "the body must be a JSON object (or empty)"))
    try:
        request = IndexRequest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise IndexRefused(Problem(400, f"{where}: {first['msg']}")) from None
    if request.repository_name:
        raise IndexRefused(
            Problem(
                404,
                f"no repository named {request.repository_name[:80]!r}: this gateway "
                "has one, unnamed (send an empty repository_name)",
            )
        )
    return request


async def live_roles(redis: Any, dep: Deployment, heartbeat_timeout_s: float) -> set[str]:
    """The roles of ``dep`` that have a live worker (a heartbeat within the timeout)."""
    members = await redis.eval(
        *clock.live_members_args(names.workers_key(dep.name), heartbeat_timeout_s)
    )
    return {m.decode().split("|", 1)[0] for m in members}


def _no_worker(roles: list[str]) -> str:
    held = (
        f"role it holds ({roles[0]})" if len(roles) == 1 else f"roles it holds ({', '.join(roles)})"
    )
    return f"no live worker for the {held}"


async def repository_index(
    redis: Any,
    deployments: DeploymentCache,
    heartbeat_timeout_s: float,
    ready_only: bool,
) -> list[dict[str, str]]:
    """One entry a version that holds a role of a deployment (deployments by name, real's
    version first): ``READY`` when one of the roles it holds has a live worker."""
    deps = [deployments.deployments[name] for name in sorted(deployments.deployments)]
    lives = await asyncio.gather(*(live_roles(redis, d, heartbeat_timeout_s) for d in deps))
    index: list[dict[str, str]] = []
    for dep, live in zip(deps, lives, strict=True):
        for version in dep.versions:
            held = dep.roles_holding(version)
            ready = any(role in live for role in held)
            if ready_only and not ready:
                continue
            index.append({
                "name": dep.name,
                "version": version,
                "state": READY if ready else UNAVAILABLE,
                "reason": "" if ready else _no_worker(held),
            })  # fmt: skip
    return index


__all__ = [
    "LOAD_REFUSAL",
    "READY",
    "UNAVAILABLE",
    "IndexRefused",
    "IndexRequest",
    "index_request",
    "live_roles",
    "repository_index",
]
