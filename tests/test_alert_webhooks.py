"""Drift alerts to webhooks: Alertmanager's payload, posted to a real HTTP receiver, retried
with backoff when it fails, never waited for by the caller."""

from __future__ import annotations

import asyncio

from gateway.observability.alert_webhooks import ZERO_TIME, AlertWebhooks, alertmanager_payload
from processes import WebhookReceiver

RAISED = {"type": "raised", "kind": "feature_psi", "value": 2.5, "threshold": 1.0,
          "ts_ms": 1_700_000_000_000}  # fmt: skip
CLEARED = {**RAISED, "type": "cleared", "value": 0.2, "ts_ms": 1_700_000_060_000,
           "since_ms": RAISED["ts_ms"]}  # fmt: skip


def test_the_payload_is_alertmanagers() -> None:
    firing = alertmanager_payload("dep", [RAISED])
    assert firing["version"] == "4" and firing["status"] == "firing"
    [alert] = firing["alerts"]
    assert alert["labels"] == firing["commonLabels"] == {
        "alertname": "RendezvousDriftAlert", "deployment": "dep", "kind": "feature_psi",
        "severity": "ticket"}  # fmt: skip
    assert alert["startsAt"] == "2023-11-14T22:13:20Z" and alert["endsAt"] == ZERO_TIME
    assert "2.5" in alert["annotations"]["description"]
    assert alert["generatorURL"] == "/v1/deployments/dep/drift"
    resolved = alertmanager_payload("dep", [CLEARED])["alerts"][0]
    assert resolved["status"] == "resolved" and resolved["startsAt"] == alert["startsAt"]
    assert resolved["endsAt"] == "2023-11-14T22:14:20Z"
    assert resolved["fingerprint"] == alert["fingerprint"]


def test_one_evaluations_alerts_are_one_notification_a_broken_feed_pages_and_links_out() -> None:
    """A feed broken in every feature sent one POST per feature and kind (152 for one fault,
    found by a probe), each a ``ticket``, linking to a bare path."""
    events = [{"type": "raised", "kind": kind, "feature": f"f{i}", "value": 1.0,
               "threshold": 0.5, "ts_ms": RAISED["ts_ms"]}
              for kind in ("feature_range", "feature_shift") for i in range(30)]  # fmt: skip
    payload = alertmanager_payload("dep", [*events, CLEARED], "https://rdv.example")
    assert payload["status"] == "firing" and len(payload["alerts"]) == 61
    assert payload["commonLabels"] == {"alertname": "RendezvousDriftAlert", "deployment": "dep"}
    severity = {(a["labels"]["kind"]): a["labels"]["severity"] for a in payload["alerts"]}
    assert severity == {"feature_range": "page", "feature_shift": "ticket", "feature_psi": "ticket"}
    assert payload["externalURL"] == "https://rdv.example"
    assert {a["generatorURL"] for a in payload["alerts"]} == {
        "https://rdv.example/v1/deployments/dep/drift"}  # fmt: skip
    assert alertmanager_payload("dep", [CLEARED])["status"] == "resolved"


def test_raises_and_clears_reach_every_receiver_in_order_through_failures() -> None:
    with WebhookReceiver(fail_first=2) as flaky, WebhookReceiver() as steady:

        async def main() -> AlertWebhooks:
            hooks = AlertWebhooks([flaky.url, steady.url])
            hooks.notify("dep", [RAISED])
            hooks.notify("dep", [CLEARED])
            assert hooks.sent == 0  # queued by notify, sent by its task
            await hooks.close(drain_s=15)  # waits for the queue, retries included
            return hooks

        hooks = asyncio.run(main())
        assert hooks.sent == 4 and hooks.failed == 0
        for receiver in (flaky, steady):
            assert [p["status"] for p in receiver.received] == ["firing", "resolved"]


def test_no_urls_means_nothing_is_queued() -> None:
    async def main() -> None:
        hooks = AlertWebhooks([])
        hooks.notify("dep", [RAISED])
        assert hooks._task is None
        await hooks.close()

    asyncio.run(main())
