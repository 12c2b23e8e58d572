"""What an upload of each kind of scikit-learn model gets (found by hand, bringing a data
scientist's models through the system): classes taken from the model's own classifier, not
assumed to be 0..k-1; scores that are not probabilities, string labels, a ZipMap, a regressor
refused at upload with what is supported, a float64 input served; a model whose labels do not
follow its columns refused; and a role whose features or classes differ from the deployment's
refused. Real models, exported with skl2onnx, checked in onnxruntime."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from admin_support import two_column_model
from skl2onnx import to_onnx
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC

from models.inspection import ArtifactRejected, inspect_onnx
from models.meta import ModelMeta, unfit_for
from models.reference import training_spec
from models.runtime import OnnxClassifier
from models.train import demo_data
from rendezvous.spec import FeatureSpec

pytestmark = pytest.mark.pure

WIDTH = 4


def rows() -> tuple[np.ndarray, np.ndarray]:
    x = demo_data().x_train[:200, :WIDTH].astype(np.float32)
    return x, (x[:, 0] > np.median(x[:, 0])).astype(int)


def onnx_of(model: Any, *, zipmap: bool = False, double: bool = False) -> bytes:
    """As ``models.train.export_onnx`` (no ZipMap) unless told; a model without
    probabilities has no ZipMap to turn off."""
    kind = DoubleTensorType if double else FloatTensorType
    plain = zipmap or not hasattr(model, "predict_proba")
    options = {} if plain else {id(model): {"zipmap": False}}
    onx = to_onnx(model, initial_types=[("x", kind([None, WIDTH]))], options=options,
                  target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    return bytes(onx.SerializeToString())


def meta(
    classes: list[int] | None = None, names: list[str] | None = None, *, stats: bool = False
) -> ModelMeta:
    names = names or demo_data().names[:WIDTH]
    spec = training_spec(names, rows()[0]) if stats else FeatureSpec.from_names(names)
    return ModelMeta(name="m", version=1, feature_spec=spec, classes=classes or [],
                     class_names=[], sha256="", created_at="")  # fmt: skip


def fitted(labels: np.ndarray, model: Any = None) -> Any:
    x, _ = rows()
    return (model or LogisticRegression(max_iter=500)).fit(x, labels)


def test_classes_are_the_models_own_and_keyed_as_it_labels() -> None:
    """A model on labels -1/+1 was stored as classes [0, 1]: predict answered label -1 with
    probabilities keyed "0" and "1", and a label sent back as feedback was refused."""
    x, y = rows()
    # k-NN's graph names no classes: they are read off the dry batch, drawn within the
    # training range (the statistics an upload's reference rows give)
    for labels, estimator in ((np.where(y == 1, 1, -1), None), (y * 10 + 10, None), (y, None),
                              (np.where(y == 1, 1, -1), KNeighborsClassifier(5))):  # fmt: skip
        model = fitted(labels, estimator)
        checked = inspect_onnx(onnx_of(model), meta(stats=estimator is not None))
        assert checked.classes == model.classes_.tolist()
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "m.onnx").write_bytes(onnx_of(model))
            got, proba = OnnxClassifier(Path(folder) / "m.onnx", checked).predict(x)
        assert got.tolist() == model.predict(x).tolist()
        assert np.allclose(proba, model.predict_proba(x), atol=1e-5)


def test_metadata_that_contradicts_the_model_is_refused() -> None:
    model = onnx_of(fitted(rows()[1]))
    for wrong in ([1, 0], [5, 7], [0, 0]):
        with pytest.raises(ArtifactRejected, match="differ from the model's"):
            inspect_onnx(model, meta(wrong))
    assert inspect_onnx(model, meta([0, 1])).classes == [0, 1]


@pytest.mark.parametrize(
    "build, says",
    [
        (lambda y: onnx_of(fitted(y, LinearSVC())), "wrap it in CalibratedClassifierCV"),
        (lambda y: onnx_of(fitted(np.where(y == 1, "yes", "no"))), "classes are strings"),
        (lambda y: onnx_of(fitted(y), zipmap=True), "ZipMap"),
        (lambda y: onnx_of(LinearRegression().fit(rows()[0], y)), "regressor is not supported"),
    ],
    ids=["scores", "string-labels", "zipmap", "regressor"],
)
def test_what_is_not_supported_is_refused_saying_what_is(build: Any, says: str) -> None:
    with pytest.raises(ArtifactRejected, match=says.replace("(", r"\(").replace(")", r"\)")):
        inspect_onnx(build(rows()[1]), meta())


def test_a_model_exported_from_float64_data_serves_the_gateways_rows() -> None:
    """skl2onnx's ``to_onnx(model, X)`` with numpy's default float64 makes a double input:
    refused, though the gateway's float32 rows cast losslessly to it. Its answers are the
    scikit-learn model's on those rows."""
    x, y = rows()
    model = fitted(y)
    checked = inspect_onnx(onnx_of(model, double=True), meta())
    assert checked.classes == [0, 1]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "m.onnx").write_bytes(onnx_of(model, double=True))
        got, proba = OnnxClassifier(Path(folder) / "m.onnx", checked).predict(x)
    assert got.tolist() == model.predict(x.astype(np.float64)).tolist()
    assert proba.dtype == np.float32
    assert np.allclose(proba, model.predict_proba(x.astype(np.float64)), atol=1e-6)


def test_a_graph_that_names_no_classes_is_read_by_its_labels() -> None:
    """A graph that names no classes (skl2onnx's MLP, k-NN, naive Bayes keep them in a
    constant): the label each column stands for is read off the dry batch, and classes given
    that the labels do not follow are refused. Here each label is the other column's."""
    model = two_column_model(WIDTH, "Softmax", "ArgMin")
    assert inspect_onnx(model, meta()).classes == [1, 0]
    with pytest.raises(
        ArtifactRejected, match=r"classes \[0, 1\] differ from the model's \[1, 0\]"
    ):
        inspect_onnx(model, meta([0, 1]))


def test_a_graph_that_picks_its_label_from_a_constant_says_its_classes_order() -> None:
    """skl2onnx's MLP and k-NN keep their classes in a constant that the probabilities' arg
    max indexes. Read off the dry batch only, a wrong order of classes swapping two columns
    that never led there passed, and every answer's probabilities were swapped (a helper's
    probe: label 20 answered with P(20) = 0.003). Three classes, labelled 10, 20, 30."""
    x, _ = rows()
    labels = np.digitize(x[:, 0], np.quantile(x[:, 0], [1 / 3, 2 / 3])) * 10 + 10
    for estimator in (MLPClassifier((8,), max_iter=400, random_state=0),
                      KNeighborsClassifier(5)):  # fmt: skip
        model = fitted(labels, estimator)
        assert inspect_onnx(onnx_of(model), meta()).classes == [10, 20, 30]
        with pytest.raises(ArtifactRejected, match="differ from the model's"):
            inspect_onnx(onnx_of(model), meta([10, 30, 20]))


def test_classes_whose_order_cannot_be_checked_are_refused() -> None:
    """A graph that names no classes, and a column that leads on no trial row, even far out:
    the order given cannot be checked (else a wrong one swaps probabilities unseen)."""
    h = onnx.helper
    graph = h.make_graph(
        [
            h.make_node("Slice", ["x", "zero", "one", "axis"], ["c0"]),
            h.make_node("Slice", ["x", "one", "two", "axis"], ["c1"]),
            h.make_node("Sub", ["c0", "far"], ["c2"]),  # always below c0: never leads
            h.make_node("Concat", ["c0", "c1", "c2"], ["logits"], axis=1),
            h.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            h.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "third-never-leads",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, WIDTH])],
        [
            h.make_tensor_value_info("label", onnx.TensorProto.INT64, [None]),
            h.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 3]),
        ],
        [h.make_tensor(n, onnx.TensorProto.INT64, [1], [v])
         for n, v in (("zero", 0), ("one", 1), ("two", 2), ("axis", 1))]
        + [h.make_tensor("far", onnx.TensorProto.FLOAT, [1], [1e4])],
    )  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    data = bytes(model.SerializeToString())
    with pytest.raises(ArtifactRejected, match="cannot be checked"):
        inspect_onnx(data, meta([0, 1, 2]))
    assert inspect_onnx(data, meta()).classes == [0, 1, 2]  # its own column numbers


def test_a_fixed_batch_size_and_swapped_outputs_are_refused_saying_so() -> None:
    """A model exported for batches of exactly 64 rows passed the dry run (64 rows) and then
    failed every request of another size; a refusal raised inside the checks was reworded as
    the model failing on a batch."""
    model = fitted(rows()[1])
    fixed = to_onnx(model, initial_types=[("x", FloatTensorType([64, WIDTH]))],
                    options={id(model): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    with pytest.raises(ArtifactRejected, match=r"exactly 64 rows: export it with a free") as no:
        inspect_onnx(bytes(fixed.SerializeToString()), meta())
    assert "fails on a batch" not in str(no.value)
    swapped = onnx.load_model_from_string(onnx_of(model))
    outputs = list(swapped.graph.output)
    del swapped.graph.output[:]
    swapped.graph.output.extend(reversed(outputs))
    with pytest.raises(ArtifactRejected, match=r"outputs are \(probabilities, label\)"):
        inspect_onnx(bytes(swapped.SerializeToString()), meta())


def test_a_role_takes_the_deployments_features_in_order_and_its_classes() -> None:
    names = demo_data().names[:WIDTH]
    spec = FeatureSpec.from_names(names)
    assert unfit_for(meta([0, 1]), spec, [0, 1]) is None
    reversed_names = meta([0, 1], list(reversed(names)))
    assert "at position 0" in (unfit_for(reversed_names, spec, [0, 1]) or "")
    assert "classes [-1, 1]" in (unfit_for(meta([-1, 1]), spec, [0, 1]) or "")
    narrow = FeatureSpec.from_names(names[:3])
    assert "takes 4 features, the deployment feeds 3" in (
        unfit_for(meta([0, 1]), narrow, [0, 1]) or ""
    )


def test_reference_rows_are_bounded_as_they_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-column CSV of 16 MB held 1.4 GB of Python lists before the row cap refused it
    (found by hand): the bounds are checked line by line."""
    from gateway.admin import uploads
    from gateway.admin.bodies import Invalid

    monkeypatch.setattr(uploads, "MAX_REFERENCE_ROWS", 100)
    ok = uploads.reference_csv(b"a,b\n" + b"1,2\n" * 100, 10_000)
    assert ok["columns"] == ["a", "b"] and len(ok["rows"]) == 100
    with pytest.raises(Invalid, match="more than 100 rows"):
        uploads.reference_csv(b"a\n" + b"1\n" * 100_000, 10**7)
    with pytest.raises(Invalid, match="line 3"):
        uploads.reference_csv(b"a\n1\nx\n", 10_000)


def _bomb(kind: str, n: int) -> bytes:
    """A classifier of the demo's four-feature shape whose graph asks for ``n`` float32 values
    at once (``mem``) or ``n`` loop turns of a 64x64 product (``loop``), summed into nothing."""
    from onnx import TensorProto, numpy_helper

    h = onnx.helper
    inits = [numpy_helper.from_array(np.full((WIDTH, 2), 0.01, np.float32), "w"),
             numpy_helper.from_array(np.array(0, np.float32), "zero")]  # fmt: skip
    nodes = [h.make_node("MatMul", ["x", "w"], ["logits0"])]
    if kind == "mem":
        inits.append(numpy_helper.from_array(np.array([n], np.int64), "shape"))
        value = h.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        nodes += [h.make_node("ConstantOfShape", ["shape"], ["big"], value=value),
                  h.make_node("ReduceSum", ["big"], ["s"], keepdims=0)]  # fmt: skip
    else:
        inits += [numpy_helper.from_array(np.array(n, np.int64), "trips"),
                  numpy_helper.from_array(np.array(True), "cond"),
                  numpy_helper.from_array(np.eye(64, dtype=np.float32), "v0")]  # fmt: skip
        body = h.make_graph(
            [h.make_node("Identity", ["cin"], ["cout"]), h.make_node("MatMul", ["v", "v"], ["vo"])],
            "body",
            [h.make_tensor_value_info("i", TensorProto.INT64, []),
             h.make_tensor_value_info("cin", TensorProto.BOOL, []),
             h.make_tensor_value_info("v", TensorProto.FLOAT, [64, 64])],
            [h.make_tensor_value_info("cout", TensorProto.BOOL, []),
             h.make_tensor_value_info("vo", TensorProto.FLOAT, [64, 64])],
        )  # fmt: skip
        nodes += [h.make_node("Loop", ["trips", "cond", "v0"], ["end"], body=body),
                  h.make_node("ReduceSum", ["end"], ["s"], keepdims=0)]  # fmt: skip
    nodes += [
        h.make_node("Mul", ["s", "zero"], ["z"]),
        h.make_node("Add", ["logits0", "z"], ["logits"]),
        h.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        h.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = h.make_graph(
        nodes, "bomb", [h.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
        [h.make_tensor_value_info("label", TensorProto.INT64, [None]),
         h.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])], inits,
    )  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_an_uploads_dry_run_is_bounded_in_memory_and_time() -> None:
    """A 656-byte model took a gateway process to 2.1 GB, and a 17 kB loop burned 18 s of its
    CPU and would have run for ever (found by hand): the dry run is a child process of
    bounded memory and time, and the upload is refused past them."""
    from models.isolated_inspection import inspect_isolated

    assert len(_bomb("mem", 2**31)) < 1000
    with pytest.raises(ArtifactRejected, match="memory"):
        inspect_isolated(_bomb("mem", 2**31), meta())  # 8 GB asked
    with pytest.raises(ArtifactRejected, match="longer than 2 s"):
        inspect_isolated(_bomb("loop", 10**12), meta(), timeout_s=2)
    fine = inspect_isolated(_bomb("loop", 3), meta())  # the same graphs, small: accepted
    assert fine.classes == [0, 1]
    model = onnx_of(fitted(rows()[1]))
    assert inspect_isolated(model, meta()) == inspect_onnx(model, meta())
