"""When a lease holder looks at a deployment's stream: every tick while looks find something,
after the quiet wait once one found nothing (``gateway.observability.look_schedule``)."""

from __future__ import annotations

from gateway.observability.look_schedule import LookSchedule


def test_a_deployment_never_looked_at_is_due() -> None:
    looks = LookSchedule(tick_s=0.5, quiet_s=2.0)
    assert looks.due(["a", "b"], now=100.0) == ["a", "b"]


def test_news_is_looked_at_every_tick_and_quiet_after_the_quiet_wait() -> None:
    looks = LookSchedule(tick_s=0.5, quiet_s=2.0)
    looks.looked("busy", 100.0, news=True)
    looks.looked("idle", 100.0, news=False)
    assert looks.due(["busy", "idle"], 100.2) == []
    assert looks.due(["busy", "idle"], 100.45) == ["busy"]  # a tick a little early is in time
    assert looks.due(["busy", "idle"], 101.5) == ["busy"]
    assert looks.due(["busy", "idle"], 101.8) == ["busy", "idle"]  # the fourth tick, ~102 s


def test_soon_brings_a_quiet_deployment_to_the_next_tick_and_keep_only_forgets() -> None:
    looks = LookSchedule(tick_s=0.5, quiet_s=2.0)
    looks.looked("a", 100.0, news=False)
    looks.looked("b", 100.0, news=False)
    looks.soon("a")
    assert looks.due(["a", "b"], 100.5) == ["a"]
    looks.keep_only(["a"])
    assert looks.due(["b"], 100.5) == ["b"]  # forgotten: as if never looked at


def test_the_quiet_wait_is_never_shorter_than_a_tick() -> None:
    looks = LookSchedule(tick_s=1.0, quiet_s=0.2)
    looks.looked("a", 100.0, news=False)
    assert looks.due(["a"], 100.4) == [] and looks.due(["a"], 100.6) == ["a"]
