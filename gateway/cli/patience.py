"""Sending a repeatable call again through a gateway's momentary refusals, for the bulk
commands (``rdv feedback``, ``rdv features load``): a label or an entity sets a value, so a
call sent twice does no more than once. And reading Redis again through a failover, for the
commands that read it themselves (``rdv decisions``, ``rdv archive export``).

A failover or a Redis restart answers 503 for a few seconds, and a gateway restarting refuses
connections for about one: each ended a load half-way, for a person to start it again (a
helper's probe). A 429 or 503 is waited out (its ``Retry-After``, else a backoff) and so is a
gateway that cannot be reached, until ``budget_s`` has passed; every wait is said on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.cli.arguments import seconds

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

RETRIED_STATUSES = frozenset({429, 503})
FIRST_BACKOFF_S = 0.5
MAX_PAUSE_S = 5.0
DEFAULT_BUDGET_S = 60.0
REDIS_RIDE_OUT_S = 30.0
"""How long a command's Redis read is tried again while Redis fails for a moment: a cluster's
election takes its ``cluster-node-timeout`` (15 s by default) and a second or two more; a
restart, the time to load its data."""


def add_retry_argument(parser: Any) -> None:
    parser.add_argument("--retry-for", type=seconds, default=DEFAULT_BUDGET_S,
                        metavar="SECONDS",
                        help="how long a batch is sent again while the gateway refuses it for a "
                             "moment (429, 503) or cannot be reached (default "
                             f"{DEFAULT_BUDGET_S:g}; 0: never)")  # fmt: skip


def _retry_after_s(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date, which no gateway of ours sends
        return None


def send_patiently(
    send: Callable[[], httpx.Response], what: str, budget_s: float, tty: bool = False
) -> httpx.Response:
    """``send()``'s answer; sent again after a 429 or 503 or a failure to reach the gateway
    while ``budget_s`` lasts (the last answer, or the last failure raised, past it)."""
    import httpx

    deadline = time.monotonic() + budget_s
    backoff = FIRST_BACKOFF_S
    failure: httpx.TransportError | None
    while True:
        try:
            resp = send()
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.LocalProtocolError):
                raise
            pause, reason, failure = backoff, f"cannot reach the gateway ({exc})", exc
        else:
            if resp.status_code not in RETRIED_STATUSES:
                return resp
            asked = _retry_after_s(resp.headers.get("retry-after"))
            pause = backoff if asked is None else max(0.1, asked)
            reason, failure = f"{resp.status_code} {_said(resp)}", None
        pause = min(pause, MAX_PAUSE_S)
        if time.monotonic() + pause > deadline:
            if failure is not None:
                raise failure
            return resp
        print(f"{chr(10) if tty else ''}{what}: {reason}; trying again in {pause:.1f} s",
              file=sys.stderr)  # fmt: skip
        time.sleep(pause)
        backoff = min(backoff * 2, MAX_PAUSE_S)


def ride_out(read: Callable[[], T], what: str, budget_s: float = REDIS_RIDE_OUT_S) -> T:
    """``read()``'s value, tried again while Redis fails for a moment (unreachable, loading,
    a cluster electing a master), for ``budget_s`` at most; said once on stderr. A read sent
    0.3 s after a master was killed failed at once, naming nodes that were up (a helper's
    probe): the cluster client tries a lost node's slots twice within a tenth of a second,
    which suits a gateway's caller, not a person's command."""
    from rendezvous.bus.failures import REDIS_DOWN

    deadline = time.monotonic() + budget_s
    pause = FIRST_BACKOFF_S / 5
    said = False
    while True:
        try:
            return read()
        except REDIS_DOWN as exc:
            if time.monotonic() + pause > deadline:
                raise
            if not said:
                print(f"{what}: Redis failed for a moment ({exc}); trying again for up to "
                      f"{budget_s:g} s", file=sys.stderr)  # fmt: skip
                said = True
            time.sleep(pause)
            pause = min(pause * 2, FIRST_BACKOFF_S)


def _said(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except ValueError:
        return resp.reason_phrase
    detail = doc.get("detail") if isinstance(doc, dict) else None
    return str(detail)[:200] if detail else resp.reason_phrase


__all__ = ["DEFAULT_BUDGET_S", "add_retry_argument", "ride_out", "send_patiently"]
