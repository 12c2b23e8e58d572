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

from models.meta import ModelMeta

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
    import numpy as np
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
    width = meta.feature_spec.width
    try:
        # Loaded from a file alone in a fresh folder: were any reference to external data left,
        # it could only resolve to that folder, never to the server's working directory.
        with tempfile.TemporaryDirectory(prefix="rdv-upload-") as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(data)
            model = OnnxClassifier(path, meta)
        _labels, proba = model.predict(np.zeros((2, width), np.float32))
    except ModelLoadError as exc:
        raise ArtifactRejected(str(exc)) from None
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ArtifactRejected(
            f"the model fails on a batch of {width} features per row: {exc}"
        ) from None
    if proba.ndim != 2 or proba.shape[0] != 2:
        raise ArtifactRejected(
            f"expected probabilities of shape (rows, classes), got {proba.shape}"
        )
    if not np.isfinite(proba).all():
        raise ArtifactRejected(
            "the model outputs non-finite probabilities (NaN or infinity) on a dry batch"
        )
    n_classes = int(proba.shape[1])
    classes = meta.classes or list(range(n_classes))
    if len(classes) != n_classes:
        raise ArtifactRejected(
            f"the metadata names {len(classes)} classes, the model "
            f"outputs {n_classes} probabilities"
        )
    class_names = meta.class_names or [str(c) for c in classes]
    if len(class_names) != n_classes:
        raise ArtifactRejected("class_names must name every class")
    return ModelMeta.from_dict({**meta.to_dict(), "classes": classes, "class_names": class_names})
