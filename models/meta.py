"""A model version's metadata: what the registry stores beside each ONNX artifact and what the
runtime, the drift monitor and the admin API read of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rendezvous.input_types import FLOAT32
from rendezvous.spec import FeatureSpec


@dataclass(frozen=True, slots=True)
class ModelMeta:
    name: str
    version: int
    feature_spec: FeatureSpec
    classes: list[int]
    class_names: list[str]
    sha256: str
    created_at: str
    metrics: dict[str, float] = field(default_factory=dict)
    algorithm: str = ""
    description: str = ""
    size_bytes: int = 0
    score_reference: list[float] | None = None
    """Share of the score in each of the ten score bins (0.0-0.1, ..., 0.9-1.0) on rows the
    model was not fitted on: what its scores should look like when the inputs have not
    drifted. The score is the positive class's probability of a binary model, the top
    probability of each row of a multiclass one (as ``drift_feed`` counts it live). None for
    models that came without one."""
    class_reference: list[float] | None = None
    """A multiclass model's predicted-class mix on those rows: the share of rows whose arg max
    is each class, in the order of ``classes`` (its probability columns). What the class drift
    compares real's live predictions with; None for binary models (their score histogram says
    as much) and for models that came without reference rows."""
    input_type: str = FLOAT32
    """The type its input tensor takes (``rendezvous.input_types``), read at upload; written
    only when not float32, so a float32 model's metadata reads as before. (A float64 model
    uploaded before it was recorded reads as float32: its rows travel as float32, as then.)"""

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "feature_spec": self.feature_spec.to_dict(),
            "classes": self.classes,
            "class_names": self.class_names,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "metrics": self.metrics,
            "algorithm": self.algorithm,
            "description": self.description,
            "size_bytes": self.size_bytes,
            "score_reference": self.score_reference,
            # only when there is one: a binary model's metadata stays what it was
            **({"class_reference": self.class_reference} if self.class_reference else {}),
        }
        if self.input_type != FLOAT32:
            doc["input_type"] = self.input_type
        return doc

    def summary(self) -> dict[str, Any]:
        """Everything but the feature statistics (for listings)."""
        doc = self.to_dict()
        spec = doc.pop("feature_spec")
        doc["feature_spec"] = {"version": spec["version"], "width": len(spec["names"])}
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelMeta:
        return cls(
            name=doc["name"],
            version=int(doc["version"]),
            feature_spec=FeatureSpec.from_dict(doc["feature_spec"]),
            classes=[int(c) for c in doc["classes"]],
            class_names=[str(c) for c in doc.get("class_names", doc["classes"])],
            sha256=doc["sha256"],
            created_at=doc["created_at"],
            metrics={k: float(v) for k, v in doc.get("metrics", {}).items()},
            algorithm=doc.get("algorithm", ""),
            description=doc.get("description", ""),
            size_bytes=int(doc.get("size_bytes", 0)),
            score_reference=(
                None
                if doc.get("score_reference") is None
                else [float(v) for v in doc["score_reference"]]
            ),
            class_reference=(
                [float(v) for v in doc["class_reference"]] if doc.get("class_reference") else None
            ),
            input_type=str(doc.get("input_type", FLOAT32)),
        )


def unfit_for(meta: ModelMeta, spec: FeatureSpec, classes: Sequence[int]) -> str | None:
    """Why ``meta`` cannot score a deployment's rows (``spec``) beside a real model of
    ``classes``, or None: the same features in the same order (a model trained on another
    order would be fed the wrong columns without a word), and the same classes (answers on
    other classes cannot be compared, nor judged against the same labels)."""
    model = f"model {meta.name} v{meta.version}"
    if meta.feature_spec.width != spec.width:
        return (
            f"{model} takes {meta.feature_spec.width} features, the deployment feeds {spec.width}"
        )
    for i, (theirs, ours) in enumerate(zip(meta.feature_spec.names, spec.names, strict=True)):
        if theirs != ours:
            return (f"{model} takes feature {theirs!r} at position {i}, where the deployment "
                    f"feeds {ours!r}: its feature names, in their order, must be the "
                    "deployment's")  # fmt: skip
    if list(meta.classes) != list(classes):
        return (f"{model} has classes {list(meta.classes)}, the deployment's real model "
                f"{list(classes)}: their answers could not be compared")  # fmt: skip
    return None
