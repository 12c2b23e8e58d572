"""Drift alerts to webhooks: Alertmanager's payload, sent from a deployment's events stream in a
real Redis to real HTTP receivers, each URL at its own pace, its place in the stream moved only
once it took the events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from gateway.observability.alert_webhooks import ZERO_TIME, AlertWebhooks, alertmanager_payload
from gateway.observability.drift_relay import DriftRelay, url_id
from processes import WebhookReceiver
from rendezvous import names
from rendezvous.bus.connection import connect_async
from rendezvous.bus.server import free_port

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


def test_a_prior_alert_says_which_way_it_moved_from_its_reference() -> None:
    """It said "prediction_prior of dep is 0, over its threshold 0.6197" (a helper's probe)."""
    detail = "real predicts the positive class for 1% of the last 80 rows, fewer than the 62% of"
    raised = {"type": "raised", "kind": "prediction_prior", "value": 0.0125, "threshold": 0.6197,
              "detail": detail + " its training scores", "ts_ms": RAISED["ts_ms"]}  # fmt: skip
    [alert] = alertmanager_payload("dep", [raised])["alerts"]
    assert (
        alert["annotations"]["description"]
        == f"prediction_prior of dep: {detail} its training scores"
    )
    [back] = alertmanager_payload("dep", [{**raised, "type": "cleared"}])["alerts"]
    assert (
        back["annotations"]["description"] == "prediction_prior of dep is back near its reference"
    )


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


DEP = "hooks"


def _decide(r: redis.Redis, *events: dict[str, Any]) -> None:
    """Events as the claims' merge script appends them to the deployment's events stream."""
    for event in events:
        r.xadd(names.drift_events_stream(DEP), {"e": json.dumps(event)})


def _heard(receiver: WebhookReceiver) -> list[str]:
    return [a["status"] for payload in receiver.received for a in payload["alerts"]]


@contextlib.asynccontextmanager
async def relays(redis_url: str, hooks: AlertWebhooks, n: int = 1,
                 tick_s: float = 0.5) -> AsyncIterator[list[DriftRelay]]:  # fmt: skip
    """``n`` relays (processes, one after another) on one client; all closed after."""
    client = await connect_async(redis_url)
    made = [DriftRelay(client, hooks, tick_s=tick_s) for _ in range(n)]
    try:
        yield made
    finally:
        for relay in made:
            await relay.close()
        await hooks.close()
        await client.aclose()


@pytest.mark.integration
async def test_a_url_that_is_down_holds_back_no_other(r: redis.Redis, redis_url: str) -> None:
    """Each payload went to every URL in turn, each retried for up to ten minutes: one dead
    URL held the pager back by ten minutes a payload (a helper's probe)."""
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    with WebhookReceiver() as steady:
        async with relays(redis_url, AlertWebhooks([dead, steady.url]), tick_s=0.05) as [relay]:
            relay.lead([DEP], start=False)
            assert await relay.deliver() == 0  # each URL's place: after the newest event
            relay.lead([DEP])  # now each URL by its own task
            _decide(r, RAISED, CLEARED)
            for _ in range(100):  # 5 s at most; the dead URL's tries take as long as they will
                if _heard(steady) == ["firing", "resolved"]:
                    break
                await asyncio.sleep(0.05)
            assert _heard(steady) == ["firing", "resolved"], steady.received
            places = r.hgetall(names.drift_delivered_key(DEP))
            assert places[url_id(dead).encode()] != places[url_id(steady.url).encode()]


@pytest.mark.integration
async def test_what_a_url_missed_is_sent_by_the_next_leader_in_order(
    r: redis.Redis, redis_url: str
) -> None:
    """The queue was in memory, and the place in the events stream moved as events were
    queued: a gateway process that stopped while a receiver was down took its alerts with it,
    and the receiver later heard "resolved" for alerts it never heard fire (a helper's
    probe). The place now moves once the URL took them, and the next leader sends the rest."""
    with WebhookReceiver(fail_first=2) as down_for_a_while:
        hooks = AlertWebhooks([down_for_a_while.url])
        async with relays(redis_url, hooks, n=2) as [first, second]:
            first.lead([DEP], start=False)
            assert await first.deliver() == 0
            _decide(r, RAISED)
            assert await first.deliver() == 0  # refused (500): nothing taken, the place stays
            await first.close()  # the process stops
            _decide(r, CLEARED)
            second.lead([DEP], start=False)  # the deployment's next leader
            taken = [await second.deliver() for _ in range(3)]
            assert taken == [0, 2, 0], taken  # refused once more, then both, once
            assert _heard(down_for_a_while) == ["firing", "resolved"]
            # one alert's firing and resolved go as two payloads: in one, under a top-level
            # "firing", a receiver keying on the group's status opened an incident for good
            assert [p["status"] for p in down_for_a_while.received] == ["firing", "resolved"]


@pytest.mark.integration
async def test_a_url_sends_once_what_another_process_sent_and_starts_anew_once_unlisted(
    r: redis.Redis, redis_url: str
) -> None:
    """A lease holder that stalled (SIGSTOP) sent again, from its own idea of the place, what
    the next holder had sent; and a URL taken off the list and put back got every event
    since it left (a helper's probe)."""
    with WebhookReceiver() as steady, WebhookReceiver() as other:
        hooks = AlertWebhooks([steady.url, other.url])
        async with relays(redis_url, hooks, n=2) as [stalled, next_holder]:
            stalled.lead([DEP], start=False)
            await stalled.deliver()  # its places, then it stalls
            _decide(r, RAISED)
            next_holder.lead([DEP], start=False)
            assert await next_holder.deliver() == 2  # each URL the firing
            assert await stalled.deliver() == 0  # back: its places were behind; nothing again
            assert _heard(steady) == _heard(other) == ["firing"]
        only_steady = AlertWebhooks([steady.url])
        async with relays(redis_url, only_steady) as [relay]:
            relay.lead([DEP], start=False)
            await relay.deliver()  # the unlisted URL's place goes
            _decide(r, CLEARED)
            assert await relay.deliver() == 1
        async with relays(redis_url, AlertWebhooks([steady.url, other.url])) as [relay]:
            relay.lead([DEP], start=False)
            assert await relay.deliver() == 0  # listed again: after the newest event
            assert _heard(other) == ["firing"]


@pytest.mark.integration
async def test_events_a_url_refuses_past_give_up_s_are_skipped(
    r: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with WebhookReceiver(fail_first=1000) as refusing:
        # a receiver's credentials, a chat's token in the path: logged in full (a probe)
        secret = refusing.url.replace("http://", "http://hookuser:HOOKSECRET@") + "/T0/TOKEN"
        hooks = AlertWebhooks([secret], give_up_s=0.3)
        async with relays(redis_url, hooks) as [relay]:
            relay.lead([DEP], start=False)
            await relay.deliver()
            _decide(r, RAISED, CLEARED)
            assert await relay.deliver() == 0  # the first refusal starts the clock
            await asyncio.sleep(0.35)  # the firing is given up; the resolved gets its own time
            assert await relay.deliver() == 0 and relay.skipped == 1 and relay.sent == 0
            await asyncio.sleep(0.35)
            assert await relay.deliver() == 0 and relay.skipped == 2
            assert await relay.deliver() == 0 and relay.skipped == 2  # not tried again
    assert "giving up" in caplog.text and "alert webhook http://127.0.0.1:" in caplog.text
    assert "HOOKSECRET" not in caplog.text and "TOKEN" not in caplog.text


def test_no_urls_means_no_task() -> None:
    async def main() -> None:
        relay = DriftRelay(None, AlertWebhooks([]))  # type: ignore[arg-type]
        relay.lead([DEP])
        assert await relay.deliver() == 0
        await relay.close()

    asyncio.run(main())
