"""``inspect_onnx`` in a child process of bounded memory and time: an upload's dry run is the
one place the gateway runs a model it has never seen, and a 656-byte ONNX file can ask
onnxruntime for gigabytes (``ConstantOfShape``) or loop for ever (``Loop``) inside the gateway
process (found by hand). The child gets the artifact and the metadata in a folder of its own
and answers one JSON line; past its bounds it is killed and the upload refused.

    python -m models.isolated_inspection FOLDER MEMORY_BYTES CPU_S   (the child's side)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from models.inspection import ArtifactRejected, inspect_onnx
from models.meta import ModelMeta

BASE_MEMORY_BYTES = 1 << 30
"""Address space a dry run may use beyond eight times its artifact (numpy, onnx and
onnxruntime take about 230 MB of it for the demo's model)."""
TIMEOUT_S = 30.0


def memory_bound(artifact_bytes: int) -> int:
    return BASE_MEMORY_BYTES + 8 * artifact_bytes


def inspect_isolated(
    data: bytes, meta: ModelMeta, timeout_s: float = TIMEOUT_S, reference: Any = None
) -> ModelMeta:
    """What ``inspect_onnx`` answers, from a child process; ArtifactRejected as well when the
    child runs out of memory or time. With ``reference`` rows (float32, rows x features), the
    answer carries the model's ``score_reference`` on them (and a multiclass model's
    ``class_reference``), scored in the child too: in the gateway, a trapped model took 2.4 GB
    or 85 s of it there, after its dry run had passed (found by a helper's security probe)."""
    limit = memory_bound(len(data))
    with tempfile.TemporaryDirectory(prefix="rdv-inspect-") as folder:
        Path(folder, "model.onnx").write_bytes(data)
        Path(folder, "meta.json").write_text(json.dumps(meta.to_dict()))
        if reference is not None:
            np.save(Path(folder, "reference.npy"), np.asarray(reference, np.float32))

        # The child bounds itself before it loads anything (a preexec_fn is not safe in the
        # gateway's threaded process); the wall-clock timeout is ours.
        command = [sys.executable, "-m", "models.isolated_inspection", folder, str(limit),
                   str(int(timeout_s) + 1)]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ArtifactRejected(
                f"the model's dry run took longer than {timeout_s:g} s"
            ) from None
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if "rejected" in answer:
        raise ArtifactRejected(str(answer["rejected"]))
    if done.returncode != 0 or "meta" not in answer:
        raise ArtifactRejected(
            f"the model's dry run failed within {limit >> 20} MB of memory and "
            f"{timeout_s:g} s (exit {done.returncode})"
        )
    return ModelMeta.from_dict(answer["meta"])


def _child(folder: Path, memory_bytes: int, cpu_s: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    meta = ModelMeta.from_dict(json.loads((folder / "meta.json").read_text()))
    try:
        checked = inspect_onnx((folder / "model.onnx").read_bytes(), meta)
        reference = folder / "reference.npy"
        if reference.exists() and len(checked.classes) >= 2:
            checked = _with_score_reference(checked, folder / "model.onnx", np.load(reference))
    except ArtifactRejected as exc:
        print(json.dumps({"rejected": str(exc)}))
        return
    except MemoryError:
        print(json.dumps({"rejected": "the model's dry run ran out of memory"}))
        return
    print(json.dumps({"meta": checked.to_dict()}))


def _with_score_reference(meta: ModelMeta, artifact: Path, reference: Any) -> ModelMeta:
    """The share of the model's scores per score bin on the reference rows, and a multiclass
    model's predicted-class mix on them: what the prediction-prior detector, the score drift
    and the class drift read live answers against."""
    from models.reference import prediction_references
    from models.runtime import ModelAnswerError, OnnxClassifier

    try:
        model = OnnxClassifier(artifact, meta)
        _labels, proba = model.predict(model.takes(reference))
    except ModelAnswerError as exc:
        raise ArtifactRejected(f"on the reference rows, {exc}") from None
    return ModelMeta.from_dict({**meta.to_dict(), **prediction_references(proba)})


if __name__ == "__main__":
    _child(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
