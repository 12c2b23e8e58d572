"""The schedule, without Redis or clocks."""

import pytest

from rendezvous.schedule import Schedule, decide

S = Schedule(real_deadline_ms=50, timeout_ms=1000, fallbacks=("canary", "backup"), grace_ms=100)


def test_real_answers_as_soon_as_it_arrives() -> None:
    assert decide(S, {"real"}, set(), 1.0).answer == "real"
    assert decide(S, {"real", "canary"}, set(), 900.0).answer == "real"


def test_before_real_deadline_a_fallback_is_not_used() -> None:
    v = decide(S, {"canary"}, set(), 10.0)
    assert v.answer is None and not v.timed_out
    assert v.wait_until_ms == 50


def test_after_real_deadline_first_fallback_that_answered_wins_in_order() -> None:
    assert decide(S, {"canary"}, set(), 50.0).answer == "canary"
    assert decide(S, {"backup"}, set(), 60.0).answer == "backup"
    assert decide(S, {"backup", "canary"}, set(), 60.0).answer == "canary"


def test_after_real_deadline_without_fallback_waits_until_timeout() -> None:
    v = decide(S, set(), set(), 60.0)
    assert v.answer is None and v.wait_until_ms == 1000


def test_a_patient_schedule_waits_for_real_as_long_keeping_the_fallbacks_margin() -> None:
    job = S.patient(30_000)
    assert (job.real_deadline_ms, job.timeout_ms) == (29_050, 30_000)
    assert decide(S, set(), set(), 5_000.0).timed_out
    assert decide(job, {"canary"}, set(), 5_000.0).wait_until_ms == 29_050  # real, busy
    assert decide(job, {"canary"}, set(), 29_050.0).answer == "canary"
    assert decide(job, {"canary"}, {"real"}, 60.0).answer == "canary"  # real failed: at once
    assert decide(job, set(), set(), 29_500.0).wait_until_ms == 30_000
    assert S.patient(10) is S and S.patient(10**9).timeout_ms == 600_000


def test_a_role_that_is_not_a_fallback_never_answers() -> None:
    v = decide(S, {"challenger"}, set(), 500.0)
    assert v.answer is None


def test_timeout_when_nobody_answered() -> None:
    v = decide(S, set(), set(), 1000.0)
    assert v.timed_out and v.answer is None
    assert decide(S, {"challenger"}, set(), 1500.0).timed_out


def test_failed_real_falls_back_without_waiting_for_its_deadline() -> None:
    assert decide(S, {"canary"}, {"real"}, 1.0).answer == "canary"
    v = decide(S, set(), {"real"}, 1.0)
    assert v.answer is None and v.wait_until_ms == 1000


def test_failed_fallback_is_skipped() -> None:
    assert decide(S, {"backup"}, {"real", "canary"}, 60.0).answer == "backup"


def test_when_every_role_that_may_answer_failed_there_is_nothing_to_wait_for() -> None:
    """It waited for the timeout (a 504 a second later) though no answer could come."""
    v = decide(S, set(), {"real", "canary", "backup"}, 1.0)
    assert v.timed_out and v.failed and v.reason == "real, canary, backup failed"
    still = decide(S, set(), {"real", "canary"}, 1.0)  # backup may still answer
    assert not still.timed_out and still.wait_until_ms == S.timeout_ms


@pytest.mark.parametrize(
    "kwargs",
    [
        {"real_deadline_ms": 0},
        {"real_deadline_ms": 100, "timeout_ms": 50},
        {"grace_ms": -1},
        {"fallbacks": ("real",)},
        {"fallbacks": ("Bad Role",)},
    ],
)
def test_invalid_schedules_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Schedule(**kwargs)


def test_round_trips_through_a_dict() -> None:
    assert Schedule.from_dict(S.to_dict()) == S


def test_a_pinned_role_alone_answers_until_the_timeout() -> None:
    """A request that names its model version: real's answer (or any other) never stands in
    for the pinned role's, its failure is a failure at once, and the wait ends at the
    timeout, not at real's deadline; the split never applies."""
    base = Schedule(real_deadline_ms=50, timeout_ms=1000, fallbacks=("canary",),
                    splits=(("b", 0.5),))  # fmt: skip
    pinned = base.pinned_to("canary")
    assert pinned.to_dict()["splits"] == {} and pinned.primary == "canary"
    waiting = decide(pinned, {"real", "b"}, set(), 400)
    assert waiting.answer is None and waiting.wait_until_ms == 1000
    answered = decide(pinned, {"real", "canary"}, set(), 10)
    assert (answered.answer, answered.outcome) == ("canary", "pinned")
    failed = decide(pinned, {"real"}, {"canary"}, 10)
    assert failed.timed_out and failed.failed and failed.answer is None
    assert decide(pinned, {"real"}, set(), 1000).timed_out
    assert decide(base.pinned_to("real"), {"real"}, set(), 1).outcome == "real"
    assert "pinned" not in pinned.to_dict()  # per request, never stored
