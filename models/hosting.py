"""How often a hosted model wakes and says it lives: numbers the worker host runs by and the
settings check ``RDV_HEARTBEAT_TIMEOUT_S`` against. Apart, and free of imports, because the
settings are read in processes that load no model."""

HOSTED_BLOCK_MS = 2000
HOSTED_HEARTBEAT_S = 1.5
"""An idle hosted model wakes every ``HOSTED_BLOCK_MS`` and heartbeats after each wake: one
round trip a second, where a process per role (1 s reads, 1 s heartbeats) spends two; twenty
deployments' forty models then keep a host under 1 % of a core. The longest gap between
heartbeats, 3.5 s, stays inside the default ``RDV_HEARTBEAT_TIMEOUT_S`` of 5."""


def longest_heartbeat_gap_s(worker_block_ms: float) -> float:
    """The longest a live worker may go without a heartbeat: a whole blocking read (at least
    a hosted model's), then the heartbeat's own interval."""
    return max(worker_block_ms, HOSTED_BLOCK_MS) / 1000 + HOSTED_HEARTBEAT_S
