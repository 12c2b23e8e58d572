"""The admin API's vocabulary: its errors (each with its HTTP status) and its request bodies
(pydantic), shared by the routes and the service."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from rendezvous.names import MAX_PARTITIONS
from rendezvous.schedule import MAX_WAIT_MS, SEED_MAX, SEED_MIN
from rendezvous.spec import MAX_KEY_NAME

MAX_VERSION = 2**31 - 1
"""Model versions are 1 to this: a version travels in every result as a msgpack integer and
in key and folder names, and a larger one crash-looped its worker."""

MAX_ENTITIES = 10_000
"""Most entities in one ``PUT .../entities`` (the body is also held to RDV_MAX_BODY_BYTES);
``rdv features load`` sends a large file in batches."""


class AdminError(Exception):
    status = 400

    def __init__(self, detail: str, *, status: int | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        if status is not None:
            self.status = status


class NotFound(AdminError):
    status = 404


class Conflict(AdminError):
    status = 409


class Invalid(AdminError):
    status = 422


class TooLarge(AdminError):
    status = 413


# -- the service -------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "3" is no partition count, 2.0 no version (found by a helper's probe: coerced)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


ReferenceNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
ShownName = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$")
]
"""A name the gateway shows (logs, alerts, exports, the dashboard): no control characters,
which could forge a log line or drive a terminal (found by hand), C1's among them (U+0085 ends a
line and U+009B begins a terminal's command, as ESC [ does), nor a line or paragraph separator
(a helper's fuzzing)."""


class ReferenceIn(_Body):
    """Rows the model was not fitted on (held out), by column name: the training statistics
    that drift and out-of-distribution checks compare live traffic against, and the model's
    score reference. Extra columns (a label, an id) are left out."""

    columns: list[str] = Field(min_length=1, max_length=100_000)
    rows: list[list[ReferenceNumber]] = Field(min_length=1, max_length=100_000)


class UploadMeta(_Body):
    """What travels beside the ONNX bytes (the multipart ``metadata`` part, or the JSON body
    without ``onnx_base64``)."""

    name: str = Field(description="model name (a-z, 0-9, '.', '_', '-')")
    version: int | None = Field(
        default=None, ge=1, le=MAX_VERSION, description="default: the next free one"
    )
    deployment: str | None = Field(
        default=None, description="check the input width against this deployment's spec"
    )
    feature_names: list[ShownName] | None = Field(default=None, min_length=1, max_length=100_000)
    classes: list[int] | None = Field(default=None, max_length=10_000)
    class_names: list[ShownName] | None = Field(default=None, max_length=10_000)
    metrics: dict[ShownName, ReferenceNumber] = Field(
        default={}, max_length=100, description="finite numbers (NaN was stored as null)"
    )
    algorithm: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=10_000)
    sha256: str | None = Field(default=None, description="if given, must match the artifact")
    reference: ReferenceIn | None = Field(
        default=None,
        description="held-out rows: the model's training statistics (drift, out of "
        "distribution) and score reference; without them those checks stay off for a model "
        "of its own features",
    )


class UploadJSON(UploadMeta):
    onnx_base64: str = Field(description="the ONNX file, base64")


class RefIn(_Body):
    model: str
    version: int = Field(ge=1, le=MAX_VERSION)


class ScheduleIn(_Body):
    real_deadline_ms: float | None = Field(default=None, gt=0, le=MAX_WAIT_MS)
    timeout_ms: float | None = Field(default=None, gt=0, le=MAX_WAIT_MS)
    fallbacks: list[str] | None = Field(
        default=None, max_length=64, description="roles of the deployment, each once"
    )
    grace_ms: float | None = Field(default=None, ge=0, le=MAX_WAIT_MS)
    splits: dict[str, float] | None = Field(
        default=None, description="challenger role -> fraction of requests it answers"
    )
    split_seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    reason: str = Field(default="", max_length=2000)


ExpectRevision = Annotated[
    int | None,
    Field(default=None, ge=1,
          description="refuse (409) unless the deployment is still at this revision"),
]  # fmt: skip
"""A change guarded against another operator's made meanwhile (found by a helper's probe:
only a promote could be)."""


class SchedulePatch(ScheduleIn):
    expect_revision: ExpectRevision = None


class LookupIn(_Body):
    """Features the gateway reads from the online store by entity (``FeatureSpec.lookup``)."""

    key: str = Field(
        min_length=1,
        max_length=MAX_KEY_NAME,
        description="name of the entity key (its column in the files 'rdv features load' reads)",
    )
    features: list[str] = Field(min_length=1, max_length=100_000)
    defaults: dict[str, Annotated[float, Field(strict=True, allow_inf_nan=False)]] = Field(
        default={}, description="value of a feature the store has none for; without one, 422"
    )


class CreateDeployment(_Body):
    name: str
    real: RefIn
    canary: RefIn | None = None
    schedule: ScheduleIn | None = None
    partitions: int = Field(default=1, ge=1, le=MAX_PARTITIONS,
                            description="input streams requests are spread over")  # fmt: skip
    lookup: LookupIn | None = Field(default=None, description="features looked up by entity")
    reason: str = Field(default="", max_length=2000)


class EnrichmentPatch(_Body):
    lookup: LookupIn | None = Field(description="null: the deployment looks nothing up")
    reason: str = Field(default="", max_length=2000)


class DeploymentPatch(_Body):
    partitions: int = Field(ge=1, le=MAX_PARTITIONS, description="input streams from now on")
    expect_revision: ExpectRevision = None
    reason: str = Field(default="", max_length=2000)


class Promote(_Body):
    version: int = Field(ge=1, le=MAX_VERSION)
    model: str | None = Field(default=None, description="default: the real model's name")
    pin_canary: bool = Field(default=False, description="keep the canary; the old real retires")
    force: bool = Field(default=False, description="promote even if the gate refuses")
    min_shadow_requests: int | None = Field(default=None, ge=0)
    max_disagreement: float | None = Field(default=None, ge=0, le=1)
    min_labeled: int | None = Field(
        default=None, ge=0, description="labelled rows both the candidate and real scored"
    )
    min_accuracy_gain: float | None = Field(
        default=None, ge=-1, le=1, description="candidate's accuracy minus real's, paired"
    )
    significance: float | None = Field(
        default=0.05,
        gt=0,
        le=1,
        description="with a labelled gate: McNemar's p-value must be under it (null: no test)",
    )
    require_replay: bool = Field(
        default=False, description="a finished replay report of the candidate must exist"
    )
    min_replay_records: int | None = Field(
        default=None, ge=1, description="archived records that replay must have scored"
    )
    min_replay_agreement: float | None = Field(
        default=None, ge=0, le=1, description="replay's agreement with the answers given then"
    )
    expect_revision: ExpectRevision = None
    reason: str = Field(default="", max_length=2000)


class Rollback(_Body):
    to_revision: int | None = Field(default=None, ge=1, description="default: the previous")
    expect_revision: ExpectRevision = None
    reason: str = Field(default="", max_length=2000)


class AddChallenger(_Body):
    role: str
    version: int = Field(ge=1, le=MAX_VERSION)
    model: str | None = Field(default=None, description="default: the real model's name")
    split: float | None = Field(default=None, gt=0, le=1)
    expect_revision: ExpectRevision = None
    reason: str = Field(default="", max_length=2000)
