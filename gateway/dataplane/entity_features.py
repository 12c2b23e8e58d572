"""The online feature store's read on the request path: the stored features of a request's
entities, one round trip (every entity key carries the deployment's hash tag)."""

from __future__ import annotations

from rendezvous import names
from rendezvous.bus.async_router import Router
from rendezvous.bus.routing import Command, raise_first_error
from rendezvous.spec import Lookup


async def read_entities(
    router: Router, deployment: str, lookup: Lookup, entities: list[str], timeout_s: float
) -> dict[str, list[bytes | None]]:
    """Each distinct entity's stored values of ``lookup.features`` (None where absent), in one
    round trip: every entity key carries the deployment's hash tag, so on a cluster the batch
    goes to the one node that holds it. Redis's failure is raised."""
    distinct = list(dict.fromkeys(entities))
    fields = [f.encode() for f in lookup.features]
    commands = []
    for entity in distinct:
        key = names.entity_key(deployment, entity).encode()
        commands.append(Command(key, (b"HMGET", key, *fields)))
    replies = raise_first_error(await router.execute(commands, timeout_s=timeout_s))
    return dict(zip(distinct, replies, strict=True))


__all__ = ["read_entities"]
