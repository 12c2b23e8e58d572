"""Open Inference Protocol v2 over REST (KServe v2, what Triton and MLServer speak): every
deployment is a model. Placeholder: the routes are being built (issue 17)."""

from __future__ import annotations

from fastapi import FastAPI

from gateway.settings import Settings


def mount(app: FastAPI, settings: Settings) -> None:
    """Add the ``/v2`` routes to ``app``."""
