"""The schedule: which answer a waiting request gets, and when.

Pure logic, no clocks and no I/O: the matcher asks ``decide`` each time something happens
(a result arrives, a timer fires) and acts on the verdict.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from rendezvous.names import REAL, check_role


@dataclass(frozen=True, slots=True)
class Schedule:
    """(model, accept-until) pairs in the book's terms: real until ``real_deadline_ms``, then
    the first fallback that has answered, and a hard stop at ``timeout_ms``."""

    real_deadline_ms: float = 50.0
    timeout_ms: float = 1000.0
    fallbacks: tuple[str, ...] = ("canary",)
    grace_ms: float = 200.0
    """After the answer, how long to wait for the other bins before the decision record."""

    def __post_init__(self) -> None:
        if not 0 < self.real_deadline_ms <= self.timeout_ms:
            raise ValueError("need 0 < real_deadline_ms <= timeout_ms")
        if self.grace_ms < 0:
            raise ValueError("grace_ms must be >= 0")
        for role in self.fallbacks:
            check_role(role)
            if role == REAL:
                raise ValueError("real cannot be its own fallback")

    def to_dict(self) -> dict[str, Any]:
        return {
            "real_deadline_ms": self.real_deadline_ms,
            "timeout_ms": self.timeout_ms,
            "fallbacks": list(self.fallbacks),
            "grace_ms": self.grace_ms,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Schedule:
        return cls(
            real_deadline_ms=float(doc.get("real_deadline_ms", 50.0)),
            timeout_ms=float(doc.get("timeout_ms", 1000.0)),
            fallbacks=tuple(doc.get("fallbacks", ("canary",))),
            grace_ms=float(doc.get("grace_ms", 200.0)),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """``answer`` names the role to answer with; else ``timed_out``; else wait until
    ``wait_until_ms`` (elapsed time) unless another result arrives first."""

    answer: str | None = None
    timed_out: bool = False
    wait_until_ms: float | None = None
    reason: str = field(default="")


def decide(
    schedule: Schedule,
    answered: Collection[str],
    failed: Collection[str],
    elapsed_ms: float,
) -> Verdict:
    """What to do now, given the roles that answered, those that reported a failure, and the
    time since the request arrived."""
    if REAL in answered:
        return Verdict(answer=REAL, reason="real answered")
    real_is_out = REAL in failed or elapsed_ms >= schedule.real_deadline_ms
    if real_is_out:
        for role in schedule.fallbacks:
            if role in answered:
                why = "real failed" if REAL in failed else "real missed its deadline"
                return Verdict(answer=role, reason=f"{why}; {role} answered")
    if elapsed_ms >= schedule.timeout_ms:
        return Verdict(timed_out=True, reason="no bin answered before the timeout")
    if not real_is_out:
        return Verdict(wait_until_ms=schedule.real_deadline_ms)
    return Verdict(wait_until_ms=schedule.timeout_ms)
