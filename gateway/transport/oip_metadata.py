"""What the Open Inference Protocol says about a model: the versions of a deployment that hold
a role, the deployment a ``/v2`` path names (``UnknownVersion``, a 404, for a version that holds
none), and the model metadata document with the class count it reports (from the registry's
index in Redis, else this gateway's data folder). The routes in ``gateway.transport.oip`` use it
for metadata, readiness and infer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import Request

from gateway.dataplane.answers import pinned_role
from gateway.dataplane.deployments import DeploymentCache
from gateway.transport.oip_lookup import lookup_inputs
from gateway.transport.oip_schema import INPUT, LABEL, PROBABILITIES
from models.deployments import Deployment, ModelRef
from models.registry import ModelRegistry
from rendezvous import names

PLATFORM = "onnxruntime"


def deployment_of(deployments: DeploymentCache, model: str, version: str | None) -> Deployment:
    """The deployment a ``/v2`` path names; ``UnknownVersion`` (404) for a version that
    holds no role of it."""
    dep = deployments.get(model)
    if version is not None:
        pinned_role(dep, version)
    return dep


def model_metadata(dep: Deployment, classes: int | None) -> dict[str, Any]:
    """The deployment as a model; a deployment whose models take float64 says FP64 and one
    with an integer model INT64 or INT32 (FP64 is taken too), which carry each of its values
    exactly (FP32 rounds past 2**24)."""
    rule = dep.input_rule
    datatype = "FP32" if rule is None else "FP64" if rule.integer is None else rule.integer.upper()
    return {
        "name": dep.name,
        "versions": dep.versions,
        "platform": PLATFORM,
        "inputs": (
            lookup_inputs(dep.feature_spec, datatype)
            if dep.feature_spec.lookup is not None
            else [{"name": INPUT, "datatype": datatype, "shape": [-1, dep.feature_spec.width]}]
        ),
        "outputs": [
            {"name": LABEL, "datatype": "INT64", "shape": [-1]},
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes or -1]},
        ],
    }


def model_config(metadata: dict[str, Any], max_rows: int) -> dict[str, Any]:
    """The metadata as Triton's model configuration (``tritonclient``'s ``get_model_config``,
    which Triton-style code reads for ``max_batch_size`` and each tensor's dims): the rows are
    the batch dimension, up to the gateway's row cap, so dims leave it out; a tensor of one
    value a row is Triton's ``dims [1]`` reshaped to none."""

    def tensor(doc: dict[str, Any]) -> dict[str, Any]:
        datatype = "STRING" if doc["datatype"] == "BYTES" else doc["datatype"]
        dims = doc["shape"][1:]
        out = {"name": doc["name"], "data_type": f"TYPE_{datatype}", "dims": dims or [1]}
        return out if dims else {**out, "reshape": {"shape": []}}

    return {
        "name": metadata["name"],
        "platform": f"{PLATFORM}_onnx",
        "backend": PLATFORM,
        "max_batch_size": max_rows,
        "input": [tensor(doc) for doc in metadata["inputs"]],
        "output": [tensor(doc) for doc in metadata["outputs"]],
    }


_CLASS_COUNTS: dict[str, int] = {}
"""Classes per ``name:version``: a version never changes (its number is never reused), and
its index entry, parsed on every anonymous metadata GET, took 414 ms when fat (found by hand)."""
_KEPT = 4096


async def class_count(request: Request, ref: ModelRef, models_dir: Path) -> int | None:
    """How many classes the model version answers, from the registry's index in Redis, else
    from this gateway's data folder; None when neither has it."""
    key = f"{ref.name}:{ref.version}"  # same field as the registry's
    if key in _CLASS_COUNTS:
        return _CLASS_COUNTS[key]
    raw = await request.app.state.redis.hget(names.MODELS_INDEX, key)
    if raw is not None:
        count = len(json.loads(raw)["classes"])
        if len(_CLASS_COUNTS) >= _KEPT:
            _CLASS_COUNTS.clear()
        _CLASS_COUNTS[key] = count
        return count

    def from_disk() -> int | None:
        try:
            return len(ModelRegistry(models_dir).meta(ref.name, ref.version).classes)
        except (OSError, LookupError, ValueError):
            return None

    return await asyncio.to_thread(from_disk)


__all__ = [
    "PLATFORM",
    "class_count",
    "deployment_of",
    "model_config",
    "model_metadata",
]
