"""A model run in onnxruntime, bounded: a run past its limit is stopped, and an answer without
one label and one row of probabilities per row is refused (models built here with onnx, the
traps a helper's security probe uploaded: the upload's dry run on training rows passes them)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from onnx import TensorProto, helper

from models.meta import ModelMeta
from models.runtime import ModelAnswerError, OnnxClassifier, RunLimit
from rendezvous.spec import FeatureSpec

META = ModelMeta("trap", 1, FeatureSpec.from_names(["a", "b"]), [0, 1], ["0", "1"], "", "")


def _model(nodes: list, extra: list | None = None) -> bytes:
    """x [rows, 2] -> label (argmax), probabilities (softmax), after ``nodes`` (which end in
    ``p``, the probabilities)."""
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0), *nodes],
        "trap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 2])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, None),
         helper.make_tensor_value_info("p", TensorProto.FLOAT, None)],
        extra or [],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _looping() -> bytes:
    """Loops as many times as the largest feature says: none on training rows, for ever on
    one row of 1e12."""
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )  # fmt: skip
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
        helper.make_node("Cast", ["top"], ["n"], to=TensorProto.INT64),
        helper.make_node("Loop", ["n", "yes", "zero"], ["v"], body=body),
        helper.make_node("Mul", ["v", "zero"], ["nothing"]),
        helper.make_node("Softmax", ["x"], ["soft"], axis=1),
        helper.make_node("Add", ["soft", "nothing"], ["p"]),
    ]
    return _model(nodes, [helper.make_tensor("yes", TensorProto.BOOL, [], [True]),
                          helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])])  # fmt: skip


def test_a_run_past_its_limit_is_stopped_and_the_next_one_runs() -> None:
    model = OnnxClassifier(_looping(), META)
    limit = RunLimit(0.3, tick_s=0.05)
    labels, _ = model.predict(np.array([[0.2, 0.9]]), limit)  # training-like: no loop
    assert labels.tolist() == [1]
    t0 = time.monotonic()
    with pytest.raises(ModelAnswerError, match=r"ran past 0\.3 s"):
        model.predict(np.array([[1e12, 0.0]]), limit)
    assert time.monotonic() - t0 < 10.0  # stopped, not run to its end (hours)
    labels, proba = model.predict(np.array([[0.9, 0.2], [0.1, 0.5]]), limit)
    assert labels.tolist() == [0, 1] and proba.shape == (2, 2)


def test_an_answer_without_a_row_for_every_row_is_refused() -> None:
    """One row of probabilities for a batch of many: the other callers of the batch got none
    or another's answer."""
    first_row = [helper.make_node("Softmax", ["x"], ["soft"], axis=1),
                 helper.make_node("Slice", ["soft", "start", "end"], ["p"])]  # fmt: skip
    bounds = [helper.make_tensor("start", TensorProto.INT64, [1], [0]),
              helper.make_tensor("end", TensorProto.INT64, [1], [1])]  # fmt: skip
    model = OnnxClassifier(_model(first_row, bounds), META)
    assert model.predict(np.array([[0.2, 0.9]]))[1].shape == (1, 2)  # one row: fine
    with pytest.raises(ModelAnswerError, match=r"shape \(1, 2\) for 3 rows"):
        model.predict(np.array([[0.2, 0.9], [0.9, 0.2], [0.5, 0.5]]))


def test_probabilities_a_hair_outside_0_and_1_are_clipped_and_nan_kept() -> None:
    """A tree ensemble's float32 sums answered 1.0000003576 to callers. Only float noise:
    what is not probabilities stays as it is, for the upload's check to refuse."""
    model = OnnxClassifier(_model([helper.make_node("Identity", ["x"], ["p"])]), META)
    _, proba = model.predict(np.array([[1.0000004, -3e-7], [0.25, 0.75]]))
    assert proba.tolist() == [[1.0, 0.0], [0.25, 0.75]]
    _, proba = model.predict(np.array([[1.3, -0.3], [0.25, np.nan]]))
    assert proba[0].tolist() == pytest.approx([1.3, -0.3])
    assert proba[1, 0] == np.float32(0.25) and np.isnan(proba[1, 1])
    from models.inspection import ArtifactRejected, inspect_onnx

    with pytest.raises(ArtifactRejected, match=r"not probabilities .*got values -0\.\d+ to"):
        inspect_onnx(_model([helper.make_node("Identity", ["x"], ["p"])]), META)


def test_reference_rows_are_scored_in_the_bounded_child_not_the_gateway() -> None:
    """An upload's reference rows were scored in the gateway process after the bounded dry
    run had passed: a model looping on them took a core of the gateway for 85 s (found by a
    helper's security probe). They are scored in the child, within its bounds."""
    from models.inspection import ArtifactRejected
    from models.isolated_inspection import inspect_isolated

    data = _looping()
    checked = inspect_isolated(data, META, reference=np.array([[0.2, 0.9], [0.9, 0.2]]))
    assert checked.score_reference is not None and len(checked.score_reference) == 10
    t0 = time.monotonic()
    with pytest.raises(ArtifactRejected, match="took longer than 3 s"):
        inspect_isolated(data, META, timeout_s=3.0, reference=np.array([[1e12, 0.0]]))
    assert time.monotonic() - t0 < 30.0  # bounded, not the loop's hours


def test_a_replay_skips_a_request_its_model_loops_on_and_scores_the_rest() -> None:
    """A replay ran the model without a time limit: one archived row that makes it loop held
    the replay (and its slot) for good. Within ``RDV_MODEL_RUN_LIMIT_S`` the batch is stopped,
    the request the model loops on is skipped as ``model_failed``, the others are scored."""
    from models.replay import Runner
    from models.replay_report import Tally

    model = OnnxClassifier(_looping(), META)
    runner = Runner(None, None, None, owner="test", run_limit=RunLimit(0.3, tick_s=0.05))  # type: ignore[arg-type]
    batch = [{"stream_id": f"{i}-0", "request_id": rid, "features": rows}
             for i, (rid, rows) in enumerate([("a", [[0.2, 0.9]]), ("loops", [[1e12, 0.0]]),
                                              ("b", [[0.9, 0.2], [0.1, 0.5]])])]  # fmt: skip
    tally = Tally()
    t0 = time.monotonic()
    runner._score("trap", model, batch, {}, ([], []), tally)
    assert time.monotonic() - t0 < 10.0
    assert tally.skipped == {"model_failed": 1} and (tally.records, tally.rows) == (2, 3)
    assert tally.predicted == {"1": 2, "0": 1}
