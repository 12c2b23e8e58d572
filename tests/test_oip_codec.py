"""The Open Inference Protocol's request parsing and answer shaping, without a server: JSON
(flat and nested) and binary tensor data in, the matrix the models take out; the answer read
back by ``tritonclient``'s own result parser; every refusal names what is wrong; a binary body
is archived without loss."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from tritonclient.http import InferResult

from gateway.dataplane.answers import pinned_role
from gateway.dataplane.failures import UnknownVersion
from gateway.dataplane.validation import check_matrix
from gateway.problems import fault_text
from gateway.transport.limits import style_of
from gateway.transport.oip_answer import encode_answer
from gateway.transport.oip_codec import parse_infer
from gateway.transport.oip_metadata import model_config, model_metadata
from models.archive_line import record_from_envelope
from models.deployments import Deployment, ModelRef
from rendezvous.envelope import RequestEnvelope
from rendezvous.spec import FeatureSpec

SPEC = FeatureSpec.from_names(["a", "b", "c"])
X = np.array([[1.5, -2.0, 3.25], [0.0, 7.0, 1e-3]], dtype=np.float32)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def _binary(doc: dict[str, Any], *blobs: bytes) -> tuple[bytes, str]:
    head = _json(doc)
    return head + b"".join(blobs), str(len(head))


def _input(data: Any, shape: list[int], datatype: str = "FP32", name: str = "input") -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def _matrix(body: bytes, header_length: str | None = None, spec: FeatureSpec = SPEC) -> np.ndarray:
    return np.asarray(parse_infer(body, header_length).matrix(spec), dtype=np.float32)


def _refusal(body: bytes, header_length: str | None = None, spec: FeatureSpec = SPEC) -> str:
    with pytest.raises(RequestValidationError) as caught:
        parse_infer(body, header_length).matrix(spec)
    return fault_text(list(caught.value.errors()))


def test_json_data_flat_or_nested_fp32_or_fp64_gives_the_same_matrix() -> None:
    flat = _json({"inputs": [_input(X.ravel().tolist(), [2, 3])]})
    nested = _json({"inputs": [_input(X.tolist(), [2, 3], "FP64")]})
    np.testing.assert_array_equal(_matrix(flat), X)
    np.testing.assert_array_equal(_matrix(nested), X)


def test_an_empty_id_counts_as_none_as_an_empty_x_request_id_does() -> None:
    """Found by a helper's probe: ``"id": ""`` was refused, an empty header taken as none."""
    assert parse_infer(_json({"id": "", "inputs": [_input(X.tolist(), [2, 3])]}), None).id is None
    assert (
        parse_infer(_json({"id": "r-1", "inputs": [_input(X.tolist(), [2, 3])]}), None).id == "r-1"
    )


def test_entity_ids_come_as_bytes_in_json_or_binary_for_a_deployment_that_looks_up() -> None:
    from gateway.transport.oip_lookup import lookup_rows
    from rendezvous.spec import Lookup

    spec = SPEC.with_lookup(Lookup("customer_id", ("b",)))  # the caller sends a and c
    ids = ["c-1", "c-2"]
    caller = X[:, [0, 2]]
    as_json = _json({"inputs": [_input(ids, [2], "BYTES", "customer_id"),
                                _input(caller.tolist(), [2, 2])]})  # fmt: skip
    x, entities = lookup_rows(parse_infer(as_json, None), spec)
    assert entities == ids and np.array_equal(np.asarray(x, np.float32), caller)
    packed = b"".join(len(e).to_bytes(4, "little") + e.encode() for e in ids)
    binary_ids = {"name": "customer_id", "shape": [2, 1], "datatype": "BYTES",
                  "parameters": {"binary_data_size": len(packed)}}  # fmt: skip
    body, length = _binary({"inputs": [_input(caller.tolist(), [2, 2]), binary_ids]}, packed)
    x, entities = lookup_rows(parse_infer(body, length), spec)
    assert entities == ids and np.array_equal(np.asarray(x, np.float32), caller)

    def refused(body: bytes, length: str | None = None) -> str:
        with pytest.raises(RequestValidationError) as caught:
            lookup_rows(parse_infer(body, length), spec)
        return fault_text(list(caught.value.errors()))

    short = {**binary_ids, "parameters": {"binary_data_size": len(packed) - 1}}
    assert "BYTES element 1 runs past" in refused(*_binary({"inputs": [short]}, packed[:-1]))
    bad_utf8 = (2).to_bytes(4, "little") + b"\xff\xfe"
    odd = {**binary_ids, "shape": [1], "parameters": {"binary_data_size": len(bad_utf8)}}
    assert "inputs[0].data[0]: not UTF-8" in refused(*_binary({"inputs": [odd]}, bad_utf8))
    spaced = _json({"inputs": [_input(["c 1"], [1], "BYTES", "customer_id"),
                               _input([[1.0, 2.0]], [1, 2])]})  # fmt: skip
    assert "inputs[0].data[0]: invalid customer_id 'c 1'" in refused(spaced)
    assert "missing input 'customer_id'" in refused(_json({"inputs": [_input([[1, 2]], [1, 2])]}))
    numbers = _json({"inputs": [_input([1], [1], "FP32", "customer_id")]})
    assert "input 'customer_id' holds entity ids: BYTES" in refused(numbers)
    three = _json({"inputs": [_input(["c-1", "c-2", "c-3"], [3], "BYTES", "customer_id"),
                              _input(caller.tolist(), [2, 2])]})  # fmt: skip
    assert "3 customer_id ids for 2 rows" in refused(three)
    for shape in ([0], [0, 1]):  # the right shape, of no row: it said "the wrong shape"
        none = _json({"inputs": [_input([], shape, "BYTES", "customer_id")]})
        assert f"has shape {shape}: no id, so no row; a request holds at least one row" in (
            refused(none)
        )
    assert "one id per row, [rows] or [rows, 1]" in refused(
        _json({"inputs": [_input(["a", "b"], [1, 2], "BYTES", "customer_id")]})
    )
    # BYTES is refused as features, for any deployment
    assert "input 'input' is BYTES" in _refusal(_header_only([_input(["1", "2", "3"], [1, 3],
                                                                     "BYTES")]))  # fmt: skip
    mixed = _json({"inputs": [_input(["c-1", 2], [2], "BYTES", "customer_id")]})
    assert "inputs[0].data[1]: data must hold strings only; this is a number" in refused(mixed)


def test_a_value_refused_later_is_named_where_it_was_in_the_request() -> None:
    """Found by hand: a NaN was refused as "[0][0]: row 0, 'a': ...", with no word of
    which input held it."""
    x = X.copy()
    x[1, 2] = np.nan
    one = parse_infer(_json({"inputs": [_input(X.tolist(), [2, 3])]}), None)
    per_feature = parse_infer(_json({"inputs": [
        _input(X[:, k].tolist(), [2], name=name) for k, name in ((2, "c"), (0, "a"), (1, "b"))
    ]}), None)  # fmt: skip
    for parsed, says in [(one, "inputs[0].data[1][2]: row 1, 'c'"),
                         (per_feature, "inputs[0].data[1]: row 1, 'c'")]:  # fmt: skip
        with pytest.raises(RequestValidationError) as caught:
            check_matrix(SPEC, x, 10)
        located = parsed.located(caught.value, SPEC)
        assert fault_text(list(located.errors())).startswith(says)
    # the row count: at the input that gave it (it named no field, found by a helper's probe)
    rows = RequestValidationError([{"loc": (), "msg": "0 rows", "type": "too_long"}])
    assert fault_text(list(one.located(rows, SPEC).errors())) == "inputs[0].shape: 0 rows"
    other = RequestValidationError([{"loc": (), "msg": "odd", "type": "value_error"}])
    assert list(one.located(other, SPEC).errors()) == list(other.errors())  # left as it was


def test_a_wrong_input_name_is_one_fault_and_a_count_not_one_a_feature() -> None:
    """``"name": "features"`` on a [1, 30] input listed all 30 features as missing."""
    wide = FeatureSpec.from_names([f"f{i}" for i in range(30)])
    says = _refusal(_json({"inputs": [_input([0.5] * 30, [1, 30], name="features")]}), spec=wide)
    assert says.startswith("inputs[0].name: unknown input 'features'"), says
    assert "missing inputs for 30 features: 'f0', 'f1', 'f2' and 27 more" in says, says
    assert says.count("missing") == 1 and len(says) < 400, says


def test_binary_inputs_follow_the_json_header_in_input_order() -> None:
    doc = {
        "id": "r-1",
        "inputs": [
            {"name": "a", "shape": [2], "datatype": "FP64",
             "parameters": {"binary_data_size": 16}},
            {"name": "c", "shape": [2, 1], "datatype": "FP32", "data": [3.25, 1e-3]},
            {"name": "b", "shape": [2], "datatype": "FP32",
             "parameters": {"binary_data_size": 8}},
        ],
    }  # fmt: skip
    body, length = _binary(doc, X[:, 0].astype("<f8").tobytes(), X[:, 1].astype("<f4").tobytes())
    parsed = parse_infer(body, length)
    assert parsed.id == "r-1"
    np.testing.assert_array_equal(np.asarray(parsed.matrix(SPEC), np.float32), X)


def test_outputs_default_to_all_and_binary_follows_the_request() -> None:
    plain = parse_infer(_json({"inputs": [_input([1, 2, 3], [1, 3])]}), None)
    assert plain.outputs == (("label", False), ("probabilities", False))
    asked = {
        "parameters": {"binary_data_output": True},
        "inputs": [_input([1, 2, 3], [1, 3])],
        "outputs": [{"name": "probabilities"}, {"name": "label",
                                                "parameters": {"binary_data": False}}],
    }  # fmt: skip
    assert parse_infer(_json(asked), None).outputs == (("probabilities", True), ("label", False))


ANSWER = {
    "request_id": "r-7",
    "model": {"name": "bc", "version": 2, "role": "real"},
    "predictions": [
        {"label": 0, "probabilities": {"0": 0.75, "1": 0.25}},
        {"label": 1, "probabilities": {"0": 0.125, "1": 0.875}},
    ],
    "latency_ms": 1.5,
}


@pytest.mark.parametrize("binary", [False, True])
def test_answers_read_back_with_tritonclient(binary: bool) -> None:
    body, length = encode_answer(ANSWER, [("label", binary), ("probabilities", binary)], "dep", "2")
    assert (length is not None) == binary
    result = InferResult.from_response_body(body, header_length=length)
    labels, proba = result.as_numpy("label"), result.as_numpy("probabilities")
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1]
    assert proba.dtype == np.float32
    np.testing.assert_array_equal(proba, [[0.75, 0.25], [0.125, 0.875]])
    response = result.get_response()
    assert response["model_name"] == "dep" and response["model_version"] == "2"
    assert response["id"] == "r-7" and response["parameters"]["role"] == "real"


def test_a_version_of_another_model_is_named_with_its_model() -> None:
    """Two models' version 1 in one deployment: by number alone they read as one version, and
    a pinned infer went to whichever role sorted first (here the challenger)."""
    roles = {"real": ModelRef("bc", 2), "canary": ModelRef("bc", 1), "abtest": ModelRef("other", 1)}
    dep = Deployment(name="dep", roles=roles, feature_spec=SPEC)
    assert dep.versions == ["2", "other:1", "1"]  # real's, then by role
    assert pinned_role(dep, "1") == "canary" and pinned_role(dep, "other:1") == "abtest"
    with pytest.raises(UnknownVersion, match="versions: 2, other:1, 1"):
        pinned_role(dep, "3")
    assert dep.version_name(ModelRef("other", 1)) == "other:1"
    # The deployment's own model's numbers hold across the promotion of another model's...
    named = Deployment(name="bc", roles=roles, feature_spec=SPEC)
    promoted = Deployment(name="bc", roles={"real": ModelRef("other", 1), "canary": roles["real"],
                                            "old": roles["canary"]}, feature_spec=SPEC)  # fmt: skip
    assert named.versions == ["2", "other:1", "1"] and promoted.versions == ["other:1", "2", "1"]
    # ...and without one of its name, real's model's are the numbers.
    assert Deployment(name="d", roles={"real": ModelRef("x", 3), "canary": ModelRef("y", 3)},
                      feature_spec=SPEC).versions == ["3", "y:3"]  # fmt: skip
    body, _ = encode_answer(ANSWER, [("label", False)], "dep", "other:1")
    assert InferResult.from_response_body(body).get_response()["model_version"] == "other:1"


def test_the_config_of_a_deployment_that_looks_up_names_the_key_as_a_string_a_row() -> None:
    from rendezvous.spec import Lookup

    spec = SPEC.with_lookup(Lookup("customer_id", ("b",)))
    dep = Deployment(name="dep", roles={"real": ModelRef("bc", 2)}, feature_spec=spec)
    config = model_config(model_metadata(dep, 3), max_rows=50)
    assert config["max_batch_size"] == 50
    assert config["input"] == [
        {"name": "customer_id", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
        {"name": "input", "data_type": "TYPE_FP32", "dims": [2]},  # a and c
    ]
    assert config["output"][1] == {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]}


def test_a_non_finite_probability_is_not_answered() -> None:
    bad = {**ANSWER, "predictions": [{"label": 0, "probabilities": {"0": float("nan")}}]}
    with pytest.raises(ValueError):
        encode_answer(bad, [("label", False)], "dep", "2")


def _header_only(inputs: list[dict], **extra: Any) -> bytes:
    return _json({"inputs": inputs, **extra})


@pytest.mark.parametrize(
    ("body", "header_length", "says"),
    [
        (_header_only([_input([1, 2, 3], [1, 3], "UINT8")]), None,
         "inputs[0].datatype: input 'input' has datatype 'UINT8': FP32, FP64, INT64 or INT32"),
        (_header_only([_input([1, 2], [1, 3])]), None,
         "inputs[0].data: 2 values for shape [1, 3], which holds 3"),
        (_header_only([_input([[1, 2, 3], [4, 5]], [2, 3])]), None,
         "nested otherwise than its shape [2, 3]"),
        (_header_only([_input([1, "1", 3], [1, 3])]), None,
         "inputs[0].data[1]: data must hold numbers only; this is a string"),
        (_header_only([_input([[1, 2, 3], [4, True, 6]], [2, 3])]), None,
         "inputs[0].data[1][1]: data must hold numbers only; this is a boolean"),
        (_header_only([_input([0], [0, 10**30])]), None,
         "inputs[0].shape: shape [0, 1000000000000000000000000000000]: its dimensions other "
         "than 0 multiply past"),
        (_header_only([_input([], [2**40, 0, 2**40])]), None,
         "dimensions other than 0 multiply past 2147483648"),
        (_header_only([_input([], [2**40, 2**40])]), None, "its dimensions multiply past"),
        (_header_only([_input([1, 2, 3, 4], [1, 4])]), None,
         "input 'input' has shape [1, 4]: the model takes [rows, 3]"),
        (_header_only([_input([1], [1], name="x")]), None, "unknown input 'x'"),
        (_header_only([_input([1], [1], name="a"), _input([1, 2, 3], [1, 3])]), None,
         "not both"),
        (_header_only([_input([1], [1], name="a"), _input([2], [1], name="a")]), None,
         "given twice"),
        (_header_only([_input([1], [1], name="a"), _input([2], [1], name="b")]), None,
         "missing input for feature 'c'"),
        (_header_only([_input([1, 2, 3], [1, 3])], id="x" * 129), None, "id must be 1-128"),
        (_header_only([_input([1, 2, 3], [1, 3])], id="a\nb"), None, "id must be 1-128"),
        # one rule with X-Request-Id: a header cannot carry these, so one id had two forms
        (_header_only([_input([1, 2, 3], [1, 3])], id="\u00e9-1"), None, "printable ASCII"),
        (_header_only([_input([1, 2, 3], [1, 3])], id=" x "), None, "no space at either end"),
        (_header_only([_input([1, 2, 3], [1, 3])], outputs=[{"name": "logits"}]), None,
         "unknown output 'logits'"),
        (_header_only([_input([1, 2, 3], [1, 3])],
                      outputs=[{"name": "label", "parameters": {"classification": 2}}]), None,
         "classification extension is not supported"),
        (_header_only([_input([1, 2, 3], [1, 3])], extra=1), None, "extra"),
        (b'{"inputs": [', None, "Invalid JSON"),
        (b"\xef\xbb\xbf" + _header_only([_input([1, 2, 3], [1, 3])]), None,
         "begins with a UTF-8 byte order mark"),
        # found by a fuzzing probe: the parser's words, where /v1 names the encoding
        (_header_only([_input([1, 2, 3], [1, 3])]).decode().encode("utf-16"), None,
         "the body is not UTF-8: invalid start byte at byte 0"),
        (b'{"id": "\xff\xfe", "inputs": []}', None, "the body is not UTF-8"),
        (_header_only([_input([1, 2, 3], [1, 3])]), "abc",
         "Inference-Header-Content-Length must be a whole number of bytes"),
        (_header_only([_input([1, 2, 3], [1, 3])]), "100000", "at most the body's"),
        (_header_only([_input([1, 2, 3], [1, 3])]), "10",
         "Invalid JSON: EOF while parsing a value at line 1 column 10 in the body's first 10 "
         "bytes, the JSON part by its Inference-Header-Content-Length header"),
        (_header_only([_input([1, 2, 3], [1, 3])]), "\N{SUPERSCRIPT TWO}",
         "Inference-Header-Content-Length must be a whole number of bytes"),
        # found by a helper's probe: int() refuses 4,300+ digits, a 500 with a traceback
        (_header_only([_input([1, 2, 3], [1, 3])]), "9" * 5000, "at most the body's"),
        (_header_only([{"name": "input", "shape": [1, 3], "datatype": "FP32",
                        "parameters": {"binary_data_size": 12}}]), None,
         "binary_data_size needs the Inference-Header-Content-Length header"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_naming_the_fault(
    body: bytes, header_length: str | None, says: str
) -> None:
    assert says in _refusal(body, header_length)


def test_binary_sizes_that_disagree_are_refused() -> None:
    blob = X[:1].astype("<f4").tobytes()
    doc = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                       "parameters": {"binary_data_size": 8}}]}  # fmt: skip
    assert "binary_data_size is 8, shape [1, 3] of FP32 takes 12 bytes" in _refusal(
        *_binary(doc, blob)
    )
    doc["inputs"][0]["parameters"] = {"binary_data_size": 12}
    assert "needs 12 bytes at byte 0 of the binary part, which has 8" in _refusal(
        *_binary(doc, blob[:8])
    )
    assert "the binary part of the body has 16 bytes" in _refusal(*_binary(doc, blob + b"abcd"))


def test_a_binary_body_is_archived_whole() -> None:
    head = _json({"id": "r-9", "inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32",
                                           "parameters": {"binary_data_size": 24}}]})  # fmt: skip
    tail = X.tobytes()
    env = RequestEnvelope(
        request_id="r-9",
        deployment="demo",
        reply_to="rdv:reply:{gw}",
        deadline_ms=1,
        enqueued_ms=1.0,
        raw=head + tail,
        features=X,
        spec_version="fs-1",
    )
    record = json.loads(record_from_envelope("1-0", env, 2.0))
    assert record["raw"]["id"] == "r-9" and "raw_text" not in record
    assert json.dumps(record["raw"]).encode() == head  # the header as sent
    assert base64.b64decode(record["raw_binary"]) == tail


def test_the_body_cap_answers_the_oip_routes_in_their_style() -> None:
    assert style_of("/v2/models/m/infer").value == "error"
    assert style_of("/v2").value == "error"
    assert style_of("/v1/deployments/d/predict").value == "detail"
    assert style_of("/v2x").value == "detail"


def test_bounds_refuse_a_megabyte_of_arrays_inputs_or_bytes_before_decoding_it() -> None:
    """Found by a helper's fuzzing: a megabyte of ``[[0],[0],...]``, of 17,000 inputs or of
    262,144 binary BYTES elements held the gateway's event loop 0.3-0.5 s each before the row
    bound refused it; ``/v1`` predict refuses such a body from its bytes."""
    from gateway.transport.oip_codec import Bounds

    bounds = Bounds.of(SPEC, max_rows=1000)
    many = 250_000
    nested = _json({"inputs": [_input([[0]] * many, [many, 1])]})
    inputs = _json({"inputs": [_input([0], [1], name=f"x{i}") for i in range(17_000)]})
    head = _json({"inputs": [{"name": "k", "shape": [many], "datatype": "BYTES",
                              "parameters": {"binary_data_size": 4 * many}}]})  # fmt: skip
    for body, length, fault in [
        (nested, None, "opens 250003 arrays"),
        (inputs, None, "opens"),
        (head + b"\0" * 4 * many, str(len(head)), "250000 rows, 1 to 1000 per request"),
    ]:
        with pytest.raises(RequestValidationError) as caught:
            parse_infer(body, length, bounds=bounds)
        assert fault in fault_text(list(caught.value.errors()))
    few = _json({"inputs": [_input([0] * 5, [5], name=f"x{i}") for i in range(5)]})
    with pytest.raises(RequestValidationError, match="5 inputs: the model takes at most 4"):
        parse_infer(few, None, bounds=bounds)
    # the largest valid requests pass: a feature an input, each [rows, 1] nested; or one input
    per_feature = _json({"inputs": [_input([[1.0]] * 1000, [1000, 1], name=n) for n in "abc"]})
    assert parse_infer(per_feature, None, bounds=bounds).matrix(SPEC).shape == (1000, 3)
    whole = _json({"id": "[{" * 64, "inputs": [_input([[1.0, 2.0, 3.0]] * 1000, [1000, 3])]})
    assert parse_infer(whole, None, bounds=bounds).matrix(SPEC).shape == (1000, 3)


def test_json_data_is_held_to_its_declared_datatype_as_its_binary_form_is() -> None:
    """An INT32 input of 2**40 was taken, and an FP32 one fed a float64 model double precision
    that the same tensor sent binary cannot carry (a helper's fuzzing)."""
    precise = [[0.1, 1 / 3, 2.0]]
    as_json = parse_infer(_json({"inputs": [_input(precise, [1, 3])]}), None).matrix(SPEC)
    blob = np.asarray(precise, dtype="<f4").tobytes()
    head = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                        "parameters": {"binary_data_size": len(blob)}}]}  # fmt: skip
    as_binary = parse_infer(*_binary(head, blob)).matrix(SPEC)
    np.testing.assert_array_equal(
        np.asarray(as_json, np.float64), np.asarray(as_binary, np.float64)
    )
    fault = _refusal(_json({"inputs": [_input([[1, 2**40, 3]], [1, 3], "INT32")]}))
    assert "1099511627776 is beyond what INT32 holds" in fault and "data[0][1]" in fault, fault
    in_range = [[-(2**31), 2**31 - 1, 0]]
    got = parse_infer(_json({"inputs": [_input(in_range, [1, 3], "INT32")]}), None).inputs[0]
    assert got.values.tolist() == in_range
    wide = parse_infer(_json({"inputs": [_input(precise, [1, 3], "FP64")]}), None).inputs[0]
    assert wide.values.tolist() == precise  # FP64 stays as sent
