"""A slice of the log bin's archive, named by stream positions so it can be taken again.

A replay or an export asks for a time range (request time, ``enqueued_ms``) or the last N
records; that is resolved once to positions: per input partition (its stream key), the first
and last stream id in the slice. Reading by positions afterwards gives the very same records
however much has been archived since, which is what makes a replay or an export reproducible
(the change-data-capture idea of an offset range instead of a wall-clock range).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from models.archive import ArchiveReader, read_segment, seen_before
from rendezvous import names

MAX_LAST = 10_000_000
"""Largest ``last N``: resolving it holds N positions in memory."""
_SKEW_MS = 300_000
"""Slack between the clocks that stamp stream ids, requests and segment names (5 minutes):
a segment is skipped only when all of it is surely older than the slice."""


class SliceError(ValueError):
    """A range or position that names no slice (said to the caller as a 4xx or an exit)."""


def parse_time(value: Any, what: str) -> float:
    """Epoch milliseconds from epoch ms (a number, or digits) or ISO-8601 (naive means UTC)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SliceError(f"{what}: {value!r} is not a time (ISO-8601 or epoch ms)")
    ms: float | None = None
    if isinstance(value, int | float):
        return epoch_ms(value, what)
    elif _EPOCH_MS.fullmatch(value.strip()):  # digits, perhaps with a fraction (a to_ms)
        ms = float(value.strip())
    else:
        text = value.strip()
        try:
            when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            ms = when.timestamp() * 1000
        except (ValueError, OverflowError):
            raise SliceError(
                f"{what}: {value!r} is neither ISO-8601 (2026-12-01T10:00:00Z) nor epoch ms"
            ) from None
    return epoch_ms(ms, what, value)


def epoch_ms(value: float, what: str, given: Any = None) -> float:
    """A number of epoch milliseconds, or a SliceError saying it is out of range (NaN, an
    infinity, below 0, beyond 2**53, or an integer too large for a float: a 500 in a
    probe)."""
    try:
        ms = float(value)
    except OverflowError:
        ms = math.inf
    if not 0 <= ms < 2**53:  # NaN too
        shown = repr(value if given is None else given)
        raise SliceError(f"{what}: {shown[:40]} is out of range (epoch ms from 0)")
    return ms


_EPOCH_MS = re.compile(r"[0-9]{1,20}(\.[0-9]{1,6})?")
_STREAM_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")


def sid_key(stream_id: str) -> tuple[int, int]:
    """A stream id (``ms-seq``, each part a 64-bit unsigned number, as Redis takes them) as a
    sortable pair."""
    found = _STREAM_ID.fullmatch(stream_id)
    if found is not None:
        ms, seq = int(found[1]), int(found[2] or 0)
        if ms < 2**64 and seq < 2**64:
            return ms, seq
    raise SliceError(f"{stream_id[:64]!r} is not a stream id (ms-seq, each below 2**64)")


@dataclass(frozen=True, slots=True)
class Span:
    """The records of one input partition in a slice: between two stream ids, and, for a
    slice chosen by time, requested in ``[from_ms, to_ms]`` too. Request times and stream ids
    do not always go together (a request stamped later may reach Redis first, across a Redis
    stall): by the ids alone, windows laid end to end shared 93 of 4,293 requests in a
    helper's probe."""

    first: str
    last: str
    records: int = 0
    from_ms: float | None = None
    to_ms: float | None = None
    """Inclusive to the end of its millisecond, as ``resolve``'s."""

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"first": self.first, "last": self.last, "records": self.records}
        if self.from_ms is not None:
            doc["from_ms"] = self.from_ms
        if self.to_ms is not None:
            doc["to_ms"] = self.to_ms
        return doc

    def holds(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record``'s request time is within the span's (its ids are checked apart)."""
        return in_window(record, self.from_ms, self.to_ms)


def in_window(record: Mapping[str, Any], from_ms: float | None, to_ms: float | None) -> bool:
    """``record`` requested in ``[from_ms, to_ms]``, ``to_ms`` to the end of its millisecond
    (request times have fractions: ``--to`` at the millisecond an export printed as a
    record's ``time``, 852 for 852.013, left it out); None: no bound."""
    if from_ms is None and to_ms is None:
        return True
    at_ms = record.get("enqueued_ms", record.get("archived_ms"))
    if not isinstance(at_ms, int | float):
        return False
    if from_ms is not None and at_ms < from_ms:
        return False
    return to_ms is None or at_ms < math.floor(to_ms) + 1


Positions = dict[str, Span]
"""Input stream key -> its span."""


def positions_from(doc: Any, deployment: str | None = None, empty_ok: bool = False) -> Positions:
    """Positions from their JSON form (``{stream: {"first", "last"}}``, as reports and exports
    print them); a SliceError says what is wrong. With ``deployment``, every stream is one of
    its input partitions (another would select nothing). ``empty_ok``: ``{}`` is the empty
    slice (an export of a window with nothing in it names none, and taking it again is empty
    too)."""
    if not isinstance(doc, Mapping) or not (doc or empty_ok):
        raise SliceError('positions: expected {"<stream>": {"first": id, "last": id}, ...}')
    out: Positions = {}
    for stream, span in doc.items():
        if not isinstance(stream, str) or not isinstance(span, Mapping):
            raise SliceError(f"positions: {stream!r} needs an object with first and last")
        if deployment is not None and not names.is_input_stream(deployment, stream):
            raise SliceError(
                f"positions: {stream[:200]!r} is not an input stream of {deployment} "
                f"(partition 0 is {names.input_stream(deployment)})"
            )
        first, last = span.get("first"), span.get("last")
        if not isinstance(first, str) or not isinstance(last, str):
            raise SliceError(f"positions of {stream}: first and last must be stream ids")
        if sid_key(first) > sid_key(last):
            raise SliceError(f"positions of {stream}: first {first} is after last {last}")
        records = span.get("records")
        bounds = [span.get("from_ms"), span.get("to_ms")]
        if any(b is not None and (isinstance(b, bool) or not isinstance(b, int | float))
               for b in bounds):  # fmt: skip
            raise SliceError(f"positions of {stream}: from_ms and to_ms must be epoch ms")
        # NaN and infinities too: accepted, a replay failed later on math.floor (a probe)
        from_ms, to_ms = (
            None if b is None else epoch_ms(b, f"positions of {stream}: {name}")
            for b, name in zip(bounds, ("from_ms", "to_ms"), strict=True)
        )
        if from_ms is not None and to_ms is not None and from_ms > to_ms:
            raise SliceError(f"positions of {stream}: from_ms {from_ms} is after to_ms {to_ms}")
        out[stream] = Span(first, last, records if isinstance(records, int) else 0, *bounds)
    return out


def positions_json(positions: Positions) -> dict[str, dict[str, Any]]:
    return {stream: span.to_dict() for stream, span in sorted(positions.items())}


def _stream(record: Mapping[str, Any], deployment: str) -> str:
    return str(record.get("stream") or names.input_stream(deployment))


def _records(
    reader: ArchiveReader, deployment: str, not_before_ms: float | None
) -> Iterator[dict[str, Any]]:
    """Every record in archive order, what was archived twice dropped (``seen_before``: a
    redelivery, an append sent again, a job run again), skipping the segments that surely
    hold nothing at or after ``not_before_ms``: last written (mtime) before it, so every
    record in them was archived, hence requested, earlier (whichever log bin wrote them)."""
    seen: set[tuple[Any, ...]] = set()
    for segment in reader.segments(deployment):
        if not_before_ms is not None:
            try:
                written_ms = segment.path.stat().st_mtime * 1000
            except FileNotFoundError:
                continue
            if written_ms + _SKEW_MS < not_before_ms:
                continue
        for record in read_segment(segment.path):
            if not isinstance(record.get("stream_id"), str) or seen_before(record, seen):
                continue
            yield record


def resolve(
    reader: ArchiveReader,
    deployment: str,
    *,
    from_ms: float | None = None,
    to_ms: float | None = None,
    last: int | None = None,
    tick: Callable[[], None] | None = None,
) -> Positions:
    """The positions of the records requested in ``[from_ms, to_ms]`` (``in_window``), or of
    the last ``last`` records archived (within that range, if given). ``tick`` is called every
    thousand records (a long resolution keeps its lease and can be stopped)."""
    if from_ms is not None and to_ms is not None and from_ms > to_ms:
        raise SliceError("from is after to")
    chosen: collections.deque[tuple[str, str]] | list[tuple[str, str]]
    chosen = collections.deque(maxlen=last) if last else []
    for n, record in enumerate(_records(reader, deployment, from_ms), 1):
        if tick is not None and n % 1000 == 0:
            tick()
        if not in_window(record, from_ms, to_ms):
            continue
        chosen.append((_stream(record, deployment), record["stream_id"]))
    spans: dict[str, list[str]] = {}
    for stream, sid in chosen:
        span = spans.setdefault(stream, [sid, sid])
        if sid_key(sid) < sid_key(span[0]):
            span[0] = sid
        if sid_key(sid) > sid_key(span[1]):
            span[1] = sid
    by_time = (None, None) if last else (from_ms, to_ms)  # the last N: by position alone
    return count(reader, deployment, {s: Span(a, b, 0, *by_time) for s, (a, b) in spans.items()})


def count(reader: ArchiveReader, deployment: str, positions: Positions) -> Positions:
    """The positions with the records within each span counted (one pass over the archive)."""
    counts = collections.Counter(_stream(r, deployment) for r in read(reader, deployment,
                                                                      positions))  # fmt: skip
    return {s: Span(span.first, span.last, counts[s], span.from_ms, span.to_ms)
            for s, span in positions.items()}  # fmt: skip


def read(reader: ArchiveReader, deployment: str, positions: Positions) -> Iterator[dict[str, Any]]:
    """The records within ``positions``, in archive order (the same order every time)."""
    if not positions:
        return
    bounds = {s: (sid_key(span.first), sid_key(span.last)) for s, span in positions.items()}
    earliest_ms = min(lo[0] for lo, _ in bounds.values())
    for record in _records(reader, deployment, earliest_ms):
        bound = bounds.get(_stream(record, deployment))
        if bound is None:
            continue
        key = sid_key(record["stream_id"])
        if bound[0] <= key <= bound[1] and positions[_stream(record, deployment)].holds(record):
            yield record
