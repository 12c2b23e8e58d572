"""The admin guard: who may call an admin route, and what its refusals look like.

The token check lives in the route class of the admin routers, so it runs before anything
else a route does (before its body is even parsed) and no route added to such a router can
skip it. Without ``RDV_ADMIN_TOKEN`` the routes answer 404 with a message saying so: the
admin API is off, never open. The same check decides whether ``/openapi.json`` shows the
admin routes (``gateway.admin.schema``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from gateway.admin.bodies import AdminError
from gateway.problems import Problem, bearer_refusal, compressed, encoding_fault, not_json
from gateway.settings import Settings
from models.deployments import DeploymentUnreadable
from rendezvous.names import InvalidName, check_name

OFF = "the admin API is off: set RDV_ADMIN_TOKEN on the gateway to turn it on"


def admin_token(settings: Settings) -> bytes | None:
    secret = settings.admin_token.get_secret_value().strip() if settings.admin_token else ""
    return secret.encode() if secret else None


def refusal(request: Request, token: bytes | None) -> Problem | None:
    """None when the request carries the admin token; never logs what it was given."""
    if token is None:
        return Problem(404, OFF)
    return bearer_refusal(
        request.headers.getlist("authorization"), token, "admin", "RDV_ADMIN_TOKEN"
    )


def guarded_route(token: bytes | None) -> type[APIRoute]:
    """A route class that checks the token first and turns ``AdminError`` into its status
    (and a deployment state this version cannot read into a 409, on every route)."""

    class AdminRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                refused = (
                    refusal(request, token)
                    or compressed(request.headers.get("content-encoding", ""))
                    or _bad_name(request)
                )
                if refused is None and _parsed_as_json(request):
                    # Python's JSON reads a UTF-8 mark and UTF-16 too, which predict, feedback
                    # and OIP refuse (RFC 8259): one rule for every body (a probe)
                    fault = encoding_fault(await request.body())
                    if fault is not None and fault[0] != "missing":  # some take none
                        refused = Problem(422, fault[1])
                if refused is not None:
                    return refused.response()
                try:
                    return await handler(request)
                except HTTPException as exc:
                    if exc.status_code != 400 or exc.__cause__ is None:
                        raise
                    # FastAPI's "There was an error parsing the body" named nothing (a body
                    # not UTF-8, too deep, a 5,000-digit number; found by a helper's fuzzing)
                    return Problem(422, not_json(await request.body(), exc.__cause__)).response()
                except RequestValidationError as exc:
                    raw = await request.body()
                    if _body_missing(exc, raw):  # FastAPI said "Field required" of the body
                        return Problem(422, not_json(raw, None)).response()
                    if not any(e.get("type") == "json_invalid" for e in exc.errors()):
                        raise
                    # FastAPI's "JSON decode error" said where, not what (a probe)
                    return Problem(422, not_json(raw, _parse_error(raw))).response()
                except AdminError as exc:
                    return Problem(exc.status, exc.detail, exc.extra).response()
                except InvalidName as exc:  # a name that may never reach a Redis key
                    return Problem(422, str(exc)).response()
                except DeploymentUnreadable as exc:  # a newer version's state, or damaged
                    return Problem(409, str(exc)).response()

            return guarded

    return AdminRoute


def _bad_name(request: Request) -> Problem | None:
    """422 for a deployment named in the path by a name that can never be one, before the
    body is read: a route that parsed its body first answered the body's faults instead, and
    those that looked the name up 404 (one rule on every route, the data plane's too)."""
    name = request.path_params.get("deployment")
    try:
        if name is not None:
            check_name(name, "deployment")
    except InvalidName as exc:
        return Problem(422, str(exc))
    return None


def _parsed_as_json(request: Request) -> bool:
    """Whether the route reads the body as JSON: what carries one, but a multipart upload
    (its parts are read as they come, never held whole here)."""
    kind = request.headers.get("content-type", "").lower()
    return request.method in ("POST", "PUT", "PATCH") and not kind.startswith("multipart/")


def _body_missing(exc: RequestValidationError, raw: bytes) -> bool:
    """Whether a route that needs a body was sent none (empty or blank)."""
    none = not raw or raw.isspace()
    return none and any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",)
                        for e in exc.errors())  # fmt: skip


def _parse_error(raw: bytes) -> ValueError | None:
    """The parser's own words on a body FastAPI could not read as JSON."""
    try:
        json.loads(raw)
    except ValueError as exc:
        return exc
    return None
