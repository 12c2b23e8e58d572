"""Wire formats round-trip exactly and refuse what is not theirs."""

import msgpack
import numpy as np
import pytest

from rendezvous.envelope import (
    EnvelopeError,
    ModelResult,
    RequestEnvelope,
    decode_results,
    encode_results,
)


def test_request_envelope_round_trip() -> None:
    x = np.random.default_rng(0).normal(size=(3, 30)).astype(np.float32)
    env = RequestEnvelope("r1", "dep", "rdv:reply:{gw}", 123, 45.5, b'{"a":1}', x, "fs-1")
    back = RequestEnvelope.decode(env.encode())
    assert back.request_id == "r1" and back.reply_to == "rdv:reply:{gw}"
    assert back.deadline_ms == 123 and back.raw == b'{"a":1}' and back.spec_version == "fs-1"
    np.testing.assert_array_equal(back.features, x)


def test_model_result_round_trip() -> None:
    p = np.array([[0.25, 0.75]], dtype=np.float32)
    res = ModelResult("r1", "dep", "m", 2, "real", [1], p, [0, 1], 0.5, 1.5)
    back = ModelResult.decode(res.encode())
    assert (back.model, back.version, back.role, back.labels) == ("m", 2, "real", [1])
    np.testing.assert_array_equal(back.probabilities, p)
    assert back.ok
    failed = ModelResult.decode(
        ModelResult(
            "r1", "dep", "m", 2, "real", [], np.zeros((0, 0)), [0, 1], 0, 0, "boom"
        ).encode()
    )
    assert not failed.ok and failed.error == "boom"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"d": b"\xc1not msgpack"},
        {b"d": msgpack.packb({"v": 99})},
        {b"d": msgpack.packb({"v": 1, "id": "x"})},
        {
            b"d": msgpack.packb(
                {
                    "v": 1,
                    "id": "x",
                    "dep": "d",
                    "reply": "r",
                    "deadline_ms": 1,
                    "enq_ms": 1,
                    "raw": b"",
                    "x": b"\x00" * 7,
                    "rows": 1,
                    "cols": 2,
                    "spec": "s",
                }
            )
        },
    ],
)
def test_malformed_entries_raise_envelope_error(fields: dict) -> None:
    with pytest.raises(EnvelopeError):
        RequestEnvelope.decode(fields)


def result(rid: str, role: str = "real") -> ModelResult:
    p = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    return ModelResult(rid, "dep", "m", 2, role, [1, 0], p, [0, 1], 0.5, 1.5, extra={"k": 1})


def test_a_batch_of_results_round_trips_in_one_entry() -> None:
    sent = [result("a"), result("b", "canary"), result("c")]
    fields = encode_results(sent)
    assert list(fields) == [b"r"]
    back, errors = decode_results(fields)
    assert errors == []
    assert [(r.request_id, r.role, r.labels, r.extra) for r in back] == [
        ("a", "real", [1, 0], {"k": 1}),
        ("b", "canary", [1, 0], {"k": 1}),
        ("c", "real", [1, 0], {"k": 1}),
    ]
    for r in back:
        np.testing.assert_array_equal(r.probabilities, sent[0].probabilities)


def test_a_single_result_entry_still_reads() -> None:
    back, errors = decode_results(result("a").encode())
    assert [r.request_id for r in back] == ["a"] and errors == []


def test_a_bad_result_in_a_batch_costs_only_itself() -> None:
    good = encode_results([result("a")])
    doc = msgpack.unpackb(good[b"r"], raw=False)
    doc["results"] += [{"id": "no other field"}, dict(doc["results"][0], p=b"\x00" * 3), "x"]
    doc["results"].append(dict(doc["results"][0], id="d"))
    back, errors = decode_results({b"r": msgpack.packb(doc, use_bin_type=True)})
    assert [r.request_id for r in back] == ["a", "d"]
    assert len(errors) == 3 and "float32" in errors[1]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"r": b"\xc1"},
        {b"r": msgpack.packb({"v": 99, "results": []})},
        {b"r": msgpack.packb({"v": 1, "results": "no"})},
        {b"r": msgpack.packb([1, 2])},
    ],
)
def test_an_entry_that_is_no_reply_raises(fields: dict) -> None:
    with pytest.raises(EnvelopeError):
        decode_results(fields)
