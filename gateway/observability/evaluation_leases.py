"""Which gateway process evaluates a deployment's drift (or live accuracy): a short Redis lease
per deployment, taken by one process and renewed by its holder, so that several processes or
instances never double-count an event nor repeat each other's work, and a dead holder's lease
lapses to another (``drift_monitor``, ``live_accuracy``)."""

from __future__ import annotations

from collections.abc import Callable, Collection

from rendezvous import names
from rendezvous.bus.connection import AsyncClient

LEASE_RECHECK_S = 2.0
"""How long a process that saw another lease holder waits before asking again."""

_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
"""Take the lease if free, renew it if ours: 1 when this process holds it afterwards."""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
"""Delete a lease only while it is still ours (it may have lapsed to another process)."""


class EvaluationLeases:
    """This process's evaluation leases, as ``instance``, each lasting ``ttl_ms``, held at
    ``key(deployment)``."""

    def __init__(
        self,
        client: AsyncClient,
        instance: str,
        ttl_ms: int,
        key: Callable[[str], str] = names.drift_lock_key,
    ):
        self.client = client
        self.instance = instance
        self.ttl_ms = ttl_ms
        self.key = key
        self._known: dict[str, tuple[bool, float]] = {}
        """Deployment -> (held by us, monotonic time to ask Redis again)."""

    async def holds(self, deployment: str, now: float) -> bool:
        """Whether this process holds ``deployment``'s lease (see ``held``)."""
        return deployment in await self.held([deployment], now)

    async def held(self, deployments: list[str], now: float) -> list[str]:
        """Those of ``deployments`` whose lease this process holds (or takes); a dead holder's
        lapses.

        The answer is kept locally: a holder renews a third of the way through its lease, and
        a process that saw another holder asks again after ``LEASE_RECHECK_S``. The leases to
        ask about are asked in one round trip (per node), one script each: twenty deployments
        asked one by one, two or three commands each, were the largest part of an idle
        gateway's Redis round trips. (A lease lost meanwhile, to a Redis restart, is noticed
        at the next renewal: two processes may then both evaluate for a few seconds, which
        costs a duplicate report, never a wrong one.)"""
        ask = [d for d in deployments if (known := self._known.get(d)) is None or now >= known[1]]
        if ask:
            pipe = self.client.pipeline(transaction=False)
            for deployment in ask:
                pipe.eval(_LEASE, 1, self.key(deployment), self.instance, self.ttl_ms)
            for deployment, held in zip(ask, await pipe.execute(), strict=True):
                again = self.ttl_ms / 3000 if held else LEASE_RECHECK_S
                self._known[deployment] = (bool(held), now + again)
        return [d for d in deployments if self._known[d][0]]

    def keep_only(self, deployments: Collection[str]) -> None:
        """Forget what this process knew of deployments gone since (deleted and purged): one
        entry each, for as long as the gateway ran."""
        for deployment in [d for d in self._known if d not in deployments]:
            del self._known[deployment]

    async def release(self) -> None:
        """Give up the leases this process holds (at shutdown): another process then takes
        a deployment over at its next check (``LEASE_RECHECK_S``), not once the lease lapses
        (three intervals, when drift would go unevaluated through a rolling restart)."""
        held = [deployment for deployment, (mine, _) in self._known.items() if mine]
        self._known.clear()
        for deployment in held:
            await self.client.eval(_RELEASE, 1, self.key(deployment), self.instance)
