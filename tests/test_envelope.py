"""Wire formats round-trip exactly and refuse what is not theirs."""

import msgpack
import numpy as np
import pytest

from rendezvous.envelope import EnvelopeError, ModelResult, RequestEnvelope


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
