"""Drift alerts raised and cleared, sent to webhooks (``RDV_ALERT_WEBHOOKS``) as Alertmanager
sends them to its webhook receivers, so that whatever already takes Alertmanager's webhooks
(a pager bridge, a chat bot, a retraining pipeline) takes ours unchanged.

Every raise and clear, whoever decided it (a log bin, a gateway process, the monitor), is an
entry of the deployment's events stream; the gateway process leading the deployment's drift
evaluation sends them on from there (``drift_relay``), each URL on its own.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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


AGAINST_REFERENCE = frozenset({"prediction_prior"})
"""Kinds whose ``threshold`` is the reference their value moved from, up or down, not a limit
it went over: "prediction_prior is 0, over its threshold 0.6197" (a helper's drift probe)."""


def shown_url(url: str) -> str:
    """A webhook's URL as logs show it: its scheme and host only. A chat's webhook carries its
    secret in the path (``/services/T0/B0/<token>``), a receiver's in the user information; both
    were logged in full (a helper's probe)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    hidden = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


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
    if kind in AGAINST_REFERENCE:  # its threshold is the reference share, either way of it
        description = (
            f"{kind} of {deployment}: {event.get('detail') or f'{value} against {threshold}'}"
            if firing
            else f"{kind} of {deployment} is back near its reference"
        )
    else:
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
    """Where drift alerts go (``RDV_ALERT_WEBHOOKS``) and how one payload is posted to one of
    them. What is sent when, and again after a failure, is ``drift_relay``'s: it reads the
    events from the deployment's events stream and keeps each URL's place there in Redis."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        external_url: str = "",
        timeout_s: float = 5.0,
        give_up_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.urls = list(urls)
        self.external_url = external_url.rstrip("/")
        self.give_up_s = give_up_s
        """How long the events a URL keeps refusing are tried before they are skipped (the
        events stream keeps a deployment's latest ``EVENTS_MAXLEN`` only)."""
        self._timeout_s = timeout_s
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        """Made on the first payload: most processes never send one, and httpx (with what it
        pulls in) is ~5 MB of each gateway process's memory."""

    def payload(self, deployment: str, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return alertmanager_payload(deployment, events, self.external_url)

    async def post(self, url: str, payload: Mapping[str, Any]) -> str | None:
        """Post once: None when ``url`` took it (2xx), else why not."""
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport)
        try:
            response = await self._http.post(url, json=payload)
        except httpx.HTTPError as exc:  # a ReadTimeout says nothing more than its name
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None if response.status_code < 300 else f"answered {response.status_code}"

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
