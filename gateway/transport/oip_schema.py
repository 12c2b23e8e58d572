"""The Open Inference Protocol v2's names and the JSON part of its inference request, as
pydantic models (``InferenceRequest``): what the codec (``oip_codec``) parses against, what
the metadata routes name, and what the OpenAPI document shows."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from rendezvous.spec import WHOLE_INPUT

INPUT = WHOLE_INPUT
"""The one input of every model: FP32 (or FP64) [rows, features], columns in the deployment's
feature-spec order. One input per feature, named as in the spec, is taken too."""
LABEL = "label"
PROBABILITIES = "probabilities"
OUTPUTS = (LABEL, PROBABILITIES)
HEADER_LENGTH = "inference-header-content-length"
DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
                                    "INT64": np.dtype("<i8"), "INT32": np.dtype("<i4")}  # fmt: skip
"""Numeric input datatypes taken, as little-endian numpy types (the binary extension's byte
order). INT64 and INT32 only for a deployment of an integer model (``InferRequest.integers``)."""
BYTES = "BYTES"
"""Strings: entity ids, for a deployment that looks features up; held as str objects."""
MAX_ID_CHARS = 128
"""An ``id`` becomes the request id: limited as ``X-Request-Id`` is."""


MAX_VALUES = 2**31
"""Most values a shape may describe (its zero dimensions aside): far past any request the
row bound lets through, and short of what numpy refuses to shape."""


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(max_length=8)
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: Any = None
    """Numbers, flat in row-major order or nested as the shape; absent for a binary input."""


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """The JSON part of an inference request (``$inference_request``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {"name": INPUT, "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
                    ],
                }
            ]
        },
    )

    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


__all__ = [
    "BYTES",
    "DTYPES",
    "HEADER_LENGTH",
    "INPUT",
    "LABEL",
    "MAX_ID_CHARS",
    "MAX_VALUES",
    "OUTPUTS",
    "PROBABILITIES",
    "InferenceRequest",
    "RequestInput",
    "RequestOutput",
]
