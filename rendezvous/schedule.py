"""The schedule: which answer a waiting request gets, and when.

Pure logic, no clocks and no I/O: the matcher asks ``decide`` each time something happens
(a result arrives, a timer fires) and acts on the verdict.

An optional A/B split lets challengers answer a fraction of requests. The draw is a hash of
the deployment's split seed and the request id, so the same request id always lands on the
same side (a replay is reproducible) and no random state is shared between gateways.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from rendezvous.names import CANARY, REAL, check_role
from rendezvous.spec import unknown_fields

MAX_WAIT_MS = 600_000.0
"""The longest ``timeout_ms``, ``real_deadline_ms`` and ``grace_ms`` a schedule is given: ten
minutes, which a synchronous predict holds its caller that long at most (longer work is what
async jobs are for). Unbounded, a deadline of 1e300 ms was taken and made every predict a 500:
its absolute time does not fit the envelope's integer."""

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
"""``split_seed`` fits a signed 64-bit integer, as the decision record carries it (a seed of
2**64 was taken and every decision record of the deployment was lost)."""


_STORED_FIELDS = frozenset({"real_deadline_ms", "timeout_ms", "fallbacks", "grace_ms", "splits",
                            "split_seed"})  # fmt: skip


def split_draw(seed: int, request_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, request id)."""
    digest = hashlib.sha256(f"{seed}\x1f{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True, slots=True)
class Schedule:
    """(model, accept-until) pairs in the book's terms: the primary (real, unless the split
    drew a challenger) until ``real_deadline_ms``, then the first fallback that has answered,
    and a hard stop at ``timeout_ms``."""

    real_deadline_ms: float = 50.0
    timeout_ms: float = 1000.0
    fallbacks: tuple[str, ...] = ("canary",)
    grace_ms: float = 200.0
    """After the answer, how long to wait for the other bins before the decision record."""
    splits: tuple[tuple[str, float], ...] = ()
    """A/B split: (challenger role, fraction of requests it answers). Real answers the rest."""
    split_seed: int = 0
    primary: str = REAL
    """Per request (never stored): the role that answers first."""
    draw: float | None = None
    """Per request (never stored): the split draw that chose ``primary``."""
    pinned: bool = False
    """Per request (never stored): ``primary`` alone may answer (``pinned_to``)."""
    more: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Stored fields a newer version wrote, written back as they came (``unknown_fields``);
    not compared, nor hashed (``among`` is cached by schedule)."""

    def __post_init__(self) -> None:
        if not 0 < self.real_deadline_ms <= self.timeout_ms:
            raise ValueError("need 0 < real_deadline_ms <= timeout_ms")
        if self.grace_ms < 0:
            raise ValueError("grace_ms must be >= 0")
        for role in self.fallbacks:
            check_role(role)
            if role == REAL:
                raise ValueError("real cannot be its own fallback")
        seen: set[str] = set()
        for role, fraction in self.splits:
            check_role(role)
            if role in (REAL, CANARY):
                raise ValueError(f"a split goes to a challenger, not to {role}")
            if role in seen:
                raise ValueError(f"role {role} appears twice in the split")
            seen.add(role)
            if not 0 < fraction <= 1:
                raise ValueError(f"split fraction of {role} must lie in (0, 1], got {fraction}")
        if sum(f for _, f in self.splits) > 1 + 1e-9:
            raise ValueError("split fractions add up to more than 1")

    @property
    def split_roles(self) -> list[str]:
        return [role for role, _ in self.splits]

    def to_dict(self) -> dict[str, Any]:
        return {
            "real_deadline_ms": self.real_deadline_ms,
            "timeout_ms": self.timeout_ms,
            "fallbacks": list(self.fallbacks),
            "grace_ms": self.grace_ms,
            "splits": dict(self.splits),
            "split_seed": self.split_seed,
            **self.more,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Schedule:
        splits = doc.get("splits") or {}
        return cls(
            real_deadline_ms=float(doc.get("real_deadline_ms", 50.0)),
            timeout_ms=float(doc.get("timeout_ms", 1000.0)),
            fallbacks=tuple(doc.get("fallbacks", ("canary",))),
            grace_ms=float(doc.get("grace_ms", 200.0)),
            splits=tuple((str(r), float(f)) for r, f in dict(splits).items()),
            split_seed=int(doc.get("split_seed", 0)),
            more=unknown_fields(doc, _STORED_FIELDS),
        )

    def updated(self, changes: Mapping[str, Any]) -> Schedule:
        """This schedule with the stored fields in ``changes`` replaced (validated again)."""
        return Schedule.from_dict({**self.to_dict(), **changes})

    def patient(self, timeout_ms: float) -> Schedule:
        """This request's schedule stretched to a hard stop at ``timeout_ms`` when that is
        later: an async job's, whose caller does not wait on the line. The primary's deadline
        moves as far, so that the fallbacks keep their margin before the stop and a busy
        real still answers (a fallback answers at once where the primary failed)."""
        stop = min(float(timeout_ms), MAX_WAIT_MS)
        if stop <= self.timeout_ms:
            return self
        later = stop - self.timeout_ms
        return dataclasses.replace(
            self, timeout_ms=stop, real_deadline_ms=self.real_deadline_ms + later
        )

    def without_role(self, role: str) -> Schedule:
        """Drop a role that left the deployment from the split and the fallbacks: the
        schedule then names only roles an operator could set again (a fallback left behind
        was refused when the same schedule was sent back), and a new role that later takes
        the name is not a fallback until made one."""
        return dataclasses.replace(
            self,
            splits=tuple(s for s in self.splits if s[0] != role),
            fallbacks=tuple(f for f in self.fallbacks if f != role),
        )

    def among(self, roles: Collection[str]) -> Schedule:
        """This schedule without the fallbacks that are not among ``roles``: the default
        ``canary`` of a deployment that has none could neither answer nor fail, so a real that
        failed left its callers waiting out the timeout for a 504 rather than a 502 at once
        (found by a helper's probe). Kept in the stored schedule: a canary a promotion makes
        is a fallback from then on."""
        if all(role in roles for role in self.fallbacks):
            return self
        return _among(self, tuple(roles))  # per request: 5 us made afresh, 1 us remembered

    def pinned_to(self, role: str) -> Schedule:
        """The schedule of a request that names the model version to answer it (the Open
        Inference Protocol's versioned infer): that role alone, until the timeout; no split,
        no fallback (502 if it fails, 504 if it does not answer)."""
        return dataclasses.replace(self, primary=role, pinned=True, fallbacks=(), splits=(),
                                   draw=None, real_deadline_ms=self.timeout_ms)  # fmt: skip

    def for_request(self, request_id: str) -> Schedule:
        """The schedule of one request: the split decides who answers first."""
        if not self.splits:
            return self
        u = split_draw(self.split_seed, request_id)
        edge = 0.0
        for role, fraction in self.splits:
            edge += fraction
            if u < edge:
                return dataclasses.replace(self, primary=role, draw=u)
        return dataclasses.replace(self, primary=REAL, draw=u)


@dataclass(frozen=True, slots=True)
class Verdict:
    """``answer`` names the role to answer with; else ``timed_out``; else wait until
    ``wait_until_ms`` (elapsed time) unless another result arrives first."""

    answer: str | None = None
    timed_out: bool = False
    failed: bool = False
    """With ``timed_out``: every role that may answer has failed, so there is nothing to wait
    for (the answer comes at once, not at the timeout)."""
    wait_until_ms: float | None = None
    reason: str = field(default="")
    outcome: str = ""
    """``real``, ``split`` (a challenger drawn by the split answered) or ``fallback``."""


def _answer(schedule: Schedule, role: str, reason: str) -> Verdict:
    if role == REAL:
        outcome = "real"
    elif schedule.pinned:
        outcome = "pinned"
    elif role == schedule.primary:
        outcome = "split"
    else:
        outcome = "fallback"
    return Verdict(answer=role, reason=reason, outcome=outcome)


def decide(
    schedule: Schedule,
    answered: Collection[str],
    failed: Collection[str],
    elapsed_ms: float,
) -> Verdict:
    """What to do now, given the roles that answered, those that reported a failure, and the
    time since the request arrived."""
    primary = schedule.primary
    if primary in answered:
        return _answer(schedule, primary, f"{primary} answered")
    primary_is_out = primary in failed or elapsed_ms >= schedule.real_deadline_ms
    if primary_is_out:
        order = schedule.fallbacks
        if primary != REAL and not schedule.pinned:
            order = (REAL, *(r for r in schedule.fallbacks if r != primary))
        for role in order:
            if role in answered:
                why = f"{primary} failed" if primary in failed else f"{primary} missed its deadline"
                return _answer(schedule, role, f"{why}; {role} answered")
        if primary in failed and all(role in failed for role in order):
            return Verdict(timed_out=True, failed=True,
                           reason=f"{', '.join((primary, *order))} failed")  # fmt: skip
    if elapsed_ms >= schedule.timeout_ms:
        return Verdict(timed_out=True, reason="no bin answered before the timeout")
    if not primary_is_out:
        return Verdict(wait_until_ms=schedule.real_deadline_ms)
    return Verdict(wait_until_ms=schedule.timeout_ms)


@functools.lru_cache(maxsize=256)
def _among(schedule: Schedule, roles: tuple[str, ...]) -> Schedule:
    kept = tuple(r for r in schedule.fallbacks if r in roles)
    return dataclasses.replace(schedule, fallbacks=kept)
