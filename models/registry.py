"""The model registry: versioned ONNX artifacts with their metadata, in the data folder.

Layout: ``<data>/models/<name>/<version>/model.onnx`` beside ``meta.json``. An artifact is
written to a temporary name and renamed into place, so a reader never sees half a model.
Nothing here unpickles anything: a model is ONNX bytes plus JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.spec import FeatureSpec
from rendezvous.names import check_name


class ModelNotFound(LookupError):
    pass


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

    def to_dict(self) -> dict[str, Any]:
        return {
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
        }

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
        )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ModelRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, name: str, version: int) -> Path:
        if int(version) < 1:
            raise ValueError("model versions start at 1")
        return self.root / check_name(name, "model name") / str(int(version))

    def save(self, meta: ModelMeta, onnx_bytes: bytes) -> ModelMeta:
        """Store an artifact; its sha256 is computed here, never taken on trust."""
        digest = sha256_hex(onnx_bytes)
        if meta.sha256 and meta.sha256 != digest:
            raise ValueError("metadata sha256 does not match the artifact")
        stored = ModelMeta.from_dict({**meta.to_dict(), "sha256": digest})
        d = self._dir(meta.name, meta.version)
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / "model.onnx", onnx_bytes)
        _write_atomic(d / "meta.json", json.dumps(stored.to_dict(), indent=2).encode())
        return stored

    def exists(self, name: str, version: int) -> bool:
        d = self._dir(name, version)
        return (d / "meta.json").exists() and (d / "model.onnx").exists()

    def meta(self, name: str, version: int) -> ModelMeta:
        path = self._dir(name, version) / "meta.json"
        try:
            return ModelMeta.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ModelNotFound(f"model {name} version {version} is not in the registry") from None

    def artifact_path(self, name: str, version: int) -> Path:
        path = self._dir(name, version) / "model.onnx"
        if not path.exists():
            raise ModelNotFound(f"model {name} version {version} has no artifact")
        return path

    def verify(self, name: str, version: int) -> bool:
        """True when the artifact on disk still has the sha256 recorded at save time."""
        return (
            sha256_hex(self.artifact_path(name, version).read_bytes())
            == self.meta(name, version).sha256
        )

    def list(self) -> list[ModelMeta]:
        out: list[ModelMeta] = []
        if not self.root.exists():
            return out
        for name_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            versions = [p for p in name_dir.iterdir() if p.is_dir() and p.name.isdigit()]
            for vdir in sorted(versions, key=lambda p: int(p.name)):
                if (vdir / "meta.json").exists():
                    out.append(self.meta(name_dir.name, int(vdir.name)))
        return out
