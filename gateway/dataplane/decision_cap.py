"""How many records a deployment's decisions stream keeps: at most ``max_records``, and fewer
when records are large, so that the stream stays within about ``max_bytes`` of Redis memory.

A record's size follows the rows of its request: one row is about 0.65 KB, a 100-row request
(every bin's probabilities, the out-of-distribution score of each row, the divergences) over
10 KB, and 50,000 of those would hold half a gigabyte of Redis. ``XADD``'s ``MAXLEN`` counts
entries, so the count is derived from a moving mean of each deployment's record sizes.
"""

from __future__ import annotations

ENTRY_OVERHEAD_BYTES = 64
"""Redis's own cost of a stream entry beyond its field's bytes (id, listpack headers)."""
SMOOTHING = 1 / 64
"""Weight of each new record in the mean size: it follows a change of request sizes within a
few hundred records, and one odd record moves the cap by under 2 %."""


class DecisionCap:
    def __init__(self, max_records: int, max_bytes: int | None = None, floor: int = 100):
        self.max_records = max_records
        self.max_bytes = max_bytes
        """None: the count alone."""
        self.floor = min(floor, max_records)
        """Records kept however large they are (what the promotion gate and ``rdv decisions``
        need to read)."""
        self._mean: dict[str, float] = {}

    def maxlen(self, deployment: str, record_bytes: int) -> int:
        """The stream's cap, given the size of the record about to be written."""
        if self.max_bytes is None:
            return self.max_records
        mean = self._mean.get(deployment)
        mean = float(record_bytes) if mean is None else mean + (record_bytes - mean) * SMOOTHING
        self._mean[deployment] = mean
        fits = int(self.max_bytes / (mean + ENTRY_OVERHEAD_BYTES))
        return max(self.floor, min(self.max_records, fits))
