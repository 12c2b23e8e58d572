"""Every Redis key and consumer-group name, built from validated names only.

Keys of one deployment share the hash tag ``{dep}`` so a deployment lives in one Redis Cluster
slot, except the input partitions beyond the first, which have tags of their own so that a busy
deployment spreads over the shards. Deployment, model and role names are checked against a
strict pattern before they are ever placed in a key, so no caller can smuggle in a glob pattern
or another deployment's tag.
"""

from __future__ import annotations

import binascii
import re
import zlib
from collections.abc import Iterable

PREFIX = "rdv"
NAME_RE = r"[a-z0-9][a-z0-9._-]{0,62}"
"""A deployment or model name, unanchored: URL patterns are built from it."""
NAME_PATTERN = re.compile(NAME_RE)
"""Matched whole (``fullmatch``): ``$`` would let a final newline through."""
ROLE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
INSTANCE_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENTITY_PATTERN = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
"""An entity key of the online feature store (``entity_key``): no space, brace or glob
character, so it can neither leave its deployment's hash tag nor read as a pattern."""
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{1,16}-[0-9a-f]{20}")
"""An async job's id (``job_key``): its creation time in epoch ms and 80 random bits, in hex."""

LOGBIN_GROUP = "logbin"
REAL = "real"
CANARY = "canary"

DEPLOYMENTS_SET = f"{PREFIX}:deployments"
DATA_MARK = f"{PREFIX}:{{{DEPLOYMENTS_SET}}}:data-mark"
"""Made (``SET NX``) by every gateway process's deployments refresh and never deleted: found
missing by a process that saw it, with no deployment listed, it says Redis lost this system's
data (a restart without persistence, a flush). In the slot of ``DEPLOYMENTS_SET`` (its hash
tag is that key's name), read with it on the same shard."""
MODELS_INDEX = f"{PREFIX}:models"
"""Hash: ``name:version`` -> the model's metadata (JSON); the registry's shared index."""
MODELS_RETIRED = f"{PREFIX}:models:retired"
"""Set of ``name:version`` deleted from the registry: their numbers are never given again."""


class InvalidName(ValueError):
    """A deployment, model, role or instance name that may not be used in a key."""


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:77] + "..."
        raise InvalidName(
            f"invalid {what} {shown!r}{_name_fault(name)}: use 1-63 characters of a-z, 0-9, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


def _name_fault(name: object) -> str:
    """What is wrong in a name ``check_name`` refuses, as a clause (the rule alone left the
    caller to count 64 characters or find the capital letter)."""
    if not isinstance(name, str):
        return f" (not a string: {type(name).__name__})"
    if not name:
        return " (empty)"
    if len(name) > 63:
        return f" ({len(name)} characters)"
    bad = next((i for i, c in enumerate(name) if c not in _NAME_CHARS), None)
    if bad is not None:
        return f" ({name[bad]!r} at {bad})"
    return f" (it starts with {name[0]!r})"


def check_role(role: str) -> str:
    if not isinstance(role, str) or not ROLE_PATTERN.fullmatch(role):
        raise InvalidName(f"invalid role {role!r}: use a-z, 0-9, '_' or '-', starting with a-z")
    return role


def _tag(deployment: str) -> str:
    return f"{PREFIX}:{{{check_name(deployment, 'deployment')}}}"


MAX_PARTITIONS = 64
SLOTS = 16384


def input_stream(deployment: str, partition: int = 0, partitions: int = 1) -> str:
    """Partition ``partition`` of the deployment's input when it has ``partitions``: every bin
    reads every partition. Partition 0 shares the deployment's hash tag (its state, its groups'
    transaction). Each other one has a tag of its own (``{deployment#...}``: no deployment name
    holds ``#``), chosen so that its cluster slot lies ``partition / partitions`` of the way
    round from partition 0's: the partitions are spread evenly over the slots, so on a cluster
    whose masters hold equal slot ranges, as many partitions as masters land one on each."""
    name = check_name(deployment, "deployment")
    if partition == 0:
        return f"{_tag(name)}:in"
    if not 0 < partition < partitions <= MAX_PARTITIONS:
        raise InvalidName(f"partition {partition} of {partitions} is not one")
    target = (_slot(name) + partition * SLOTS // partitions) % SLOTS
    window = max(1, SLOTS // (4 * partitions))
    n = 0
    while True:  # about 4 x partitions tries: the first tag whose slot is near the target
        tag = f"{name}#{partitions}.{partition}.{n}"
        if (_slot(tag) - target + window // 2) % SLOTS < window:
            return f"{PREFIX}:{{{tag}}}:in"
        n += 1


def _slot(tag: str) -> int:
    """The Redis Cluster slot of a hash tag (CRC16/XMODEM, as the cluster spec says)."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


def is_input_stream(deployment: str, key: str) -> bool:
    """Whether ``key`` is one of the deployment's input partitions, of any partition count
    (what a position in an export or a replay report names)."""
    if key == input_stream(deployment):
        return True
    found = re.fullmatch(
        rf"{PREFIX}:\{{{re.escape(deployment)}#(\d{{1,2}})\.(\d{{1,2}})\.\d+\}}:in", key
    )
    if found is None:
        return False
    try:
        return input_stream(deployment, int(found[2]), int(found[1])) == key
    except InvalidName:
        return False


def input_streams(deployment: str, partitions: int) -> list[str]:
    return [input_stream(deployment, k, partitions) for k in range(partitions)]


def partition_for(request_id: str, partitions: int) -> int:
    """The partition a request goes to: stable for an id while the count stays."""
    return zlib.crc32(request_id.encode()) % partitions if partitions > 1 else 0


def request_id_keys(deployment: str, request_id: str, counts: Iterable[int]) -> list[str]:
    """Every key a caller's ``request_id`` may be taken under (``request_id_key``): one per
    partition count its deployment has published to and still reads (``counts``)."""
    return [
        request_id_key(input_stream(deployment, partition_for(request_id, n), n), request_id)
        for n in dict.fromkeys(counts)
    ]


def decisions_stream(deployment: str) -> str:
    return f"{_tag(deployment)}:decisions"


def deployment_key(deployment: str) -> str:
    """JSON document with the deployment's roles, schedule and feature spec."""
    return f"{_tag(deployment)}:deployment"


def revision_key(deployment: str) -> str:
    """The deployment's revision alone: workers poll it with every read, cheaply."""
    return f"{_tag(deployment)}:revision"


def history_key(deployment: str) -> str:
    """List of JSON entries, one per change (and per refused promotion), oldest first."""
    return f"{_tag(deployment)}:history"


def workers_key(deployment: str) -> str:
    """Sorted set of live workers: member ``role|consumer``, score = last heartbeat (epoch s)."""
    return f"{_tag(deployment)}:workers"


def model_group(role: str) -> str:
    """Consumer group of a model bin. Groups follow roles, not versions, so that a promotion
    hands the stream position over to the new version without a gap or a replay."""
    return f"{MODEL_GROUP_PREFIX}{check_role(role)}"


def reply_stream(instance_id: str) -> str:
    """Reply stream of one gateway instance: the return address in every envelope."""
    if not INSTANCE_PATTERN.fullmatch(instance_id):
        raise InvalidName(f"invalid gateway instance id {instance_id!r}")
    return f"{PREFIX}:reply:{{{instance_id}}}"


def worker_member(role: str, consumer: str) -> str:
    return f"{role}|{consumer}"


MODEL_GROUP_PREFIX = "model:"


def skipped_key(deployment: str) -> str:
    """Hash ``role`` -> input entries that role's group was moved past because it fell more
    than ``RDV_MAX_ROLE_LAG`` behind (its worker down or too slow)."""
    return f"{_tag(deployment)}:skipped"


def stats_key(deployment: str) -> str:
    """Hash ``role|consumer`` -> JSON counters of that model worker (with ``ts``, epoch s),
    written in its heartbeat round trip; the gateway exposes them on ``/metrics``."""
    return f"{_tag(deployment)}:stats"


def request_id_key(input_stream_key: str, request_id: str) -> str:
    """Taken (SET NX, with a TTL) when an envelope carrying a caller's own request id is
    published to ``input_stream_key``: the id is refused on every gateway while the key lives.
    Under that stream's hash tag, so the check and the XADD run as one script on one node."""
    return f"{input_stream_key.removesuffix(':in')}:rid:{request_id}"


LOGBIN_STATS = f"{PREFIX}:logbin:stats"
"""Hash ``consumer`` -> JSON counters of that log-bin process (with ``ts``, epoch s)."""


def drift_sketch_stream(deployment: str) -> str:
    """Per-process aggregates of decisions and inputs, one entry per flush (about a second)."""
    return f"{_tag(deployment)}:drift:sketches"


def drift_report_key(deployment: str) -> str:
    """The latest drift evaluation (JSON), with its active alerts."""
    return f"{_tag(deployment)}:drift:report"


def drift_history_stream(deployment: str) -> str:
    """One compact point per evaluation, capped: the report's short history."""
    return f"{_tag(deployment)}:drift:history"


def drift_features_key(deployment: str) -> str:
    """The latest window's rows per feature and training bin, and outside the training range
    (JSON): the dashboard's feature view."""
    return f"{_tag(deployment)}:drift:features"


def drift_feature_history_stream(deployment: str) -> str:
    """Per feature, one point of out-of-range rate and PSI per history point, capped."""
    return f"{_tag(deployment)}:drift:feature-history"


def drift_events_stream(deployment: str) -> str:
    """Drift alerts raised and cleared."""
    return f"{_tag(deployment)}:drift:events"


def drift_reference_key(deployment: str) -> str:
    """The score reference built from the window after a promotion (JSON), when the real
    model carries no training reference."""
    return f"{_tag(deployment)}:drift:reference"


def drift_thresholds_key(deployment: str) -> str:
    """The deployment's drift thresholds (JSON); absent: the defaults."""
    return f"{_tag(deployment)}:drift:thresholds"


def drift_alerts_key(deployment: str) -> str:
    """Hash alert id (``kind`` or ``kind/feature``) -> JSON of each active drift alert: the one
    list every source's alerts are merged into (``rendezvous.drift_claims``)."""
    return f"{_tag(deployment)}:drift:alerts"


def drift_claims_key(deployment: str) -> str:
    """Hash source (``monitor``, ``gateway:<instance>``, ``logbin:<consumer>``) -> JSON of the
    alerts that source holds now, with when it said so."""
    return f"{_tag(deployment)}:drift:claims"


def drift_relayed_key(deployment: str) -> str:
    """Written by earlier versions (one place in the events stream for every webhook); only
    purged with its deployment now."""
    return f"{_tag(deployment)}:drift:relayed"


def drift_delivered_key(deployment: str) -> str:
    """Hash webhook (a digest of its URL) -> id of the latest drift event it took."""
    return f"{_tag(deployment)}:drift:delivered"


def drift_event_counts_key(deployment: str) -> str:
    """Hash kind -> drift alerts of that kind raised so far."""
    return f"{_tag(deployment)}:drift:event-counts"


def drift_lock_key(deployment: str) -> str:
    """Held by the one gateway process that evaluates drift for a while."""
    return f"{_tag(deployment)}:drift:lock"


def entity_key(deployment: str, entity: str) -> str:
    """Hash ``feature`` -> value of one entity in the deployment's online feature store,
    under its tag: every entity a request names is read on one node in one round trip."""
    if not isinstance(entity, str) or not ENTITY_PATTERN.fullmatch(entity):
        raise InvalidName(
            f"invalid entity key {entity!r}: use 1-128 characters of A-Z, a-z, 0-9 and ._:@+=/-"
        )
    return f"{_tag(deployment)}:entity:{entity}"


JOBS_GROUP = "gateways"
"""Consumer group of every deployment's jobs stream: each gateway process is a consumer."""


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidName(f"invalid job id {job_id!r}")
    return job_id


def job_key(deployment: str, job_id: str) -> str:
    """Hash of one async job: ``status`` (pending, done, failed), the body until it ran, the
    ``result`` or ``error`` (JSON) after; expires ``RDV_JOB_TTL_S`` after its acceptance and
    again after its end. Under the deployment's tag, with the jobs streams: a job's every
    change is one script on one node."""
    return f"{_tag(deployment)}:job:{check_job_id(job_id)}"


def jobs_stream(deployment: str) -> str:
    """Jobs accepted and not yet run to their end (one entry each, the job's id), read by the
    consumer group ``JOBS_GROUP``; an entry is deleted once its job ended."""
    return f"{_tag(deployment)}:jobs"


def jobs_done_stream(deployment: str) -> str:
    """The ids of jobs as they end (capped): what a long poll on any gateway wakes on."""
    return f"{_tag(deployment)}:jobs:done"


def jobs_held_key(deployment: str) -> str:
    """Sorted set job id -> when its hash expires (epoch ms): the jobs whose bytes
    ``jobs_held_bytes_key`` counts, so that expired ones are taken off the count."""
    return f"{_tag(deployment)}:jobs:held"


def jobs_held_bytes_key(deployment: str) -> str:
    """Hash job id -> the bytes its hash holds (the body while pending, then the result or
    error), and ``total``: what ``RDV_JOB_MAX_HELD_BYTES`` bounds."""
    return f"{_tag(deployment)}:jobs:held:bytes"


def job_request_key(deployment: str, request_id: str) -> str:
    """The job that took a caller's own request id (``X-Request-Id``), for as long as the job
    lives: a second job with that id is refused with 409 naming the first."""
    return f"{_tag(deployment)}:job-rid:{request_id}"


# -- ground truth: outcomes kept for the join, labels, live accuracy ---------------------------


def outcomes_key(deployment: str, bucket: int) -> str:
    """Hash request id -> the compact outputs of every bin for that request
    (``rendezvous.outcomes``), for the requests decided in time bucket ``bucket``; expires after
    the feedback retention. Under the deployment's tag: a lookup over every live bucket is one
    script on one node."""
    return f"{_tag(deployment)}:outcomes:{int(bucket)}"


def labels_key(deployment: str, bucket: int) -> str:
    """Hash request id -> the latest label given for it (same buckets and expiry as
    ``outcomes_key``): a relabel replaces the label."""
    return f"{_tag(deployment)}:labels:{int(bucket)}"


def label_entries_key(deployment: str, bucket: int) -> str:
    """Hash request id -> the id of its label's entry in the labelled stream (same buckets
    and expiry as ``labels_key``): a relabel deletes the entry it replaces, so the stream holds
    one entry a request, and no caller can push the others' labels out of what is read."""
    return f"{_tag(deployment)}:labels:{int(bucket)}:entries"


def outcomes_state_key(deployment: str) -> str:
    """Hash of the outcome writer: ``cursor`` (the last decisions-stream entry written to the
    buckets) and ``b:<bucket>`` -> bytes written to that bucket (what the byte bound prunes)."""
    return f"{_tag(deployment)}:outcomes:state"


def outcomes_lease_key(deployment: str) -> str:
    """Held by the gateway process that copies decisions to outcomes for a while."""
    return f"{_tag(deployment)}:outcomes:lease"


def labelled_stream(deployment: str) -> str:
    """Capped stream of labelled requests, each a label joined to every bin's outputs: what
    the live accuracy and the promotion gate read."""
    return f"{_tag(deployment)}:labelled"


def accuracy_key(deployment: str) -> str:
    """The latest live-accuracy report (JSON)."""
    return f"{_tag(deployment)}:accuracy"


def accuracy_lock_key(deployment: str) -> str:
    """Held by the one gateway process that evaluates live accuracy for a while."""
    return f"{_tag(deployment)}:accuracy:lock"


def accuracy_history_stream(deployment: str) -> str:
    """One compact point per live-accuracy evaluation (capped): the chart over time."""
    return f"{_tag(deployment)}:accuracy:history"


# -- replays of the archive ---------------------------------------------------------------------

REPLAY_ID_PATTERN = re.compile(r"[0-9a-f]{1,16}-[0-9a-f]{12}")
"""A replay's id: its creation time in epoch ms and 48 random bits, in hex."""


def check_replay_id(replay_id: str) -> str:
    if not isinstance(replay_id, str) or not REPLAY_ID_PATTERN.fullmatch(replay_id):
        raise InvalidName(f"invalid replay id {replay_id!r}: one looks like "
                          "18c2f3a4b5d-0123456789ab (as rdv replay printed it)")  # fmt: skip
    return replay_id


def replay_key(deployment: str, replay_id: str) -> str:
    """Hash of one replay: ``report`` (its JSON, rewritten after every batch) and ``cancel``
    (set when someone asked it to stop). Under the deployment's tag, with its index."""
    return f"{_tag(deployment)}:replay:{check_replay_id(replay_id)}"


def replay_lock_key(deployment: str, replay_id: str) -> str:
    """Held (with a short expiry, renewed every batch) by the gateway process running the
    replay: a ``running`` report without it was left by a process that stopped."""
    return f"{replay_key(deployment, replay_id)}:lock"


def replays_index(deployment: str) -> str:
    """Sorted set of the deployment's replay ids, scored by creation time (epoch ms)."""
    return f"{_tag(deployment)}:replays"


def labels_pattern(deployment: str) -> str:
    """SCAN pattern of the deployment's label hashes (request id -> label), written by the
    feedback route; under the deployment's tag."""
    return f"{_tag(deployment)}:labels:*"
