"""Relays to the webhooks the drift alert events that the log bins' claims decided.

The log bin judges every archived row for feature drift but has no HTTP client, so the gateway
process that leads a deployment's drift evaluation (``drift_monitor``) sends its events on: at
every tick, one pipelined read of every led deployment's events stream after the last relayed
id. That id is kept in Redis, so a new leader carries on where the old one stopped, and a
leader's first read starts after the newest event (nothing older is sent again).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

from gateway.observability.alert_webhooks import AlertWebhooks
from rendezvous import drift_claims, names
from rendezvous.bus.connection import AsyncClient, text

RELAY_PAGE = 200
"""Most events read per deployment and tick."""

Entries = list[tuple[bytes, dict[bytes, bytes]]]


class DriftRelay:
    def __init__(self, client: AsyncClient, webhooks: AlertWebhooks | None):
        self.client = client
        self.webhooks = webhooks
        self._relayed: dict[str, bytes] = {}
        """Per deployment led, the id of the latest event relayed."""

    def keep_only(self, led: Iterable[str]) -> None:
        """Forget the deployments whose lead went elsewhere: their holder relays them."""
        for gone in set(self._relayed).difference(led):
            del self._relayed[gone]

    async def relay(self, *deployments: str) -> int:
        """Send the events decided by a log bin since the last relayed one, for each of
        ``deployments``, read in one round trip; returns how many were sent."""
        for deployment in deployments:
            if deployment not in self._relayed:
                self._relayed[deployment] = await self._start_after(deployment)
        if not deployments:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for deployment in deployments:
            pipe.xrange(names.drift_events_stream(deployment), b"(" + self._relayed[deployment],
                        "+", count=RELAY_PAGE)  # fmt: skip
        relayed = 0
        for deployment, entries in zip(deployments, await pipe.execute(), strict=True):
            if entries:
                relayed += await self._send(deployment, cast(Entries, entries))
        return relayed

    async def _start_after(self, deployment: str) -> bytes:
        stored: Any = await self.client.get(names.drift_relayed_key(deployment))
        if stored is None:
            newest = cast(Entries, await self.client.xrevrange(
                names.drift_events_stream(deployment), count=1))  # fmt: skip
            stored = newest[0][0] if newest else b"0-0"
        return text(stored).encode()

    async def _send(self, deployment: str, entries: Entries) -> int:
        events = []
        for _id, fields in entries:
            try:
                event = json.loads(fields[b"e"])
            except (KeyError, ValueError):
                continue
            if str(event.get("by", "")).startswith(drift_claims.LOGBIN_SOURCE):
                events.append(event)
        self._relayed[deployment] = entries[-1][0]
        await self.client.set(names.drift_relayed_key(deployment), entries[-1][0])
        if events and self.webhooks is not None:
            self.webhooks.notify(deployment, events)  # queued: nothing waits
        return len(events)
