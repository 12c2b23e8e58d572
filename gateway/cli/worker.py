"""``rdv worker``: one role of one deployment, or a host of many roles (``models.worker_host``),
which holds its name while it runs (``models.name_owner``)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from typing import TYPE_CHECKING

from gateway.cli.arguments import usage_error
from gateway.cli.process import (
    check_redis_once,
    require_redis,
    run_until_stopped,
    settings_from_args,
    stop_event,
)

if TYPE_CHECKING:
    from models.worker_host import Selection
    from rendezvous.bus.connection import Client

log = logging.getLogger(__name__)


def cmd_worker(args: argparse.Namespace) -> None:
    """One role of one deployment (``--deployment`` and ``--role``), or a host of many
    (``--roles``, optionally one ``--deployment``): see ``models.worker_host``."""
    from models.deployment_store import DeploymentStore
    from models.hosting import HOSTED_BLOCK_MS, HOSTED_HEARTBEAT_S
    from models.memory_bound import bound_memory
    from models.registry import ModelRegistry
    from models.worker import ModelWorker
    from models.worker_host import (
        Selection,
        WorkerHost,
        client_per_worker,
        hosted_consumer,
    )
    from rendezvous.bus.connection import connect
    from rendezvous.heap import settle_heap

    _check_flags(args)  # before Redis is asked (and the memory bound said)
    settings = settings_from_args(args)
    url = require_redis(settings)
    check_redis_once(url, settings)  # one line for a user that cannot run the data commands
    registry = ModelRegistry(settings.models_dir)
    bounded = bound_memory(settings.model_memory_mb)  # before any model is loaded
    log.info("model memory %s", f"bounded to {bounded} MB" if bounded else "not bounded")

    def bounded_client() -> Client:  # every command bounded: a Redis gone silent is a failure
        return connect(url, socket_timeout_s=settings.redis_timeout_s)

    def build(
        client: Client, deployment: str, role: str, consumer: str, hosted: bool = False
    ) -> ModelWorker:
        return ModelWorker(
            client,
            registry,
            deployment=deployment,
            role=role,
            consumer=consumer,
            batch_size=settings.worker_batch_size,
            block_ms=max(settings.worker_block_ms, HOSTED_BLOCK_MS)
            if hosted
            else settings.worker_block_ms,
            heartbeat_s=HOSTED_HEARTBEAT_S if hosted else 1.0,
            claim_idle_ms=settings.claim_idle_ms,
            reply_maxlen=settings.reply_maxlen,
            shadow_batch_wait_ms=settings.shadow_batch_wait_ms,
            model_run_limit_s=settings.model_run_limit_s,
            timeout_s=settings.redis_timeout_s,
        )

    stop = stop_event()
    if args.role is None:
        shard, shards = _shard(args.shard)
        selection = Selection(args.roles, args.deployment, shard, shards)
        name = args.name or "0"
        name_lost = _hold_host_name(bounded_client(), name, selection, stop)
        make = client_per_worker(bounded_client, lambda c, d, r: build(
            c, d, r, hosted_consumer(r, selection.roles, name), hosted=True))  # fmt: skip
        host = WorkerHost(DeploymentStore(bounded_client()), make, selection)
        host.reconcile()
        settle_heap()
        serving = ", ".join(f"{d}/{r}" for d, r in sorted(host.hosted)) or "nothing yet"
        log.info("worker host (%s roles, shard %s) serving %s", args.roles, args.shard, serving)
        if args.deployment is not None and args.deployment not in host.store.list():
            # a name mistyped served nothing for ever, and said only "nothing yet"
            log.warning("worker host: deployment %r does not exist (yet): its roles are served "
                        "once it is created", args.deployment)  # fmt: skip
        host.run(stop)
        log.info("worker host stopped")
        if name_lost.is_set():
            sys.exit(f"rdv worker: another worker host took the name {name!r} while this one "
                     "was away (stopped or cut off from Redis): stopped")  # fmt: skip
        return
    assert args.deployment is not None  # _check_flags
    consumer = args.consumer or f"{args.role}-{socket.gethostname()}-{os.getpid()}"
    worker = build(bounded_client(), args.deployment, args.role, consumer)
    worker.load()
    settle_heap()
    log.info("worker %s serving %s/%s with %s", consumer, args.deployment, args.role,
             worker.model_ref)  # fmt: skip
    run_until_stopped(worker, stop)
    log.info("worker %s stopped: %s", consumer, worker.stats)


def _hold_host_name(
    client: Client, name: str, selection: Selection, stop: threading.Event
) -> threading.Event:
    """Two hosts of the same roles under one name shared their consumers: one heartbeat, so a
    dead one was never missed, and counters that overwrote each other (a helper's probe).
    The second is refused, saying how to name it apart."""
    from gateway.cli.supervisor import holder_token
    from models.name_owner import WORKER_HOST, NameTaken, keep_held, take_name
    from models.worker_host import hosted_consumer

    where = selection.deployment or "every deployment"
    # Held by the consumer names the host takes, not its kind: a host of every role and one of
    # the answering roles under one name both read as real-<name> and canary-<name>, and ran
    # side by side (a helper's README probe: `rdv worker` beside `rdv serve`'s hosts).
    consumers = hosted_consumer("<role>", selection.roles, name)
    held = f"{name} (consumers {consumers} of {where}, shard {selection.shard}/{selection.shards})"
    token = holder_token()
    try:
        take_name(client, held, token, kind=WORKER_HOST)
    except NameTaken as exc:
        sys.exit(f"rdv worker: {exc}")
    return keep_held(client, held, token, WORKER_HOST, stop)


def _check_flags(args: argparse.Namespace) -> None:
    """Flags that need each other, as usage errors (status 2)."""
    if args.role is None:
        if args.consumer:
            usage_error("rdv worker: --consumer names one role's consumer; add --role "
                        "(a host's own name: --name)")  # fmt: skip
        _shard(args.shard)
        return
    if args.name:
        usage_error("rdv worker: --name names a host of many roles; one role's worker "
                    "takes --consumer")  # fmt: skip
    if args.deployment is None:
        usage_error("rdv worker: --role needs --deployment")


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), checked."""
    try:
        shard, shards = (int(part) for part in text.split("/"))
    except ValueError:
        usage_error(f"rdv worker: --shard wants I/N, such as 0/2, not {text!r}")
    if not 0 <= shard < shards:
        usage_error(f"rdv worker: --shard {text}: I must be in 0..N-1")
    return shard, shards
