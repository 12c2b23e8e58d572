"""When a lease holder next looks at each deployment's stream: every tick while looks find
something new, less often once one found nothing.

The drift monitor (its sketches and the log bins' events) and live accuracy (the labelled
stream) each looked at every deployment they lead every half second. With twenty idle
deployments those looks were about a third of an idle gateway's CPU (2.6-2.9 % of a core for
its two processes against 1.8-2.2 % at one look every 2 s; ``benchmarks/PROFILE.md``). A
deployment whose last look found nothing is looked at after ``quiet_s`` instead: news waits at
most that long to be noticed after a quiet spell, and not at all while it flows."""

from __future__ import annotations

from collections.abc import Collection, Iterable


class LookSchedule:
    """Per deployment, the monotonic time of its next look."""

    def __init__(self, tick_s: float, quiet_s: float):
        self.tick_s = tick_s
        self.quiet_s = max(quiet_s, tick_s)
        self._next: dict[str, float] = {}

    def due(self, deployments: Iterable[str], now: float) -> list[str]:
        """Those of ``deployments`` to look at now (a deployment never looked at is due)."""
        return [d for d in deployments if now >= self._next.get(d, -1.0)]

    def looked(self, deployment: str, now: float, *, news: bool) -> None:
        """A look at ``deployment`` found something new (look again next tick) or nothing.
        The next look is set a little before its time, so that it falls due at the tick it
        is meant for and not at the one after (ticks are ``tick_s`` apart, not exactly)."""
        wait = self.tick_s if news else self.quiet_s
        self._next[deployment] = now + wait - self.tick_s / 2

    def soon(self, deployment: str) -> None:
        """Look at ``deployment`` at the next tick (something outside its stream moved)."""
        self._next.pop(deployment, None)

    def keep_only(self, deployments: Collection[str]) -> None:
        """Forget deployments no longer led (or gone)."""
        for gone in [d for d in self._next if d not in deployments]:
            del self._next[gone]
