"""Models whose input is float64 or integers (skl2onnx's ``DoubleTensorType`` and
``Int64TensorType``), without a server: the upload's inspection records the type (an int64
input was refused; a string input still is, saying why), the deployment's rule follows its
roles' models, the gateway refuses what an integer model cannot take as is (naming row and
column) and keeps the rest exact, the envelope carries float64 and int64 exactly and still
reads old float32 envelopes, and the worker never truncates."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from typed_models import NAMES, counts, fitted, string_onnx, typed_onnx

from gateway.dataplane.validation import check_matrix, merged, parse_body, to_matrix
from gateway.transport.oip_codec import parse_infer
from gateway.transport.oip_metadata import model_metadata
from models.archive_line import record_from_envelope
from models.deployments import Deployment, DeploymentUnreadable, ModelRef
from models.inspection import ArtifactRejected, inspect_onnx
from models.meta import ModelMeta
from models.replay import Runner
from models.replay_report import Tally
from models.role_model import RoleModel
from models.runtime import OnnxClassifier
from rendezvous.envelope import EnvelopeError, RequestEnvelope
from rendezvous.input_types import InputRule, deployment_types, input_rule, unfit
from rendezvous.spec import FeatureSpec, Lookup

pytestmark = pytest.mark.pure

SPEC = FeatureSpec.from_names(NAMES)
INT64 = InputRule("int64", "int64")
BIG = 16777217
"""The first integer float32 cannot hold: it read as 16777216."""


def meta(spec: FeatureSpec = SPEC) -> ModelMeta:
    return ModelMeta(name="counts", version=1, feature_spec=spec, classes=[], class_names=[],
                     sha256="", created_at="")  # fmt: skip


def loaded(kind: str) -> OnnxClassifier:
    checked = inspect_onnx(typed_onnx(kind), meta())
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "m.onnx").write_bytes(typed_onnx(kind))
        return OnnxClassifier(Path(folder) / "m.onnx", checked)


def faults_of(call: object) -> list[dict]:
    with pytest.raises(RequestValidationError) as caught:
        call()  # type: ignore[operator]
    return list(caught.value.errors())


@pytest.mark.parametrize("kind, input_type", [("int64", "int64"), ("double", "float64")])
def test_an_int64_or_double_model_is_inspected_and_answers_as_scikit_learn(
    kind: str, input_type: str
) -> None:
    """An ``Int64TensorType`` model was refused at upload ("the model's input is
    tensor(int64)"); now its type is recorded and it answers on integer rows as the
    scikit-learn model does."""
    checked = inspect_onnx(typed_onnx(kind), meta())
    assert checked.input_type == input_type
    assert ModelMeta.from_dict(checked.to_dict()).input_type == input_type
    x, _ = counts()
    model = loaded(kind)
    labels, proba = model.predict(x)
    assert labels.tolist() == fitted().predict(x).tolist()
    assert np.allclose(proba, fitted().predict_proba(x), atol=1e-5)


def test_a_string_input_is_refused_saying_what_is_fed() -> None:
    with pytest.raises(ArtifactRejected, match=r"tensor\(string\), which this server does not"):
        inspect_onnx(string_onnx(), meta(FeatureSpec.from_names(["colour"])))


def test_the_rule_follows_the_roles_models() -> None:
    assert deployment_types(["float32", "float32"]) == ()
    assert input_rule(()) is None
    assert input_rule(deployment_types(["float32", "float64"])) == InputRule("float64")
    assert input_rule(deployment_types(["float64", "int64"])) == INT64
    assert input_rule(("int32", "int64")) == InputRule("int64", "int32")
    doc = Deployment("d", {"real": ModelRef("m", 1)}, SPEC, input_types=("int64",)).to_json()
    assert Deployment.from_json(doc).input_rule == INT64
    plain = Deployment("d", {"real": ModelRef("m", 1)}, SPEC)
    assert "input_types" not in plain.to_dict() and plain.input_rule is None
    with pytest.raises(DeploymentUnreadable, match="unknown input types"):
        Deployment.from_json(doc.replace('"int64"', '"uint8"'))


def test_the_gateway_refuses_what_an_integer_model_cannot_take_naming_row_and_column() -> None:
    body = parse_body(b'{"instances": [[1, 2, 3], [4, 5.5, 6], [9007199254740992, 0, 0]]}', SPEC,
                      100)  # fmt: skip
    faults = faults_of(lambda: to_matrix(SPEC, body, 100, INT64))
    assert [f["loc"] for f in faults] == [("body", "instances", 1, 1),
                                          ("body", "instances", 2, 0)]  # fmt: skip
    assert "row 1, 'clicks': 5.5 is not an integer" in faults[0]["msg"]
    assert "beyond +-9007199254740991" in faults[1]["msg"]
    by_name = parse_body(b'{"features": {"visits": 3e9, "clicks": 1, "days": 2}}', SPEC, 100)
    [fault] = faults_of(lambda: to_matrix(SPEC, by_name, 100, InputRule("int64", "int32")))
    assert fault["loc"] == ("body", "features", "visits") and "int32's range" in fault["msg"]
    good = parse_body(f'{{"instances": [[{BIG}, -3, 0]]}}'.encode(), SPEC, 100)
    x = to_matrix(SPEC, good, 100, INT64)
    assert x.dtype == np.int64 and x.tolist() == [[BIG, -3, 0]]
    exact = to_matrix(SPEC, parse_body(b'{"instances": [[0.1, 2, 3]]}', SPEC, 100), 100,
                      InputRule("float64"))  # fmt: skip
    assert exact.dtype == np.float64 and exact[0, 0] == 0.1
    [oip] = faults_of(lambda: check_matrix(SPEC, np.array([[1.0, 2.0, 3.5]]), 100, None, INT64))
    assert oip["loc"] == ("body", 0, 2) and "'days': 3.5 is not an integer" in oip["msg"]
    assert check_matrix(SPEC, np.array([[BIG, 2.0, 3.0]]), 100, None, INT64).tolist() == [
        [BIG, 2, 3]
    ]
    # an INT64 input as sent: 2**53 + 1 was shown as ...992, read through a double (a probe)
    sent = np.array([[2**53 + 1, 2, 3], [2**53 - 1, 2, 3]], np.int64)
    [past] = faults_of(lambda: check_matrix(SPEC, sent, 100, None, INT64))
    assert past["loc"] == ("body", 0, 0) and "9007199254740993 is beyond" in past["msg"]
    assert check_matrix(SPEC, sent[1:], 100, None, INT64).tolist() == [[2**53 - 1, 2, 3]]


def test_a_looked_up_value_an_integer_model_cannot_take_names_the_entity() -> None:
    spec = SPEC.with_lookup(Lookup("customer_id", ("days",)))
    caller = np.array([[1, 2]], np.int64)
    [fault] = faults_of(lambda: merged(spec, caller, ["c-1"], {"c-1": [b"2.5"]}, INT64))
    assert "customer_id 'c-1': its stored 'days': 2.5 is not an integer" in fault["msg"]
    x, _ = merged(spec, caller, ["c-1"], {"c-1": [str(BIG).encode()]}, INT64)
    assert x.dtype == np.int64 and x.tolist() == [[1, 2, BIG]]


def test_an_entity_load_refuses_what_an_integer_model_cannot_take() -> None:
    """Loaded as any finite float32, 5.5 was stored, and every predict naming the entity was
    refused (a helper's probe): the load refuses it, naming the row."""
    from gateway.admin.enrichment_operations import _entity_writes

    lookup = Lookup("customer_id", ("days",))
    rows = [{"customer_id": "a", "days": 5.5}, {"customer_id": "b", "days": 2**53 + 2},
            {"customer_id": "c", "days": BIG}]  # fmt: skip
    writes, errors = _entity_writes(lookup, rows, INT64)
    assert [w[0] for w in writes] == ["c"] and [e["row"] for e in errors] == [0, 1]
    assert "'days': 5.5 is not an integer (a model takes int64)" in errors[0]["msg"]
    assert "is beyond" in errors[1]["msg"]
    assert len(_entity_writes(lookup, rows, None)[0]) == 3  # a float model takes them


def test_the_envelope_carries_int64_and_float64_exactly_and_reads_old_ones() -> None:
    def envelope(features: np.ndarray, wire_type: str) -> RequestEnvelope:
        return RequestEnvelope("r", "d", "reply", 1, 1.0, b"{}", features, "fs", None, True,
                               wire_type)  # fmt: skip

    for wire_type, x in (("int64", np.array([[BIG, -(2**53 - 1), 7]], np.int64)),
                         ("float64", np.array([[0.1, BIG, 1e-300]])),
                         ("float32", np.array([[0.5, 1.0, 2.0]], np.float32))):  # fmt: skip
        fields = envelope(x, wire_type).encode()
        back = RequestEnvelope.decode(fields)
        assert back.wire_type == wire_type and back.features.dtype == x.dtype
        assert back.features.tolist() == x.tolist()
        assert (b"xt" in fields[b"d"]) == (wire_type != "float32")  # old envelopes: no xt
        line = record_from_envelope("1-0", back, 2.0)
        assert (f'"features_type":"{wire_type}"' in line) == (wire_type != "float32")
    assert f'"features":[[{BIG},-9007199254740991,7]]' in record_from_envelope(
        "1-0", envelope(np.array([[BIG, -(2**53 - 1), 7]]), "int64"), 2.0
    )
    bad = envelope(np.zeros((1, 3)), "float64").encode()
    with pytest.raises(EnvelopeError, match="unknown feature type"):
        RequestEnvelope.decode({b"d": bad[b"d"].replace(b"float64", b"complex")})


def test_the_worker_never_truncates_rows_for_an_integer_model() -> None:
    """Rows published before a role took an integer model, or archived then, travel as
    float32: in one batch of a worker's scoring, one that is not an integer is refused for
    that model (that request only), never cast; whole float32 rows and int64 ones are scored
    as scikit-learn scores them."""
    model = loaded("int64")
    assert unfit(np.array([[1.0, 2.0, 3.0]], np.float32), model.input_dtype) is None
    assert "0.5 is not an integer" in (unfit(np.array([[1, 0.5, 3]]), model.input_dtype) or "")
    assert unfit(np.array([[2.0**60, 1, 1]]), model.input_dtype) is not None
    assert unfit(np.array([[0.5, 1, 1]]), loaded("double").input_dtype) is None
    assert unfit(np.array([[2**40, 1, 1]]), np.dtype(np.int32)) is not None

    role = RoleModel(None, "counts", "real", "real-t")  # type: ignore[arg-type]
    role.model, role.model_ref = model, ModelRef("counts", 1)
    x, _ = counts()

    def request(rid: str, rows: np.ndarray, wire_type: str) -> tuple[RequestEnvelope, float]:
        return RequestEnvelope(rid, "counts", "reply", 1, 1.0, b"{}", rows, "fs", None, True,
                               wire_type), 0.5  # fmt: skip

    scored = role.score([request("whole", x[:2].astype(np.float32), "float32"),
                         request("half", np.array([[1, 0.5, 3]], np.float32), "float32"),
                         request("typed", x[2:4], "int64")])  # fmt: skip
    by_id = {result.request_id: result for _, result in scored}
    assert "input unfit for the model" in (by_id["half"].error or "")
    assert by_id["whole"].ok and by_id["typed"].ok
    assert by_id["whole"].labels == fitted().predict(x[:2]).tolist()
    assert by_id["typed"].labels == fitted().predict(x[2:4]).tolist()


def test_a_replay_skips_archived_rows_an_integer_model_cannot_take() -> None:
    """Replaying an archive against an integer model: rows archived as float32 before any
    role took one are scored when they are whole, skipped as ``unfit`` (counted, never cast)
    when not, and exact int64 rows beyond float32's integers are scored as they were sent."""
    runner = Runner(None, None, None, owner="test")  # type: ignore[arg-type]
    model, tally = loaded("int64"), Tally()
    x, _ = counts()
    batch = [
        {"stream_id": "1-0", "request_id": "whole", "features": x[:2].astype(float).tolist()},
        {"stream_id": "2-0", "request_id": "half", "features": [[1, 0.5, 3]]},
        {"stream_id": "3-0", "request_id": "huge", "features": [[2.0**60, 1, 1]]},
        {"stream_id": "4-0", "request_id": "exact", "features": [[BIG, 1, 1]],
         "features_type": "int64"},
    ]  # fmt: skip
    runner._score("counts", model, batch, {}, ([], []), tally)
    assert tally.done == 4 and tally.skipped == {"unfit": 2}
    assert (tally.records, tally.rows) == (2, 3)
    expected = fitted().predict(np.vstack([x[:2], [[BIG, 1, 1]]]))
    assert sum(tally.predicted.values()) == 3
    assert tally.predicted == {str(c): int((expected == c).sum()) for c in set(expected)}


def test_the_open_inference_metadata_declares_a_type_that_carries_the_values() -> None:
    """A deployment of an integer model that looks features up declared its caller's part
    FP32, which rounds integers past 2**24 (and 0.1 for a double model) before the gateway
    sees them; one of an integer model declares INT64 (or INT32), as tritonclient then sends."""
    looked = SPEC.with_lookup(Lookup("customer_id", ("days",)))
    for spec in (SPEC, looked):
        for types, declared in ((("int64",), "INT64"), (("float64", "int32"), "INT32"),
                                (("float64",), "FP64"), ((), "FP32")):  # fmt: skip
            dep = Deployment("d", {"real": ModelRef("m", 1)}, spec, input_types=types)
            inputs = model_metadata(dep, 2)["inputs"]
            assert inputs[-1]["name"] == "input" and inputs[-1]["datatype"] == declared, inputs


def test_the_open_inference_protocol_takes_int64_for_an_integer_model_only() -> None:
    """tritonclient sends an integer model's rows as INT64 (JSON or binary): taken, exactly,
    by a deployment with an integer model; refused by name elsewhere (float32 rows would round
    them past 2**24 unseen); a fraction in INT64 data is refused where it is."""
    big = 2**53 - 1
    as_json = parse_infer(json.dumps({"inputs": [{"name": "input", "shape": [1, 3],
                          "datatype": "INT64", "data": [big, 2, 3]}]}).encode(), None)  # fmt: skip
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "INT64",
                         "parameters": {"binary_data_size": 24}}]}).encode()  # fmt: skip
    as_binary = parse_infer(header + np.array([big, 2, 3], "<i8").tobytes(), str(len(header)))
    for parsed in (as_json, as_binary):
        parsed.refuse_integers("int64")
        x = check_matrix(SPEC, parsed.matrix(SPEC), 10, rule=input_rule(("int64",)))
        assert x.dtype == np.int64 and x.tolist() == [[big, 2, 3]]
        [fault] = faults_of(lambda parsed=parsed: parsed.refuse_integers(None))
        assert fault["loc"] == ("body", "inputs", 0, "datatype") and "INT64" in fault["msg"]
    fraction = parse_infer(json.dumps({"inputs": [{"name": "input", "shape": [1, 3],
                           "datatype": "INT64", "data": [1, 4.5, 3]}]}).encode(), None)  # fmt: skip
    [fault] = faults_of(lambda: check_matrix(SPEC, fraction.matrix(SPEC), 10,
                                             rule=input_rule(("int64",))))  # fmt: skip
    assert "4.5 is not an integer" in fault["msg"]
