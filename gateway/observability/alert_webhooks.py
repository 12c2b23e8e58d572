"""Drift alerts raised and cleared, sent to webhooks (``RDV_ALERT_WEBHOOKS``) as Alertmanager
sends them to its webhook receivers, so that whatever already takes Alertmanager's webhooks
(a pager bridge, a chat bot, a retraining pipeline) takes ours unchanged.

Sending never blocks an evaluation: ``notify`` queues a payload (a bounded queue: when a
receiver is down for long, the oldest payloads go first, counted), and one task per process
posts it to every URL, retrying with backoff (0.5 s doubling to 30 s) for up to
``give_up_s``. Alerts are raised by whichever gateway process holds the deployment's
evaluation lease, so a payload queued by a process that dies is lost; the alert itself stays
in the drift report and its events stream, and Prometheus's ``RendezvousDriftAlert`` rule
covers the same condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

ALERT_NAME = "RendezvousDriftAlert"
ZERO_TIME = "0001-01-01T00:00:00Z"
"""Alertmanager's ``endsAt`` of an alert still firing."""


PAGE_KINDS = frozenset({"feature_range", "feature_stuck"})
"""Kinds that say the feed is broken, not that the world moved: values outside anything seen
in training (a unit change, a sentinel) or a feature stuck at one value (a dead sensor, a
default filled in). They page; every other kind is a drift to look into (a ticket)."""


def severity(kind: str) -> str:
    return "page" if kind in PAGE_KINDS else "ticket"


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _alert(deployment: str, event: Mapping[str, Any], external_url: str) -> dict[str, Any]:
    """One raise or clear as one of Alertmanager's alerts."""
    firing = event["type"] == "raised"
    kind = str(event["kind"])
    labels = {"alertname": ALERT_NAME, "deployment": deployment, "kind": kind,
              "severity": severity(kind)}  # fmt: skip
    if event.get("feature"):  # one alert per feature for the online detectors' kinds
        labels["feature"] = str(event["feature"])
    value, threshold = event.get("value"), event.get("threshold")
    description = (
        f"{kind} of {deployment} is {value:.4g}, over its threshold {threshold:.4g}"
        if firing and value is not None and threshold is not None
        else f"{kind} of {deployment} is back under its threshold"
    )
    if event.get("detail") and firing:
        description += f": {event['detail']}"
    what = f"{kind}/{event['feature']}" if event.get("feature") else kind
    since_ms = event.get("since_ms") or event["ts_ms"]
    return {
        "status": "firing" if firing else "resolved",
        "labels": labels,
        "annotations": {
            "summary": f"drift on {deployment}: {what}",
            "description": description,
        },
        "startsAt": _iso(since_ms),
        "endsAt": ZERO_TIME if firing else _iso(event["ts_ms"]),
        "generatorURL": f"{external_url}/v1/deployments/{deployment}/drift",
        "fingerprint": hashlib.sha256(f"{deployment}/{what}".encode()).hexdigest()[:16],
        "value": value,
        "threshold": threshold,
    }


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    first = maps[0]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in maps[1:])}


def alertmanager_payload(
    deployment: str, events: Sequence[Mapping[str, Any]], external_url: str = ""
) -> dict[str, Any]:
    """The raises and clears one evaluation decided as one notification of Alertmanager's
    webhook (version 4), grouped by deployment as Alertmanager groups: a feed broken in every
    feature is one POST, not one per feature. ``external_url``: the gateway's address as
    receivers reach it (``RDV_PUBLIC_URL``), so that ``generatorURL`` is a link."""
    alerts = [_alert(deployment, event, external_url) for event in events]
    firing = any(a["status"] == "firing" for a in alerts)
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{ALERT_NAME}", deployment="{deployment}"}}',
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": "rendezvous-gateway",
        "groupLabels": {"alertname": ALERT_NAME, "deployment": deployment},
        "commonLabels": _common([a["labels"] for a in alerts]),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": external_url,
        "alerts": alerts,
    }


class AlertWebhooks:
    """Queues payloads and posts each to every URL, in order, with retries."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        external_url: str = "",
        max_queue: int = 1000,
        timeout_s: float = 5.0,
        give_up_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.urls = list(urls)
        self.external_url = external_url.rstrip("/")
        self.give_up_s = give_up_s
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: deque[dict[str, Any]] = deque(maxlen=max_queue)
        self._timeout_s = timeout_s
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        """Made on the first payload: most processes never send one, and httpx (with what it
        pulls in) is ~5 MB of each gateway process's memory."""
        self._task: asyncio.Task[None] | None = None

    def notify(self, deployment: str, events: Sequence[Mapping[str, Any]]) -> None:
        """Queue one payload for the raises and clears of one evaluation; never waits."""
        if not self.urls or not events:
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            log.warning("alert webhooks: queue full, the oldest payload is dropped")
        self._queue.append(alertmanager_payload(deployment, events, self.external_url))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        while self._queue:
            payload = self._queue[0]
            for url in self.urls:
                await self._send(url, payload)
            if self._queue and self._queue[0] is payload:
                self._queue.popleft()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport)
        return self._http

    async def _send(self, url: str, payload: dict[str, Any]) -> None:
        import httpx

        http = self._client()
        deadline = time.monotonic() + self.give_up_s
        delay_s = 0.5
        while True:
            try:
                response = await http.post(url, json=payload)
                if response.status_code < 300:
                    self.sent += 1
                    return
                why = f"answered {response.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay_s > deadline:
                self.failed += 1
                log.error("alert webhook %s: giving up on a payload (%s)", url, why)
                return
            log.warning("alert webhook %s %s; retrying in %.1fs", url, why, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 30.0)

    async def close(self, drain_s: float = 2.0) -> None:
        """Give what is queued a moment to go, then stop."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), drain_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.aclose()
