"""What a worker's batch writes, and how its write is judged: the results as one reply entry a
gateway, and which failed commands stop the worker's step (an ack's) and which do not (a result
or a heartbeat whose node is away during a failover)."""

from __future__ import annotations

import logging
import time
from typing import Any

from models.role_model import Scored
from rendezvous.bus.aside import UNREACHABLE
from rendezvous.bus.routing import Command, command, raise_first_error
from rendezvous.envelope import ModelResult, encode_results

log = logging.getLogger(__name__)


def reply_commands(replies: list[Scored], reply_maxlen: int) -> list[Command]:
    """One entry per gateway for the whole batch (every role's results together), so the cap,
    which counts results, becomes entries of this batch's size. NOMKSTREAM: a gateway that is
    gone has no stream, and we must not recreate it."""
    by_gateway: dict[str, list[ModelResult]] = {}
    for reply_to, result in replies:
        by_gateway.setdefault(reply_to, []).append(result)
    commands = []
    for reply_to, results in by_gateway.items():
        ((field, value),) = encode_results(results).items()
        maxlen = b"%d" % max(1, reply_maxlen // len(results))
        commands.append(command(b"XADD", reply_to.encode(), b"NOMKSTREAM", b"MAXLEN", b"~",
                                maxlen, b"*", field, value))  # fmt: skip
    return commands


_lost_said_until = [0.0]
"""When undelivered results may be logged again (a warning per batch would flood the log)."""


def check_written(results: int, essential: int, written: list[Any]) -> None:
    """Raise the first error among a batch's writes (its first ``results`` commands are the
    results, each to a gateway's reply stream, then its acks up to ``essential``, then the
    heartbeats), but not a node that is away under a result or a heartbeat. Such a result is
    lost: its gateway cannot read its reply stream meanwhile either (its requests get 503 at
    their timeout), and failing the step would hold up the answers to every other gateway and
    every partition until the cluster elects a replica (a 504 for a request of a healthy
    gateway and partition, found by hand). A heartbeat (partition 0's master away) is sent
    again when next due."""
    lost = [r for r in written[:results] if isinstance(r, UNREACHABLE)]
    if lost and time.monotonic() >= _lost_said_until[0]:
        _lost_said_until[0] = time.monotonic() + 5.0  # once in 5 s: an election lasts seconds
        log.warning("results not delivered to %d gateways: their reply stream's node is away "
                    "(%s)", len(lost), lost[0])  # fmt: skip
    raise_first_error([r for r in written[:results] if not isinstance(r, UNREACHABLE)])
    raise_first_error(written[results:essential])
    raise_first_error([r for r in written[essential:] if not isinstance(r, UNREACHABLE)])
