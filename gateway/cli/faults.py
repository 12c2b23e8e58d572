"""What a person running an ``rdv`` command reads when it fails on something they can put
right: one line, where a traceback said the same in forty."""

from __future__ import annotations

import sys
from typing import Any


def operator_fault(exc: Exception) -> str | None:
    """One line for what the person running the command can put right (a file, a value, an
    address, a name that does not exist): a traceback said the same in forty lines. Anything
    else is a bug and keeps its traceback; ``RDV_LOG_LEVEL=DEBUG`` shows one for these too."""
    import redis

    from models.deployments import DeploymentNotFound

    if isinstance(exc, OSError):  # a file or folder that is not there or not usable
        from gateway.dataplane.failures import STORAGE_REFUSALS

        where = f": {exc.filename}" if exc.filename else ""
        if not where and exc.errno in STORAGE_REFUSALS:  # a write's, which names no file
            where = " (where rdv writes: its data folder, RDV_DATA_DIR, or the temporary folder)"
        return f"{exc.strerror or exc}{where}"
    if isinstance(exc, DeploymentNotFound):
        return str(exc).strip("'\"")
    from models.registry import ModelNotFound

    if isinstance(exc, ModelNotFound):  # a worker started on another data folder, say
        return f"{exc} (the models live in RDV_DATA_DIR's models/)"
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return f"what answered at RDV_REDIS_URL is not Redis ({exc})"
    if isinstance(exc, redis.exceptions.ResponseError):
        return f"Redis refused the command: {exc}"
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.InvalidURL):
        return f"not a usable URL: {exc}"
    if isinstance(exc, ValueError | OverflowError | RecursionError):  # a value that cannot be
        return f"{exc}"
    return None


def shown_gateway(url: Any) -> str:
    """A gateway's URL (an ``httpx.URL``) as a message shows it: without its user information
    (credentials in ``--url`` were printed; a helper's probe)."""
    return str(url.copy_with(userinfo=b""))


def gateway_unreachable(exc: Exception) -> str | None:
    """One line for a gateway the command could not reach or that did not answer."""
    httpx = sys.modules.get("httpx")  # only a command that talks to a gateway imported it
    if httpx is None or not isinstance(exc, httpx.TransportError):
        return None
    try:
        request = exc.request
        # not its user information: credentials in --url were printed (a helper's probe)
        where = f" at {shown_gateway(request.url.copy_with(path='/', query=None))}"
    except RuntimeError:  # no request attached
        request, where = None, ""
    if isinstance(exc, httpx.ReadTimeout) and request is not None and request.method != "GET":
        # sent whole, never answered: a promotion may have taken effect all the same, and
        # "cannot reach" told the operator to send it again (found by a helper's probe)
        said = str(exc) or "timed out"
        return (f"the gateway{where} took the call but did not answer in time ({said}): it may "
                "have taken effect; look before sending it again (rdv deployments show, "
                "history)")  # fmt: skip
    return f"cannot reach the gateway{where}: {exc or type(exc).__name__}"
