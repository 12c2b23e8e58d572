"""``POST /v1/deployments/{deployment}/feedback``: ground truth for requests already answered.

A data-plane route like predict (no admin token; ``RDV_FEEDBACK_TOKEN`` makes it ask for a
token of its own: labels steer the live accuracy and the promotion gate). The body is one
``{"request_id", "label"}`` object or a JSON array of them (``"correct": true|false`` instead
of ``label``, an optional ``weight``); the answer is ``{"accepted": n, "relabelled": k}``. All
or nothing: an unknown or expired id answers 404 listing them, a label outside the classes
422, a malformed body 400/422, a body or item count over the caps 413, and nothing is stored.
The work is ``gateway.dataplane.feedback.FeedbackService``'s; this route translates.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.dataplane.failures import problem_of
from gateway.dataplane.feedback import FeedbackItem, FeedbackRefused, FeedbackService
from gateway.problems import Problem, bearer_refusal, compressed, unavailable
from gateway.settings import Settings

log = logging.getLogger(__name__)

FEEDBACK_PATH = "/v1/deployments/{deployment}/feedback"

_BODY_SCHEMA: dict[str, Any] = {
    "oneOf": [
        FeedbackItem.model_json_schema(),
        {"type": "array", "items": FeedbackItem.model_json_schema()},
    ]
}

_CONTENT = {"application/json": {"schema": _BODY_SCHEMA}}


def _refusal(request: Request, token: bytes | None) -> Problem | None:
    """None when the route is open or the request carries its token (never logged)."""
    if token is None:
        return None
    return bearer_refusal(
        request.headers.getlist("authorization"), token, "feedback", "RDV_FEEDBACK_TOKEN"
    )


def mount(app: FastAPI, settings: Settings) -> None:
    secret = settings.feedback_token.get_secret_value().strip() if settings.feedback_token else ""
    token = secret.encode() if secret else None

    @app.post(
        FEEDBACK_PATH,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _BODY_SCHEMA}},
            }
        },
        responses={
            400: {"description": "the body is not JSON (the reason named)"},
            415: {"description": "a compressed body"},
            401: {"description": "RDV_FEEDBACK_TOKEN is set and the request carries none"},
            403: {"description": "a wrong feedback token"},
            404: {"description": "unknown deployment, or unknown or expired request ids"},
            413: {"description": "body or item count over the caps"},
            422: {
                "description": "malformed items, a label that is not a class, or a name that "
                "cannot be a deployment's"
            },
        },
    )
    async def feedback(deployment: str, request: Request) -> Response:
        """Labels (or right/wrong judgements) for answered requests, joined to every bin's
        output for them; the live accuracy follows within a second."""
        refused = _refusal(request, token) or compressed(
            request.headers.get("content-encoding", "")
        )
        if refused is not None:
            return refused.response()
        service: FeedbackService | None = getattr(request.app.state, "feedback", None)
        if service is None:
            return unavailable("the gateway is starting").response()
        try:
            accepted = await service.accept(deployment, await request.body())
        except FeedbackRefused as exc:
            return Problem(exc.status, exc.detail, exc.extra).response()
        except Exception as exc:
            problem = problem_of(exc)
            if problem is None:
                raise
            return problem.response()
        return JSONResponse({"accepted": accepted.accepted, "relabelled": accepted.relabelled})
