"""The async jobs' settings, a part of the one settings object (``gateway.settings``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings


class JobSettings(BaseSettings):
    """``RDV_JOB_*``: how long jobs are kept, how many run at once, and their bounds. Read
    only as part of ``Settings``, which gives the prefix."""

    job_ttl_s: int = Field(default=3600, ge=1)
    """How long an async job is kept in Redis after its acceptance, and its result (or error)
    after its end: past it, polling the job answers 404 saying it expired."""

    job_max_wait_ms: int = Field(default=30_000, ge=0, le=600_000)
    """Longest long poll (``?wait_ms=`` on a job): 422 beyond."""

    job_concurrency: int = Field(default=64, ge=1)
    """Jobs one gateway process runs at once (each is a predict in flight, so also within
    ``max_in_flight``)."""

    job_rows_in_flight: int = Field(default=2000, ge=1)
    """Rows of jobs one gateway process has with the models at once (a larger job runs
    alone): a burst of large jobs waits in Redis, not in front of the models, where it would
    make every realtime request behind it late."""

    job_timeout_ms: int = Field(default=30_000, ge=1, le=600_000)
    """How long a job's predict waits for the models' answer (the deployment's
    ``timeout_ms`` where longer): no caller waits on the line, so a busy model delays a job
    instead of failing it with 504."""

    job_max_queued: int = Field(default=10_000, ge=1)
    """Jobs a deployment may hold accepted and not yet ended; beyond it, 503 at once."""

    job_max_held_bytes: int = Field(default=256 * 2**20, ge=2**20)
    """Bytes of Redis a deployment's jobs may hold, bodies waiting and answers kept for
    ``job_ttl_s`` alike (about: each job counts its body or answer and 300 bytes); beyond it a
    submit is refused with 503 until old answers expire. Without it a flood of submits would
    fill Redis for an hour with answers nobody reads."""

    job_claim_idle_ms: int = Field(default=30_000, ge=100)
    """A job taken by a gateway process that died is run by another after this long (never
    less than a job's timeout, ``job_timeout_ms`` or the deployment's ``timeout_ms``, + 1 s,
    so a live gateway's job is not taken)."""

    job_yield_ms: float = Field(default=50.0, ge=0, le=10_000)
    """Longest a job's long step (checking its body, shaping its answer, writing its record)
    waits for the realtime predicts in flight in its process (``realtime_first``): within it,
    ten times the last job step's length. 0: jobs never wait for realtime work."""


__all__ = ["JobSettings"]
