"""The service's answer as an Open Inference Protocol v2 response (``encode_answer``): the
outputs ``label`` (INT64, one per row) and ``probabilities`` (FP32, rows x classes, in the
model's class order), each in JSON or, when asked for, as the binary tensor data extension's
little-endian bytes after the JSON part. The request's side is ``gateway.transport.oip_codec``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.transport.oip_schema import LABEL, PROBABILITIES


def encode_answer(
    answer: dict[str, Any], outputs: Sequence[tuple[str, bool]], model: str, version: str
) -> tuple[bytes, int | None]:
    """The service's answer as an OIP inference response: the body, and the length of its
    JSON part when binary outputs follow it (None: all JSON). ``version``: the answering
    model's version as the protocol names it (``Deployment.version_name``). ValueError when
    the model answered a probability that is not finite."""
    predictions = answer["predictions"]
    tensors = {
        LABEL: ("INT64", np.array([p["label"] for p in predictions], dtype="<i8")),
        PROBABILITIES: (
            "FP32",
            np.array([list(p["probabilities"].values()) for p in predictions], dtype="<f4"),
        ),
    }
    if not np.isfinite(tensors[PROBABILITIES][1]).all():
        raise ValueError("non-finite probability")
    found = answer["model"]
    docs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in outputs:
        datatype, array = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.reshape(-1).tolist()
        docs.append(out)
    doc = {
        "model_name": model,
        "model_version": version,
        "id": answer["request_id"],
        "parameters": {
            "role": found["role"],
            "model": found["name"],
            "latency_ms": answer["latency_ms"],
        },
        "outputs": docs,
    }
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
