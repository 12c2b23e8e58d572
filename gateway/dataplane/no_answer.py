"""Why a request that waited got no answer: the models' timeout (the caller's 504), or Redis's
doing (a 503, worth a retry), and whether the caller's own request id is free again for it."""

from __future__ import annotations

import time

from gateway.dataplane.failures import Unavailable
from gateway.dataplane.matcher import Rendezvous
from rendezvous import names
from rendezvous.bus.appender import Fate, StreamAppender

APPEND_STALLED_MS = 100.0
"""A request's input not in Redis this long after its arrival: Redis stalled (an append takes
well under a millisecond), so its deadline's answer is a 503 to retry, not the models' 504
(a SIGSTOPped Redis gave 504s; found by a helper's probe)."""


async def raise_if_redis_failed(
    rendezvous: Rendezvous,
    appender: StreamAppender,
    stream: str,
    rid: str,
    input_id: bytes | None,
    reason: str,
    started_ms: float,
    chosen: bool,
) -> None:
    """Raise 503 for a request that waited in vain because Redis failed or lost its input:
    not the models' fault, and worth a retry (the caller's 504 otherwise). Redis failed
    while it waited (a restart, a failover; seen by the reply reader, or by other appends
    to its input stream), or its input is gone: a failover took the entry before a replica
    had it, with nothing else failing where the gateway looks (asked only then), or Redis
    has not taken its input at all (stalled past ``APPEND_STALLED_MS``). A caller's own id
    (``chosen``) is freed for the retry when its input is gone; while the input may still be
    scored under it, it stays taken and the caller is told to use a new one (the answer's
    ``request_id_taken``)."""
    failed_ms = max(rendezvous.read_failed_ms, appender.failed_ms(stream))
    redis_failed = failed_ms >= started_ms
    waited_ms = time.time() * 1000 - started_ms
    fate = Fate.UNKNOWN
    if input_id is None and not redis_failed:
        if waited_ms < APPEND_STALLED_MS:
            return  # its append still under way at a deadline of a few ms: a 504
        what = f"Redis did not take request {rid!r}'s input in {waited_ms:.0f} ms (stalled)"
    else:
        if input_id is not None and (chosen or not redis_failed):
            fate = await appender.fate(stream, input_id)
        if redis_failed or fate is Fate.UNKNOWN:
            what = f"Redis failed while request {rid!r} waited for its answer ({reason})"
        elif fate is Fate.GONE:
            what = f"Redis lost request {rid!r}'s input while it waited ({reason})"
        else:
            return
    key = names.request_id_key(stream, rid)
    if not chosen or (fate is Fate.GONE and await appender.release(key)):
        raise Unavailable(f"{what}; retry it")
    raise _id_kept(what, rid)


def _id_kept(what: str, rid: str) -> Unavailable:
    return Unavailable(
        f"{what}; its input may still be scored under that id, which stays taken: "
        "retry it with a new X-Request-Id",
        request_id_taken=rid,
    )


def unreplicated(exc: BaseException | None, rid: str, chosen: bool) -> Unavailable:
    """The 503 of a request whose input no replica acknowledged in time (``RDV_WAIT_REPLICAS``):
    the master has it, so it is scored and archived under its id, and a caller's own id stays
    taken like any other whose input may still be scored."""
    return _id_kept(str(exc), rid) if chosen else Unavailable(f"{exc}; retry it")


__all__ = ["APPEND_STALLED_MS", "raise_if_redis_failed", "unreplicated"]
