"""Async jobs: submit a predict, collect its answer later from any gateway. Placeholder: being
built (issue 17)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from gateway.settings import Settings


def mount(app: FastAPI, settings: Settings) -> None:
    """Add the ``/v1/deployments/{deployment}/jobs`` routes to ``app``."""


async def start(app: FastAPI, settings: Settings) -> Callable[[], Awaitable[None]]:
    """Start this process's share of the job work, once ``app.state.service`` and
    ``app.state.redis`` exist; returns the coroutine function that stops it."""

    async def stop() -> None:
        return None

    return stop
