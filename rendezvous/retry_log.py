"""A failure met again at every retry, logged the way an operator reads it.

The loops that ride out a Redis outage retry every 0.05-0.25 s, and each logged every try:
an outage of seven seconds wrote about 290 lines from one ``rdv serve``, a five-minute one
would write twelve thousand. A loop now says when its failure starts (or turns into another),
once every ``REPEAT_S`` while it lasts, with how long and how many tries, and when it ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

REPEAT_S = 30.0
"""How often a failure that lasts is said again."""

KINDS_SAID = 8
"""Distinct messages said at once in one spell of failures; past them, only the repeats."""


class RetryLog:
    """The log of one retrying loop: ``failed`` at each failed try, ``succeeded`` after each
    try that worked (cheap when nothing failed)."""

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        repeat_s: float = REPEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._what = what
        self._repeat_s = repeat_s
        self._clock = clock
        self._since: float | None = None
        """When the failures began (None: the last try worked)."""
        self._tries = 0
        self._said: set[str] = set()
        self._say_again_at = 0.0
        self._recovered_at = -math.inf
        """When "working again" was last said."""
        self._flapping = False
        """This spell is the failure said before, back within ``repeat_s`` of the line that
        said it ended (writes refused on and off at a memory limit): not said as a pair of
        lines a flip, but counted, and said at most every ``repeat_s``."""
        self._flaps = 0
        """Such spells since "working again" was last said."""
        self._recovery_unsaid = False
        """A flapping spell ended and nothing said so yet: said by the next ``succeeded``
        past ``repeat_s``, so the log's last word on the loop is true."""

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(
        self,
        why: object,
        retry_in_s: float | None = None,
        level: int = logging.WARNING,
        exc_info: BaseException | None = None,
    ) -> None:
        now = self._clock()
        text = str(why)
        if self._since is None:
            recent = self._recovery_unsaid or now - self._recovered_at < self._repeat_s
            self._flapping = recent and text in self._said
            self._since, self._tries, self._recovery_unsaid = now, 0, False
            if self._flapping:
                self._flaps += 1
            else:
                self._said, self._flaps = set(), 0
        self._tries += 1
        then = "" if retry_in_s is None else f"; retrying in {retry_in_s:.2f}s"
        if text not in self._said and len(self._said) < KINDS_SAID:
            self._said.add(text)
        elif now < self._say_again_at:
            return
        elif self._flapping:
            since = now - self._recovered_at
            text = f"failing again ({self._flaps} times in {since:.0f}s): {text}"
        else:
            lasted = now - self._since
            text = f"still failing after {lasted:.0f}s ({self._tries} tries): {text}"
        self._say_again_at = now + self._repeat_s
        self._log.log(level, "%s: %s%s", self._what, text, then, exc_info=exc_info)

    def succeeded(self) -> None:
        if self._since is None:  # cheap when nothing failed: a predict's admission calls it
            if self._recovery_unsaid and (now := self._clock()) >= self._say_again_at:
                since = now - self._recovered_at
                self._said_working(f"(it failed and recovered {self._flaps} times in {since:.0f}s)")
            return
        now = self._clock()
        lasted, self._since = now - self._since, None
        if self._flapping and now < self._say_again_at:
            self._recovery_unsaid = True
            return
        tries = "1 failed try" if self._tries == 1 else f"{self._tries} failed tries"
        flaps = f"; it failed and recovered {self._flaps} times" if self._flaps else ""
        self._said_working(f"after {lasted:.1f}s ({tries}{flaps})")

    def _said_working(self, how: str) -> None:
        now = self._clock()
        self._log.info("%s: working again %s", self._what, how)
        self._recovered_at, self._say_again_at = now, now + self._repeat_s
        self._flaps, self._recovery_unsaid = 0, False


class OncePerSpell(logging.Filter):
    """A logger's same message (its template) at most ``burst`` times every ``repeat_s``, the
    first one after saying how many were held back: redis-py's cluster client logs each failed
    topology refresh, twice a second while a cluster refuses the user (a helper's probe)."""

    def __init__(
        self,
        repeat_s: float = REPEAT_S,
        clock: Callable[[], float] = time.monotonic,
        burst: int = 1,
    ):
        super().__init__()
        self.repeat_s = repeat_s
        self.clock = clock
        self.burst = burst
        self._said: dict[str, tuple[float, int, int]] = {}
        """Template -> when its spell began, the lines said in it, the lines held back."""

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = self.clock()
        began, told, held = self._said.get(key, (-math.inf, 0, 0))
        if now - began < self.repeat_s:
            if told >= self.burst:
                self._said[key] = (began, told, held + 1)
                return False
            self._said[key] = (began, told + 1, held)
            return True
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {now - began:.0f} s)"
        self._said[key] = (now, 1, 0)
        if len(self._said) > 100:  # templates, not values: a few; bounded all the same
            self._said.pop(next(iter(self._said)))
        return True

    def reset(self) -> None:
        """Every template unsaid (a test that reads the lines)."""
        self._said.clear()


SAID_ONCE: set[str] = set()
"""The warnings this process has said (``warn_once``)."""


def warn_once(log: logging.Logger, key: str, msg: str, *args: object) -> None:
    """A warning a process says once, however many clients it connects or checks it runs
    (each connect said one: 16 lines a start; a helper's probe)."""
    if key not in SAID_ONCE:
        SAID_ONCE.add(key)
        log.warning(msg, *args)


NOISY_LOGGERS = ("redis.cluster", "redis.asyncio.cluster")
"""Third-party loggers that log every retry of theirs."""


def quiet_noisy_loggers(repeat_s: float = REPEAT_S) -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(OncePerSpell(repeat_s))
