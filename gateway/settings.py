"""The one settings object: environment variables prefixed ``RDV_``, read once and passed in."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from gateway.settings_evidence import EvidenceSettings
from gateway.settings_jobs import JobSettings
from gateway.settings_values import (
    JointFault,
    checked_redis_url,
    checked_token,
    normalised_origin,
)
from models.hosting import longest_heartbeat_gap_s
from models.memory_bound import MIN_MB as MEMORY_MIN_MB
from rendezvous.bus.connection import DEFAULT_MAX_CONNECTIONS
from rendezvous.schedule import MAX_WAIT_MS, Schedule

LARGEST = 10**12
"""The largest number any setting takes (see ``Settings._within_reach``)."""


class Settings(EvidenceSettings, JobSettings):
    """Every ``RDV_`` setting; the jobs' and the model evidence's live in their own parts."""

    model_config = SettingsConfigDict(env_prefix="RDV_", extra="ignore", allow_inf_nan=False)
    """``inf`` is no setting's value: it passed every bound, then overflowed where it was used
    (a helper's probe), as did integers past ``LARGEST``."""

    redis_url: str | None = None
    """Redis to use. Unset: ``rdv serve`` starts an embedded redis-server in the data folder."""

    embedded_redis_port: int = Field(default=0, ge=0, le=65535)
    """TCP port of the embedded Redis on 127.0.0.1 (its processes use its Unix socket; the port
    is for the tools beside it). 0: any free port, chosen at each start."""

    data_dir: Path = Path("data")
    """Models, the log-bin archive and the embedded Redis's files live here."""

    host: str = Field(default="127.0.0.1", min_length=1)
    """Address the gateway listens on."""

    port: int = Field(default=8000, ge=0, le=65535)
    """Port the gateway listens on."""

    gateway_processes: int = Field(default=0, ge=0, le=64)
    """Gateway processes, each with its own reply stream. 0: one per core, at most two (on
    two cores two served ~20-40 % more than one, benchmarks/PROFILE.md; past two, cores do
    more for the workers). ``rdv serve`` runs them as its own children sharing the port;
    ``rdv gateway`` as uvicorn workers."""

    cors_origins: list[str] = []
    """Origins whose browser pages may call the gateway (CORS), as a JSON list:
    ``["https://app.example.com"]``, or ``["*"]`` for any. Empty: none (browsers refuse
    cross-origin calls; a page served by another origin needs a proxy)."""

    proxy_headers: bool = False
    """Trust X-Forwarded-For/-Proto from the peers uvicorn's FORWARDED_ALLOW_IPS names. Off:
    the gateway does not use the client's address, and the check costs every request."""

    real_deadline_ms: float = Field(default=50.0, gt=0, le=MAX_WAIT_MS)
    """Default schedule of a new deployment: how long to wait for real before a fallback."""

    timeout_ms: float = Field(default=1000.0, gt=0, le=MAX_WAIT_MS)
    """Default schedule: after this, a request with no answer gets 504."""

    grace_ms: float = Field(default=200.0, ge=0, le=MAX_WAIT_MS)
    """Default schedule: how long to wait after the answer for the other bins' results."""

    fallbacks: list[str] = ["canary"]
    """Default schedule: roles that may answer once real has missed its deadline, in order."""

    worker_batch_size: int = Field(default=64, ge=1, le=4096)
    """Most entries a model worker reads (and scores in one onnxruntime call) at once."""

    worker_block_ms: int = Field(default=1000, ge=1)
    """How long a worker's XREADGROUP blocks; also how fast it notices a stop."""

    worker_layout: Literal["shared", "per-role"] = "shared"
    """How ``rdv serve`` runs the models: ``shared``, a few worker processes each hosting
    many (deployment, role) models as threads (one for the roles that answer callers, one at
    a lower priority for the shadowing roles: ``models.worker_host``); ``per-role``, a
    process for every role of every deployment (isolation, at ~86 MB a process: README)."""

    worker_hosts: int = Field(default=1, ge=1, le=64)
    """With the shared layout: processes of each kind (answering, shadowing); the models are
    split between them by a stable hash, to use more cores when many deployments are busy."""

    claim_idle_ms: int = Field(default=30_000, ge=100)
    """Entries pending this long on a dead consumer are claimed by a live one."""

    logbin_batch_size: int = Field(default=512, ge=1)
    """Most entries the log bin archives per fsync."""

    model_run_limit_s: float = Field(default=30.0, gt=0, le=3600)
    """Longest one model run (a batch) may take: past it the run is stopped and its requests
    get the model's failure (the fallbacks answer); a model that hangs on some input would
    hold its worker for good."""

    model_memory_mb: int | None = Field(default=None, ge=0)
    """Most memory (MB) a model run may take beyond what its worker process holds with its
    models loaded (``RLIMIT_DATA``, set again after each load): a run that asks for more fails,
    its requests get the model's failure (the fallbacks answer), instead of taking the host's
    memory. Unset: half the host's (or container's) memory; 0: no bound."""

    shadow_batch_wait_ms: float = Field(default=15.0, ge=0)
    """How long a worker of a role that never answers first (canary, shadow challengers)
    waits after a read that did not fill a batch, so one wake-up serves many requests;
    capped at grace_ms/4 and, for a fallback, real_deadline_ms/3."""

    logbin_batch_wait_ms: float = Field(default=20.0, ge=0)
    """How long the log bin waits after a read that did not fill a batch, so one fsync
    carries many requests."""

    drain_grace_s: float = Field(default=10.0, ge=5.0)
    """After a deployment is deleted, or its partition count changed, how long the log bin
    waits before it deletes the input streams that take nothing new, once drained: every
    gateway, worker and log bin must have seen the change by then (they look every 1, 2 and
    5 s), hence at least 5 s."""

    shadow_nice: int = Field(default=5, ge=0, le=19)
    """Niceness added by ``rdv serve`` to the log bin and to workers of roles that never
    answer first, so the critical path gets the cores under saturation."""

    watchdog_s: float = Field(default=120.0, ge=0)
    """``rdv serve`` kills and restarts a gateway, worker or log bin process that has made no
    progress this long (hung: a deadlock, a call that never returns, a stopped process); 0:
    never. Longer than a model run may take (``model_run_limit_s``)."""

    segment_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """The log bin starts a new segment file past this size..."""

    segment_max_age_s: float = Field(default=3600.0, gt=0)
    """...or past this age."""

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest predict request body accepted (413 beyond)."""

    max_rows: int = Field(default=1000, ge=1)
    """Most instances in one predict request."""

    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    """Largest request head (request line and header fields) of any request (431 beyond)."""

    max_headers: int = Field(default=100, ge=8)
    """Most header fields in one request (431 beyond)."""

    header_timeout_s: float = Field(default=10.0, gt=0)
    """A request's head must arrive within this time of its first byte, and a new
    connection's first request within this time of its opening (408, or a silent close for a
    connection that sent nothing)."""

    body_timeout_s: float = Field(default=60.0, gt=0)
    """A request's body must arrive within this time of its head (408 beyond)."""

    keep_alive_s: float = Field(default=75.0, gt=0)
    """An answered keep-alive connection that begins no next request within this time of its
    last answer is closed. Longer than the clients' and proxies' own idle expiry (httpx 5 s,
    aiohttp 15 s, nginx and load balancers 60 s): a server that closes first races the
    client's next request on that connection, which then fails unanswered (uvicorn's 5 s,
    equal to httpx's, did under a burst)."""

    requests_per_connection: int | None = Field(default=None, ge=0)
    """After this many requests a keep-alive connection is closed (``Connection: close`` on
    the last answer) and its client reconnects. None: 100 where several gateway processes
    accept on one port (``rdv serve``, ``rdv gateway`` with several processes, ``--fd``,
    ``--reuse-port``), else 0; 0: never. Why: the process that wins a burst of new
    connections keeps them, so a client with a few keep-alive connections could load one
    process of two; a reconnect is most often taken by the less busy process."""

    max_in_flight: int = Field(default=2048, ge=1)
    """Requests one gateway process holds at once; beyond it, 429 at once."""
    allow_eviction: bool = False
    """Run on a Redis whose ``maxmemory-policy`` evicts keys (anything but ``noeviction``),
    which at its limit deletes jobs, request ids, reply streams and, with ``allkeys-*``, the
    deployments; refused at start otherwise (``rendezvous.bus.redis_needs``)."""
    wait_replicas: int = Field(default=0, ge=0, le=16)
    """Replicas that must acknowledge a request's input (Redis ``WAIT``) before the gateway
    answers it; 0: answer without waiting (replication is asynchronous: a failover may then
    lose what its master took in its last moments, archive included)."""
    wait_replicas_timeout_ms: int = Field(default=100, ge=1, le=10_000)
    """How long that wait may take; past it the answer is 503 (the input may not survive a
    failover)."""
    request_id_ttl_s: int = Field(default=3600, ge=1)
    """How long a caller's own request id (``X-Request-Id``) stays taken after it was published:
    a retry within it answers 409 on every gateway. Costs about 100 bytes of Redis a request
    that carries one; ids the gateway makes up are random and need no key."""

    max_backlog: int = Field(default=200_000, ge=100)
    """Entries an input stream may hold unconsumed by its slowest reader (the log bin or a
    model group); beyond it the gateway answers 503 at once instead of queueing."""

    max_backlog_bytes: int = Field(default=256 * 2**20, ge=2**20)
    """The same bound in bytes of Redis memory that the input stream holds (``MEMORY USAGE``):
    beyond it, 503 at once. A log bin that cannot archive holds the stream; this keeps it from
    filling Redis."""

    max_role_lag: int = Field(default=50_000, ge=100)
    """A model role (real included) whose group falls this many input entries behind no longer
    holds the stream: the log bin moves its group forward and counts what it skipped
    (``rdv_role_skipped_entries_total``). Only the archive holds the stream without bound."""

    redis_timeout_s: float = Field(default=2.0, ge=0.01, le=3600)
    """Bound on every gateway Redis command: a hung server becomes a 503, never a hang."""

    redis_max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=8, le=10_000)
    """Connections one gateway process opens to Redis for everything but predictions (job
    submits and polls, readiness, admin; to each node of a cluster). On a single node a
    command past them waits for a free one, up to ``redis_timeout_s``; on a cluster it fails
    (503). Predictions use a few connections of their own."""

    reply_maxlen: int = Field(default=10_000, ge=100)
    """Approximate cap of each gateway's reply stream, in results (a worker writes its batch's
    results for one gateway as one entry, capped at this many over the batch's size)."""

    decisions_maxlen: int = Field(default=50_000, ge=100)
    """Approximate cap of each deployment's decisions stream. The stream is most of Redis's
    memory (about 0.65 KB a record: 50,000 hold ~33 MB); its readers need far fewer (the
    promotion gate reads ``shadow_window``, drift runs on the gateways' own sketches)."""

    decisions_max_mb: float = Field(default=64.0, gt=0)
    """The same cap in memory: fewer records when they are large (a 100-row request's record
    is over 10 KB, and 50,000 of them would hold half a gigabyte). Each gateway derives the
    count from the mean size of the records it writes (``gateway.dataplane.decision_cap``);
    at least 100 are kept."""

    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    """A worker whose last heartbeat is older than this is not live (readiness)."""

    admin_token: SecretStr | None = None
    """Bearer token of the ``/admin`` API (and what the admin CLI sends). Unset: the admin
    API is off, never open."""

    feedback_token: SecretStr | None = None
    """Bearer token the feedback route requires (and what ``rdv feedback`` sends). Unset: the
    route is open, as predict is, and anyone who knows a request id may label it."""

    max_model_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest ONNX artifact the admin API accepts (413 beyond)."""

    log_level: str = "INFO"

    @field_validator("*")
    @classmethod
    def _within_reach(cls, value: object) -> object:
        """No setting needs a number past ``LARGEST`` (in ms, 31 years; in bytes, a terabyte):
        larger ones passed, then overflowed where they were used, in a child process rather
        than at start (a TTL Redis refused, a worker's block that crashed it)."""
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > LARGEST:
            raise ValueError(f"more than {LARGEST:.0e}: no setting needs so large a number")
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _some_folder(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # Path("") is the working directory
            raise ValueError("empty: name a folder (unset, it is ./data)")
        return value

    @field_validator("fallbacks")
    @classmethod
    def _valid_schedule(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """The default schedule as a whole: else each start of a gateway process failed when
        its admin routes built it, and ``rdv serve`` restarted them for ever."""
        times = [info.data.get(k) for k in ("real_deadline_ms", "timeout_ms", "grace_ms")]
        if all(isinstance(t, float) for t in times):
            real_deadline_ms, timeout_ms, grace_ms = (float(t or 0) for t in times)
            try:
                Schedule(real_deadline_ms=real_deadline_ms, timeout_ms=timeout_ms,
                         fallbacks=tuple(value), grace_ms=grace_ms)  # fmt: skip
            except ValueError as exc:
                raise JointFault(  # the values, since any of the four may be at fault
                    f"the default schedule (RDV_REAL_DEADLINE_MS={real_deadline_ms:g}, "
                    f"RDV_TIMEOUT_MS={timeout_ms:g}, RDV_GRACE_MS={grace_ms:g}, "
                    f"RDV_FALLBACKS={json.dumps(value)[:200]}) is not one: {exc}"
                ) from None
        return value

    @field_validator("max_role_lag")
    @classmethod
    def _below_backlog(cls, value: int, info: ValidationInfo) -> int:
        backlog = info.data.get("max_backlog")
        if isinstance(backlog, int) and value >= backlog:
            raise ValueError(
                f"not below RDV_MAX_BACKLOG={backlog}: a role that far behind holds the stream "
                "until every request is refused"
            )
        return value

    @field_validator("model_memory_mb")
    @classmethod
    def _room_for_a_model(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < MEMORY_MIN_MB:
            raise ValueError(f"0 (no bound) or at least {MEMORY_MIN_MB}: a batch of rows "
                             "needs room beyond the model")  # fmt: skip
        return value

    @field_validator("watchdog_s")
    @classmethod
    def _outlasts_a_model_run(cls, value: float, info: ValidationInfo) -> float:
        """A worker's step may hold one model run, which may take ``model_run_limit_s``, and a
        blocking read of a few seconds."""
        limit = info.data.get("model_run_limit_s")
        if value and isinstance(limit, float) and value <= limit + 5:
            raise ValueError(
                f"a worker may spend RDV_MODEL_RUN_LIMIT_S={limit:g} s in one model run: give "
                f"more than {limit + 5:g} s (or 0: no watchdog)"
            )
        return value

    @field_validator("heartbeat_timeout_s")
    @classmethod
    def _outlasts_a_read(cls, value: float, info: ValidationInfo) -> float:
        """A live worker's heartbeats may be a whole blocking read apart: a shorter timeout
        took it for dead, and readiness flapped (a helper's probe)."""
        block_ms = info.data.get("worker_block_ms")
        if isinstance(block_ms, int) and value <= (gap := longest_heartbeat_gap_s(block_ms)):
            raise ValueError(
                f"a live worker may go {gap:g} s between heartbeats (RDV_WORKER_BLOCK_MS="
                f"{block_ms}, or a hosted model's 2 s read, and 1.5 s more): give more than that"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        """The five names uvicorn takes too (Python's own WARN, FATAL and NOTSET passed here,
        then failed every gateway process's start)."""
        level = value.strip().upper()
        level = {"WARN": "WARNING"}.get(level, level)
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("redis_url")
    @classmethod
    def _redis_address(cls, value: str | None) -> str | None:
        return checked_redis_url(value) if value else value

    @field_validator("admin_token", "feedback_token")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            checked_token(value.get_secret_value())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [normalised_origin(origin) for origin in value]

    def redis_memory_bytes(self, deployments: int) -> int:
        """A rough floor of the Redis memory these caps let the data reach, with ``deployments``
        deployments and this host's gateways: input streams at their backlog bound (~1 KB an
        entry), decision streams full (~0.65 KB a record), reply streams full (~0.3 KB a
        result), sketch streams full (~2 KB a sketch), the feedback outcomes at their bound and
        the labelled streams full (~0.2 KB an entry) and the jobs' held bytes at their bound."""
        per_deployment = (
            self.max_backlog * 1024
            + self.job_max_held_bytes
            + min(self.decisions_maxlen * 650, int(self.decisions_max_mb * 2**20))
            + self.drift_sketch_maxlen * 2048
            + int(self.feedback_max_mb * 2**20)
            + self.labelled_maxlen * 400
        )
        return deployments * per_deployment + self.gateway_process_count * self.reply_maxlen * 300

    def schedule(self) -> Schedule:
        return Schedule(
            real_deadline_ms=self.real_deadline_ms,
            timeout_ms=self.timeout_ms,
            fallbacks=tuple(self.fallbacks),
            grace_ms=self.grace_ms,
        )

    @property
    def local_url(self) -> str:
        """The gateway's address as a client on this host reaches it (the ``rdv`` commands'
        default): an IPv6 host in brackets, a wildcard one as loopback."""
        return http_url(self.host, self.port)

    @property
    def gateway_process_count(self) -> int:
        return self.gateway_processes or min(2, os.cpu_count() or 1)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "logbin"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"


def http_url(host: str, port: int) -> str:
    """``http://host:port`` for a client: ``::1`` bracketed (``http://::1:8000`` is no URL),
    and the wildcard addresses a server binds to (``0.0.0.0``, ``::``) as loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
