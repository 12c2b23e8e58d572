"""Sends a deployment's drift alert events to the webhooks, from its events stream.

Every raise and clear is an entry of the deployment's events stream, whoever decided it (a log
bin, which has no HTTP client; a gateway process's prediction prior; the monitor), so one
process sends them all, in the order they were decided: the one that leads the deployment's
drift evaluation (``drift_monitor``). Each URL has a task of its own and its own place in the
stream, kept in Redis and moved only once the URL took the events (a 2xx): a URL that is down
delays only itself, and a process that stops (a restart, a crash, a lead that moves) leaves
the next leader to send what was not taken. Delivery is at least once: an answer lost after
the URL took the events sends them again (Alertmanager's receivers go by ``fingerprint`` and
``status``).

Found by a helper's probe: one queue a process, each payload posted to every URL in turn and
retried for up to ten minutes, so a dead URL held back the pager by ten minutes a payload;
the queue was lost with its process, and the place in the stream had moved when events were
queued, not delivered, so no one sent them again; and a raise and its clear, decided by two
processes, could reach a receiver in the wrong order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from gateway.observability.alert_webhooks import AlertWebhooks, shown_url
from rendezvous import names
from rendezvous.bus.clock import entry_order
from rendezvous.bus.connection import AsyncClient, text
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.retry_log import RetryLog

log = logging.getLogger(__name__)

RELAY_PAGE = 200
"""Most events in one payload (a deployment's backlog goes as several, in order)."""
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0

Entries = list[tuple[bytes, dict[bytes, bytes]]]


_ADVANCE = """
local kept = redis.call('HGET', KEYS[1], ARGV[1])
if kept then
  local km, ks = string.match(kept, '^(%d+)-(%d+)$')
  local nm, ns = string.match(ARGV[2], '^(%d+)-(%d+)$')
  if km and nm and (tonumber(km) > tonumber(nm)
                    or (tonumber(km) == tonumber(nm) and tonumber(ks) >= tonumber(ns))) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
"""Move a URL's place (KEYS: the deployment's places; ARGV: the URL's id, the entry id) only
forward: a process that stalled and sent again must not move it back."""


def _payloads(entries: Entries) -> list[tuple[bytes, list[dict[str, Any]]]]:
    """The events of ``entries`` as payloads in order, each holding an alert once, with the
    id of its last entry: a backlog sent in one payload held an alert's firing and its
    resolved, under a top-level ``"status": "firing"``, which a receiver keying on the group's
    status took for an incident that no later message ended (a helper's probe)."""
    payloads: list[tuple[bytes, list[dict[str, Any]]]] = []
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    last: bytes | None = None
    for entry_id, fields in entries:
        try:
            event = json.loads(fields[b"e"])
        except (KeyError, ValueError):  # skipped, and the place moves past it
            last = entry_id
            continue
        alert = str(event.get("id") or f"{event.get('kind')}/{event.get('feature')}")
        if alert in seen and last is not None:
            payloads.append((last, events))
            events, seen = [], set()
        events.append(event)
        seen.add(alert)
        last = entry_id
    if last is not None:
        payloads.append((last, events))
    return payloads


def url_id(url: str) -> str:
    """A URL's name in Redis: a digest (a URL may carry a token in its query)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


@dataclass
class _Url:
    """One URL's sending: its task, its places (per deployment) and its failures."""

    url: str
    places: dict[str, bytes] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    retry_s: float = FIRST_RETRY_S
    """The wait after the next refusal (doubling to ``MAX_RETRY_S``)."""
    wait_s: float = FIRST_RETRY_S
    """The wait after the latest refusal, the one its log line said."""
    failing_since: float | None = None
    log: RetryLog | None = None


class DriftRelay:
    def __init__(self, client: AsyncClient, webhooks: AlertWebhooks | None, tick_s: float = 0.5):
        self.client = client
        self.webhooks = webhooks
        self.tick_s = tick_s
        self.sent = 0
        """Payloads a URL took."""
        self.skipped = 0
        """Events given up on after ``give_up_s`` of a URL refusing them."""
        self._led: list[str] = []
        self._urls = [_Url(u) for u in (webhooks.urls if webhooks is not None else [])]
        for one in self._urls:
            one.log = RetryLog(log, f"alert webhook {shown_url(one.url)}")

    def lead(self, deployments: Iterable[str], *, start: bool = True) -> None:
        """The deployments this process sends for, from now on (its drift leases); the URLs'
        tasks start with the first (``start`` False: the caller sends, by ``deliver``)."""
        led = sorted(deployments)
        for one in self._urls:
            for gone in set(one.places).difference(led):  # another process sends it now
                del one.places[gone]
        self._led = led
        if not led or not start:
            return
        for one in self._urls:
            if one.task is None or one.task.done():
                one.task = asyncio.get_running_loop().create_task(self._run(one))

    async def deliver(self) -> int:
        """One pass of every URL over every deployment led (what each task does every
        ``tick_s``); returns how many events the URLs took."""
        taken = 0
        for one in self._urls:
            taken += await self._pass(one)
        return taken

    async def _run(self, one: _Url) -> None:
        while self._led:
            wait_s = self.tick_s
            try:
                await self._pass(one)
                if one.failing_since is not None:
                    wait_s = one.wait_s
            except REDIS_FAILURES as exc:
                assert one.log is not None
                one.log.failed(f"cannot read or keep its place in Redis ({exc})")
            except Exception:  # a bug must not end the sending for good
                log.exception("alert webhook %s: the relay failed", shown_url(one.url))
            await asyncio.sleep(wait_s)

    async def _pass(self, one: _Url) -> int:
        """Each led deployment's events after this URL's place, read in one round trip, then
        posted in order; stops at the first refusal (tried again after ``retry_s``)."""
        await self._places(one, [d for d in self._led if d not in one.places])
        places = {d: one.places[d] for d in self._led if d in one.places}  # lead() may move on
        led = list(places)
        if not led:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for deployment in led:
            pipe.xrange(names.drift_events_stream(deployment), b"(" + places[deployment], "+",
                        count=RELAY_PAGE)  # fmt: skip
        taken = 0
        for deployment, entries in zip(led, await pipe.execute(), strict=True):
            while entries:
                sent = await self._send(one, deployment, cast(Entries, entries))
                if sent is None:
                    return taken
                taken += sent
                if len(entries) < RELAY_PAGE:
                    break
                entries = await self.client.xrange(
                    names.drift_events_stream(deployment), b"(" + cast(Entries, entries)[-1][0],
                    "+", count=RELAY_PAGE)  # fmt: skip
        return taken

    async def _places(self, one: _Url, deployments: list[str]) -> None:
        """Each deployment's place for this URL as Redis keeps it; a URL with none yet starts
        after the newest event (nothing older is sent)."""
        if not deployments:
            return
        pipe = self.client.pipeline(transaction=False)
        for deployment in deployments:
            pipe.hgetall(names.drift_delivered_key(deployment))
            pipe.xrevrange(names.drift_events_stream(deployment), count=1)
        replies = await pipe.execute()
        ours = {url_id(u.url).encode() for u in self._urls}
        for i, deployment in enumerate(deployments):
            places, newest = (
                cast(dict[bytes, bytes], replies[2 * i]),
                cast(Entries, replies[2 * i + 1]),
            )
            gone = [u for u in places if u not in ours]
            if gone:  # a URL no longer listed: added back, it starts after the newest event
                await self.client.hdel(names.drift_delivered_key(deployment), *gone)
            kept = places.get(url_id(one.url).encode())
            if kept is None:
                kept = newest[0][0] if newest else b"0-0"
                await self.client.hset(names.drift_delivered_key(deployment), url_id(one.url),
                                       kept)  # fmt: skip
            if deployment in self._led:
                one.places[deployment] = text(kept).encode()

    async def _send(self, one: _Url, deployment: str, entries: Entries) -> int | None:
        """Post ``entries``' events (in payloads where each alert is once, ``_payloads``) and
        move the place past each; None when the URL refused (the place stays, unless it has
        refused them for ``give_up_s``)."""
        assert self.webhooks is not None and one.log is not None
        key, field = names.drift_delivered_key(deployment), url_id(one.url)
        taken = 0
        for last, events in _payloads(entries):
            kept: Any = await self.client.hget(key, field)
            if kept is not None and entry_order(kept) >= entry_order(last):
                self._keep_place(one, deployment, kept)  # another process sent them (a stall)
                continue
            if events:
                why = await self.webhooks.post(one.url, self.webhooks.payload(deployment, events))
                if why is not None and not self._give_up(one, deployment, events, why):
                    return None
                if why is None:
                    self.sent += 1
                    taken += len(events)
                    one.log.succeeded()
                    one.failing_since, one.retry_s = None, FIRST_RETRY_S
            await self.client.eval(_ADVANCE, 1, key, field, last)
            self._keep_place(one, deployment, last)
        return taken

    def _keep_place(self, one: _Url, deployment: str, place: bytes) -> None:
        if deployment in self._led:  # else another process sends it now, from Redis's place
            one.places[deployment] = text(place).encode()

    def _give_up(self, one: _Url, deployment: str, events: list[Any], why: str) -> bool:
        """A refusal: True once the URL has refused for ``give_up_s`` (its events skipped),
        else False and a longer wait before the next try."""
        assert self.webhooks is not None and one.log is not None
        now = time.monotonic()
        if one.failing_since is None:
            one.failing_since = now
        if now - one.failing_since < self.webhooks.give_up_s:
            one.wait_s = one.retry_s
            one.log.failed(why, one.wait_s)
            one.retry_s = min(one.retry_s * 2, MAX_RETRY_S)
            return False
        self.skipped += len(events)
        log.error("alert webhook %s: giving up on %d events of %s after %.0f s (%s)",
                  shown_url(one.url), len(events), deployment, now - one.failing_since,
                  why)  # fmt: skip
        one.failing_since = now  # the next ones get their own time
        return True

    async def close(self) -> None:
        self._led = []
        for one in self._urls:
            if one.task is not None:
                one.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await one.task
