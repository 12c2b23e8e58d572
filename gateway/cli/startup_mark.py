"""Word from uvicorn's worker processes that one of them failed to start.

With several gateway processes (``RDV_GATEWAY_PROCESSES``), uvicorn's supervisor stops them all
when one fails its start, then returns just as after a SIGTERM: ``rdv gateway`` exited 0, and
a service manager told to restart it on failure never did. Each process's app marks a file the
parent names when its start fails; the parent then exits as uvicorn does for one process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MARK_ENV = "RENDEZVOUS_STARTUP_FAILED_MARK"
STARTUP_FAILURE = 3
"""uvicorn's exit status for an app that failed to start (``uvicorn.config.STARTUP_FAILURE``)."""


@contextlib.contextmanager
def startup_failures() -> Iterator[Path]:
    """The file the processes started inside mark (named to them in ``MARK_ENV``); removed on
    the way out."""
    folder = Path(tempfile.mkdtemp(prefix="rdv-start-"))
    mark = folder / "failed"
    os.environ[MARK_ENV] = str(mark)
    try:
        yield mark
    finally:
        os.environ.pop(MARK_ENV, None)
        mark.unlink(missing_ok=True)
        folder.rmdir()


def marking_startup_failure(app: ASGIApp) -> ASGIApp:
    """``app``, marking the file named in ``MARK_ENV`` when its lifespan start fails (``app``
    itself when none is named: one process, whose failure uvicorn reports)."""
    path = os.environ.get(MARK_ENV)
    if not path:
        return app

    async def marked(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_marking(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                _mark(path)
            await send(message)

        await app(scope, receive, send_marking)

    return marked


def _mark(path: str) -> None:
    """Once, as the process gives up: nothing else waits on its event loop."""
    Path(path).touch()
