"""Checks on an uploaded ONNX artifact before anything is stored: parsed as protobuf (never
unpickled), self-contained, standard operators only, loadable and runnable by onnxruntime at
the deployment's input width.

onnxruntime is imported by ``inspect_onnx`` itself, when an upload is checked: the gateway
imports this module (its admin service) but never loads a model otherwise, and onnxruntime
would cost each gateway process about 20 MB.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.meta import ModelMeta
from rendezvous.input_types import ONNX_TYPES

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
"""Operator sets a model may use: standard ONNX and ONNX-ML (what skl2onnx emits), no custom
operators that would need native code the server does not have."""


class ArtifactRejected(ValueError):
    """An uploaded artifact that is not a self-contained ONNX classifier fitting its spec."""


def _graphs(graph: Any) -> Iterable[Any]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _tensors(graph: Any) -> Iterable[Any]:
    """Every tensor the model carries, in subgraphs too; a sparse tensor as its values and its
    indices (each may point at external data)."""
    for g in _graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
                for sparse in attr.sparse_tensors:
                    yield from (sparse.values, sparse.indices)


def _node_domains(proto: Any) -> set[str]:
    """The operator domain of every node, in subgraphs and local functions too."""
    domains = {node.domain for g in _graphs(proto.graph) for node in g.node}
    for function in proto.functions:
        domains.add(function.domain)
        domains.update(node.domain for node in function.node)
    return domains


def inspect_onnx(data: bytes, meta: ModelMeta) -> ModelMeta:
    """Check an upload before anything is stored: ONNX (parsed as protobuf, never unpickled),
    no external data files (they would be read from the server's disk), standard operators
    only, loadable by onnxruntime, one input of the feature spec's width, and a dry run on a
    batch of that width. Returns ``meta`` with the classes the model really outputs."""
    import onnx
    from google.protobuf.message import DecodeError

    from models.runtime import ModelLoadError, OnnxClassifier

    if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
        raise ArtifactRejected(
            "this looks like a Python pickle or a zip archive, not ONNX; export the model "
            "to ONNX (for scikit-learn: skl2onnx) and upload that"
        )
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ArtifactRejected(f"not an ONNX model: {exc}") from None
    if not proto.graph.node:
        raise ArtifactRejected("not an ONNX model: no graph nodes")
    domains = ({op.domain for op in proto.opset_import} | _node_domains(proto)) - ALLOWED_DOMAINS
    if domains:
        raise ArtifactRejected(
            f"the model uses operator sets this server does not run: {sorted(domains)}"
        )
    for tensor in _tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise ArtifactRejected(
                "the model refers to external data files; upload a self-contained ONNX file"
            )
    graph_classes = _graph_classes(proto)
    width = meta.feature_spec.width
    try:
        # Loaded from a file alone in a fresh folder: were any reference to external data left,
        # it could only resolve to that folder, never to the server's working directory.
        with tempfile.TemporaryDirectory(prefix="rdv-upload-") as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(data)
            model = OnnxClassifier(path, meta)
        _check_io(model)
        rows = model.takes(_dry_rows(meta))
        labels, proba = model.predict(rows)
        seen = (labels, proba)
        if graph_classes is None and not _every_column_led(proba):
            seen = _seen_far_out(model, meta, labels, proba)
    except ModelLoadError as exc:
        raise ArtifactRejected(str(exc)) from None
    except ArtifactRejected:
        raise
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ArtifactRejected(
            f"the model fails on a batch of {width} features per row: {exc}"
        ) from None
    classes = _classes(meta, graph_classes or _column_labels(*seen), proba, len(rows))
    _check_answers(labels, proba, classes)
    if graph_classes is None:
        _check_order(*seen, classes)
    if graph_classes is None and meta.classes and not _every_column_led(seen[1]):
        raise ArtifactRejected(
            f"the model's graph does not say which class each probability column stands for, "
            f"and on {len(seen[1])} trial rows not every column led, so the order of classes "
            f"{list(meta.classes)} cannot be checked (a wrong one would swap probabilities): "
            "upload reference rows (reference), on which every class shows"
        )
    class_names = meta.class_names or [str(c) for c in classes]
    if len(class_names) != len(classes):
        raise ArtifactRejected("class_names must name every class")
    if len(set(class_names)) != len(class_names):  # a label by name would be ambiguous
        twice = sorted({n for n in class_names if class_names.count(n) > 1})[:5]
        raise ArtifactRejected(f"class_names must be distinct: {twice} name several classes")
    return ModelMeta.from_dict({**meta.to_dict(), "classes": classes, "class_names": class_names,
                                "input_type": model.input_type})  # fmt: skip


SUPPORTED = (
    "this server serves classifiers exported by skl2onnx with zipmap=False: one numeric input "
    "[rows, features] of float32, float64, int64 or int32, outputs (label, probabilities), "
    "integer class labels"
)


def _graph_classes(proto: Any) -> list[int] | None:
    """The class labels the model's classifier operator declares (ONNX-ML's
    ``classlabels_*`` attributes: the order of its probability columns), or None when no
    operator says. String labels are refused unless each is an integer."""
    found: list[Any] | None = None
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name in ("classlabels_int64s", "classlabels_ints") and attr.ints:
                found = list(attr.ints)
            elif attr.name == "classlabels_strings" and attr.strings:
                found = [raw.decode("utf-8", "replace") for raw in attr.strings]
        if found is not None and node.op_type.endswith("Classifier"):
            break  # the classifier's own, not a ZipMap's after it
    if found is None:
        found = _indexed_classes(proto)
    if found is None:
        return None
    try:
        return [int(label) for label in found]
    except ValueError:
        raise ArtifactRejected(
            f"the model's classes are strings {found[:10]}: {SUPPORTED}; train on integers "
            "(e.g. LabelEncoder) and give the strings as class_names"
        ) from None


def _indexed_classes(proto: Any) -> list[Any] | None:
    """The classes of a graph that picks its label from a constant by the probabilities'
    arg max (skl2onnx's MLP, k-neighbours and others: ``ArrayFeatureExtractor(classes,
    ArgMax(...))``), in the order of the columns; None unless exactly one constant is so
    indexed. Without it, a wrong order of ``classes`` swapped the probabilities of classes
    that never led on the dry batch (found by a helper's probe)."""
    from onnx import numpy_helper

    constants = {t.name: t for t in proto.graph.initializer}
    made_by = {out: node for node in proto.graph.node for out in node.output}
    found = []
    for node in proto.graph.node:
        if node.op_type != "ArrayFeatureExtractor" or len(node.input) != 2:
            continue
        source = made_by.get(node.input[1])
        if source is None or source.op_type != "ArgMax" or node.input[0] not in constants:
            continue
        values = numpy_helper.to_array(constants[node.input[0]]).ravel()
        found.append([v.decode() if isinstance(v, bytes) else v.item() for v in values])
    return found[0] if len(found) == 1 and len(set(found[0])) == len(found[0]) else None


def _every_column_led(proba: Any) -> bool:
    """Each probability column clearly led on some row of the batch."""
    if proba.ndim != 2 or proba.shape[1] < 2:
        return True
    top = np.sort(proba, axis=1)
    clear = top[:, -1] - top[:, -2] > 1e-3
    return len(set(proba.argmax(axis=1)[clear].tolist())) == proba.shape[1]


def _column_labels(labels: Any, proba: Any) -> list[int] | None:
    """For a graph that names no classes (skl2onnx keeps some models' classes in a constant
    it indexes): the label each probability column stands for, read off the dry batch where
    one column clearly leads; None unless every column led somewhere, each to one label."""

    if proba.ndim != 2 or proba.shape[1] < 2 or len(labels) != len(proba):
        return None
    top = np.sort(proba, axis=1)
    clear = top[:, -1] - top[:, -2] > 1e-3
    by_column: dict[int, set[int]] = {}
    for column, label in zip(proba.argmax(axis=1)[clear], labels[clear], strict=True):
        by_column.setdefault(int(column), set()).add(int(label))
    if len(by_column) != proba.shape[1] or any(len(v) != 1 for v in by_column.values()):
        return None
    found = [next(iter(by_column[j])) for j in range(proba.shape[1])]
    return found if len(set(found)) == len(found) else None


def _check_io(model: Any) -> None:
    """What the session says of its input and outputs, before a batch meets it."""
    [given] = model.session.get_inputs()
    width = model.meta.feature_spec.width
    if given.type not in ONNX_TYPES:
        # strings (StringTensorType) would need text features through the whole path, the
        # archive's float views, drift and replays included; other widths are rare in skl2onnx
        raise ArtifactRejected(
            f"the model's input is {given.type}, which this server does not feed: {SUPPORTED} "
            "(skl2onnx: FloatTensorType, DoubleTensorType or Int64TensorType; encode text "
            "features as numbers before the model)"
        )
    if given.shape and isinstance(given.shape[0], int):
        # the gateway batches requests of any number of rows: a fixed batch size passed a dry
        # run of exactly that many rows, then failed every other request (a helper's probe)
        raise ArtifactRejected(
            f"the model's input takes batches of exactly {given.shape[0]} rows: export it with "
            f"a free batch dimension (skl2onnx: FloatTensorType([None, {width}]))"
        )
    label, proba = model.session.get_outputs()
    if str(label.type) == "tensor(float)" and str(proba.type).startswith("tensor(int"):
        raise ArtifactRejected(
            f"the model's outputs are (probabilities, label): {SUPPORTED}, label first"
        )
    if not str(proba.type).startswith("tensor("):
        raise ArtifactRejected(
            f"the probabilities output is {proba.type} (a ZipMap): {SUPPORTED}; export with "
            "options={id(model): {'zipmap': False}}"
        )


def _dry_rows(meta: ModelMeta) -> Any:
    """Rows to try the model on: zeros, then rows drawn within each feature's training range
    (or around zero when the spec has no statistics), so that several classes may show."""
    spec = meta.feature_spec
    rng = np.random.default_rng(0)
    low = np.array([spec.stats[n].min if n in spec.stats else -1.0 for n in spec.names])
    high = np.array([spec.stats[n].max if n in spec.stats else 1.0 for n in spec.names])
    drawn = rng.uniform(low, high, size=(62, spec.width))
    return np.vstack([np.zeros((2, spec.width)), drawn]).astype(np.float32)


def _seen_far_out(model: Any, meta: ModelMeta, labels: Any, proba: Any) -> tuple[Any, Any]:
    """The dry batch's answers with those on rows far out (``_wide_rows``) where they are
    finite: which class a column stands for shows only where it leads, and a column that never
    leads within the training range may lead far from it. Only for reading the columns: the
    model is not held to answers far outside what it was trained on."""
    try:
        far_labels, far_proba = model.predict(model.takes(_wide_rows(meta)))
    except Exception:  # it may fail out there; the dry batch stands alone then
        return labels, proba
    finite = np.isfinite(far_proba).all(axis=1)
    return (np.concatenate([labels, far_labels[finite]]),
            np.vstack([proba, far_proba[finite]]))  # fmt: skip


def _wide_rows(meta: ModelMeta) -> Any:
    """More rows, spread 3, 10 and 100 times as wide around the training range's middle (a
    column that never leads within the range may lead far out), and each feature alone at
    either end of that: 64 rows at each scale, and two a feature."""
    spec = meta.feature_spec
    rng = np.random.default_rng(1)
    low = np.array([spec.stats[n].min if n in spec.stats else -1.0 for n in spec.names])
    high = np.array([spec.stats[n].max if n in spec.stats else 1.0 for n in spec.names])
    middle, half = (low + high) / 2, np.maximum((high - low) / 2, 1e-3)
    scaled = [middle + rng.uniform(-s, s, size=(64, spec.width)) * half for s in (3, 10, 100)]
    alone = np.repeat(middle[None, :], 2 * spec.width, axis=0)
    for f in range(spec.width):
        alone[2 * f, f] = middle[f] - 10 * half[f]
        alone[2 * f + 1, f] = middle[f] + 10 * half[f]
    limit = np.finfo(np.float32).max / 2
    return np.clip(np.vstack([*scaled, alone]), -limit, limit).astype(np.float32)


def _classes(meta: ModelMeta, graph: list[int] | None, proba: Any, rows: int) -> list[int]:
    """The classes in the order of the probability columns: the graph's, which the metadata
    may repeat but not contradict."""
    if proba.ndim != 2 or proba.shape[0] != rows:
        raise ArtifactRejected(
            f"expected probabilities of shape (rows, classes), got {proba.shape}: {SUPPORTED}"
        )
    n_classes = int(proba.shape[1])
    if n_classes < 2:
        raise ArtifactRejected(
            f"the second output has {n_classes} column, a classifier's probabilities one per "
            "class (a model without predict_proba, such as LinearSVC, answers scores: wrap it "
            "in CalibratedClassifierCV)"
        )
    if meta.classes and graph is not None and list(meta.classes) != graph:
        raise ArtifactRejected(
            f"the metadata's classes {list(meta.classes)} differ from the model's {graph} (the "
            "order of its probability columns): leave classes out, or give them in that order"
        )
    classes = list(meta.classes or graph or range(n_classes))
    if len(classes) != n_classes:
        raise ArtifactRejected(
            f"the metadata names {len(classes)} classes, the model "
            f"outputs {n_classes} probabilities"
        )
    if len(set(classes)) != len(classes):
        raise ArtifactRejected(f"classes must be distinct, got {classes}")
    return classes


def _check_answers(labels: Any, proba: Any, classes: list[int]) -> None:
    """Probabilities that are probabilities, and labels among the classes."""
    from models.runtime import PROBABILITY_NOISE

    if not np.isfinite(proba).all():
        raise ArtifactRejected(
            "the model outputs non-finite probabilities (NaN or infinity) on a dry batch (zeros "
            "and rows drawn within each feature's training range: reference rows of huge "
            "values make a range the model overflows on)"
        )
    sums = proba.sum(axis=1)
    if (
        proba.min() < -PROBABILITY_NOISE
        or proba.max() > 1 + PROBABILITY_NOISE
        or (np.abs(sums - 1).max() > 1e-3)
    ):
        raise ArtifactRejected(
            "the second output is not probabilities (each row in [0, 1], summing to 1; got "
            f"values {float(proba.min()):.4g} to {float(proba.max()):.4g}, row sums "
            f"{float(sums.min()):.4g} to {float(sums.max()):.4g}): {SUPPORTED} (a model "
            "without predict_proba, such as LinearSVC, answers scores: wrap it in "
            "CalibratedClassifierCV)"
        )
    unknown = sorted(set(labels.tolist()) - set(classes))
    if unknown:
        raise ArtifactRejected(
            f"the model's labels {unknown[:10]} are not among its classes {classes}: give "
            "classes as the model's labels, in the order of its probability columns"
        )


def _check_order(labels: Any, proba: Any, classes: list[int]) -> None:
    """Where the graph names no classes: labels that follow the columns in the order given."""
    top = np.sort(proba, axis=1)
    clear = top[:, -1] - top[:, -2] > 1e-3
    by_column = np.asarray(classes)[proba.argmax(axis=1)]
    if clear.any() and (by_column[clear] == labels[clear]).mean() < 0.95:
        raise ArtifactRejected(
            f"the labels do not follow the probability columns in the order of classes "
            f"{classes}: give classes in the model's column order"
        )
