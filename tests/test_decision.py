"""The decision record (rendezvous.decision): built from the bins' results, its stream form
byte for byte the previous release's (records already in Redis still read, new ones read by an
older reader), and its JSON view the shape ``rdv decisions`` always printed."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rendezvous.decision import (
    FIELD,
    BinOutput,
    DecisionFormatError,
    DecisionRecord,
    SplitDraw,
    build_decision,
    decode_entries,
)
from rendezvous.divergence import divergence
from rendezvous.envelope import ModelResult
from rendezvous.schedule import Schedule

ROLES = ["real", "canary", "shadow", "late"]


def result(
    role: str, version: int, p1: list[float], *, error: str | None = None, arrived: float = 2.5
) -> ModelResult:
    proba = np.array([[1 - p, p] for p in p1], dtype=np.float32)
    return ModelResult("r1", "dep", "m", version, role, [int(p >= 0.5) for p in p1], proba,
                       [0, 1], 0.123456, 0.0421, error=error,
                       extra={"arrived_ms": arrived})  # fmt: skip


RESULTS = {
    "real": result("real", 2, [0.75, 0.1]),
    "canary": result("canary", 1, [0.4, 0.2], arrived=3.25),
    "shadow": result("shadow", 5, [0.0], error="model failed", arrived=4.0),
}


def record(results: dict[str, ModelResult] = RESULTS, **kw: Any) -> DecisionRecord:
    args: dict[str, Any] = dict(request_id="r1", deployment="dep", started_ms=1764000000123.25,
                                expected_roles=ROLES, results=results, chosen_role="real",
                                outcome="real", answered_after_ms=1.5)  # fmt: skip
    return build_decision(**(args | kw))


def proba(r: ModelResult) -> list[list[float]]:
    return [[round(p, 6) for p in row] for row in r.probabilities.tolist()]


def previous_release_map(results: dict[str, ModelResult]) -> dict[str, Any]:
    """What the previous release's ``encode_decision`` packed for ``record(results)``, key for
    key and in its order (written out by hand, not by the code under test)."""

    def output(r: ModelResult) -> dict[str, Any]:
        out: dict[str, Any] = {"model": r.model, "version": r.version,
                               "model_latency_ms": round(r.model_latency_ms, 4),
                               "queue_ms": round(r.queue_ms, 4),
                               "arrived_ms": r.extra["arrived_ms"]}  # fmt: skip
        if r.error is None:
            out["labels"] = r.labels
            out["probabilities"] = proba(r)
        else:
            out["error"] = r.error
        return out

    real = results["real"]
    divergences = {}
    for role, other in results.items():
        if role != "real" and other.error is None:
            d = divergence(real.labels, real.probabilities, other.labels, other.probabilities)
            divergences[role] = {
                "rows": d.rows,
                "disagreements": d.disagreements,
                "disagreement_rate": d.disagreements / d.rows,
                "abs_diff_mean": d.abs_diff_mean,
                "abs_diff_max": d.abs_diff_max,
                "js_mean": d.js_mean,
                "js_max": d.js_max,
                "pair": [f"m:{real.version}", f"m:{other.version}"],
            }
    doc: dict[str, Any] = {
        "request_id": "r1",
        "deployment": "dep",
        "ts_ms": 1764000000123.25,
        "outcome": "real",
        "chosen_role": "real",
        "answered_after_ms": 1.5,
        "outputs": {role: output(r) for role, r in results.items()},
        "missing": [role for role in ROLES if role not in results],
        "failed": [role for role, r in results.items() if r.error is not None],
    }
    if "canary" not in divergences:
        doc["divergence"] = None  # stored once, under divergences, when there is one
    doc["divergences"] = divergences
    return doc


def test_the_record_holds_every_output_the_divergences_and_what_is_missing() -> None:
    rec = record()
    assert rec.missing == ("late",) and rec.failed == ["shadow"]
    real = rec.outputs["real"]
    assert real == BinOutput("m", 2, 0.1235, 0.0421, 2.5, [1, 0], proba(RESULTS["real"]))
    assert real.ok and real.model_key == "m:2"
    assert rec.outputs["shadow"].error == "model failed" and not rec.outputs["shadow"].ok
    assert rec.outputs["shadow"].probabilities is None
    assert set(rec.divergences) == {"canary"} and rec.divergence is rec.divergences["canary"]
    assert rec.divergence.disagreements == 1 and rec.divergence.rows == 2
    assert rec.pair("canary") == ("m:2", "m:1")
    assert rec.split is None and rec.divergence_errors == {}


def test_encode_writes_the_previous_releases_bytes_and_decode_reads_them() -> None:
    for results in (RESULTS, {"real": RESULTS["real"], "shadow": RESULTS["shadow"]}):
        old = msgpack.packb(previous_release_map(results), use_bin_type=True)
        rec = record(results)
        assert rec.encode() == {FIELD: old}
        assert DecisionRecord.decode({FIELD: old}) == rec


def test_records_of_gateways_before_34c06fa_still_read() -> None:
    """They held the real-vs-canary divergence twice: under divergence and divergences."""
    doc = previous_release_map(RESULTS)
    doc = {**doc, "divergence": doc["divergences"]["canary"]}
    assert DecisionRecord.decode({FIELD: msgpack.packb(doc, use_bin_type=True)}) == record()


def test_to_dict_is_the_json_rdv_decisions_prints() -> None:
    rec = record()
    doc = rec.to_dict()
    wire = previous_release_map(RESULTS)
    assert doc == {**wire, "divergence": wire["divergences"]["canary"]}
    assert json.loads(json.dumps(doc)) == doc
    assert DecisionRecord.from_dict(doc) == rec
    # a copy: changing it leaves the record alone
    doc["outputs"]["real"]["probabilities"][0][0] = 9.0
    doc["missing"].append("x")
    assert rec.outputs["real"].probabilities == proba(RESULTS["real"])
    alone = record({"real": RESULTS["real"]}).to_dict()
    assert alone["divergence"] is None and alone["divergences"] == {}


def test_the_split_draw_and_divergence_errors_round_trip() -> None:
    sched = Schedule(splits=(("shadow", 0.5),), split_seed=3).for_request("r1")
    misfit = result("canary", 1, [0.4, 0.2, 0.9])  # three rows against real's two
    rec = record({"real": RESULTS["real"], "canary": misfit}, schedule=sched, outcome="split")
    assert rec.split == SplitDraw(seed=3, draw=sched.draw, assigned=sched.primary)
    assert set(rec.divergence_errors) == {"canary"} and rec.divergences == {}
    doc = msgpack.unpackb(rec.encode()[FIELD], raw=False)
    assert list(doc)[-2:] == ["split", "divergence_errors"]
    assert doc["split"] == {"seed": 3, "draw": sched.draw, "assigned": sched.primary}
    assert DecisionRecord.decode(rec.encode()) == rec


def test_what_is_no_decision_record_is_refused() -> None:
    good = msgpack.unpackb(record().encode()[FIELD], raw=False)
    # The JSON records of the first development builds (field d) were never released.
    with pytest.raises(DecisionFormatError, match="no decision record"):
        DecisionRecord.decode({b"d": json.dumps(good).encode()})
    with pytest.raises(DecisionFormatError, match="undecodable"):
        DecisionRecord.decode({FIELD: b"\xc1 not msgpack"})
    for broken in (
        {k: v for k, v in good.items() if k != "outputs"},
        {**good, "outputs": {k: v for k, v in good["outputs"].items() if k != "canary"}},
        {**good, "split": {"seed": 1}},
        [1, 2],
    ):
        with pytest.raises(DecisionFormatError):
            DecisionRecord.decode({FIELD: msgpack.packb(broken, use_bin_type=True)})


def test_decode_entries_reads_a_range_reply_and_skips_emptied_entries() -> None:
    a, b = record(), record(request_id="r2")
    entries = [(b"1-0", a.encode()), (b"2-0", None), (b"3-0", {}), (b"4-0", b.encode())]
    assert decode_entries(entries) == [a, b]
    assert decode_entries(None) == []


@given(
    latency=st.floats(allow_nan=False, allow_infinity=False),
    queue=st.floats(min_value=-1e6, max_value=1e6),
    p=st.floats(min_value=0, max_value=1, width=32),
)
def test_rounding_is_rounds(latency: float, queue: float, p: float) -> None:
    """The record rounds by formatting (twice as fast): the same numbers as ``round``."""
    one = ModelResult("r", "d", "m", 1, "real", [0], np.array([[1 - p, p]], np.float32), [0, 1],
                      latency, queue)  # fmt: skip
    out = record({"real": one}).outputs["real"]
    assert out.model_latency_ms == round(latency, 4)
    assert math.copysign(1, out.model_latency_ms) == math.copysign(1, round(latency, 4))
    assert out.queue_ms == round(queue, 4)
    assert out.probabilities == [[round(q, 6) for q in one.probabilities[0].tolist()]]
