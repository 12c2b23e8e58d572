"""The compact outcome a label is joined to, and the labelled-stream entry (pure)."""

from __future__ import annotations

import pytest

from rendezvous.decision import BinOutput, DecisionRecord
from rendezvous.outcomes import (
    LABEL_FIELD,
    OUTCOME_FIELD,
    REQUEST_FIELD,
    Label,
    Outcome,
    OutcomeFormatError,
    decode_labelled,
    encode_record,
)


def _record(**outputs: BinOutput) -> DecisionRecord:
    return DecisionRecord("r-1", "dep", 1_700_000_000_123.4, "real", "real", 2.0, outputs, (), {})


def test_the_fast_encoding_is_the_outcomes_and_keeps_what_each_bin_answered() -> None:
    record = _record(
        real=BinOutput("m", 2, 0.1, 0.2, 1.0, [1, 0], [[0.1, 0.9], [0.75, 0.25]]),
        canary=BinOutput("m", 1, 0.1, 0.2, 1.0, error="timeout in the worker"),
        cand=BinOutput("n", 7, 0.1, 0.2, 1.0, [2, 2], [[0.1, 0.2, 0.7], [0, 0, 1]]),
    )
    blob = encode_record(record)
    assert blob == Outcome.of(record).encode()
    outcome = Outcome.decode(blob)  # type: ignore[arg-type]
    assert outcome.ts_ms == 1_700_000_000_123 and outcome.chosen_role == "real"
    assert list(outcome.answers) == ["real", "cand"] and outcome.rows == 2
    assert outcome.answers["cand"].model_key == "n:7"
    assert outcome.answers["cand"].probabilities[1] == [0, 0, 1]
    assert outcome.answers["real"].probabilities[1] == pytest.approx([0.75, 0.25])
    assert len(blob) < len(record.encode()[b"m"]) / 2  # type: ignore[arg-type]
    assert encode_record(_record(canary=BinOutput("m", 1, 0.1, 0.2, 1.0, error="x"))) is None


def test_labelled_entries_decode_and_unreadable_ones_are_skipped() -> None:
    record = _record(real=BinOutput("m", 2, 0.1, 0.2, 1.0, [1], [[0.1, 0.9]]))
    good = {REQUEST_FIELD: b"r-1", LABEL_FIELD: Label((1,), None, 2.0, 5).encode(),
            OUTCOME_FIELD: encode_record(record)}  # fmt: skip
    bad = {REQUEST_FIELD: b"r-2", LABEL_FIELD: b"\xc1", OUTCOME_FIELD: b""}
    rows = decode_labelled([(b"1-0", good), (b"2-0", bad), (b"3-0", {})])  # type: ignore[list-item]
    assert [r.request_id for r in rows] == ["r-1"]
    assert rows[0].label == Label((1,), None, 2.0, 5)
    with pytest.raises(OutcomeFormatError):
        Outcome.decode(b"\x93\x01")
