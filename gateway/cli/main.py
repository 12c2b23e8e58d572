"""The ``rdv`` command: one subcommand per process, and ``serve`` to run them all."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from gateway.cli.arguments import (
    consumer_name,
    deployment_name,
    folder,
    port_number,
    role_name,
    whole_number,
)
from gateway.cli.faults import gateway_unreachable, operator_fault
from gateway.cli.process import (
    LOG_FORMAT,
    check_redis_once,
    listening_socket,
    one_blas_thread,
    open_files_to_the_hard_limit,
    require_redis,
    run_until_stopped,
    settings_from_args,
    share_metrics_between_processes,
    stop_event,
    warn_of_few_open_files,
)
from gateway.cli.startup_mark import STARTUP_FAILURE, marking_startup_failure, startup_failures
from gateway.cli.worker import cmd_worker
from gateway.settings import Settings
from gateway.settings_values import invalid_settings
from rendezvous.retry_log import quiet_noisy_loggers

log = logging.getLogger("rdv")


def cmd_train_demo(args: argparse.Namespace) -> None:
    from models.registry import ModelRegistry
    from models.train import train_demo

    settings = settings_from_args(args)
    for meta in train_demo(ModelRegistry(settings.models_dir), force=args.force):
        print(f"{meta.name} v{meta.version} {meta.algorithm}: {meta.metrics} sha256={meta.sha256}")


def cmd_gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.transport.guarded_protocol import (
        SHARED_PORT_REQUESTS_PER_CONNECTION,
        GuardedHttpToolsProtocol,
    )

    settings = settings_from_args(args)
    warn_of_few_open_files(open_files_to_the_hard_limit())
    os.environ["RDV_REDIS_URL"] = require_redis(settings)  # the app reads it (a factory)
    from rendezvous.bus.connection import connect

    # Reached here first: with several processes, uvicorn's supervisor exited 0 after each
    # child failed to start on a Redis it could not reach.
    from rendezvous.bus.redis_needs import check

    client = connect(os.environ["RDV_REDIS_URL"], wait_s=settings.redis_timeout_s * 5)
    try:  # a Redis that cannot carry the system: one line, before any process starts
        check(client, allow_eviction=settings.allow_eviction)
    finally:
        client.close()
    # The app is built by a factory (in each worker process when there are several), which
    # reads the settings from the environment: hand the command-line overrides down.
    os.environ.update(
        RDV_HOST=settings.host, RDV_PORT=str(settings.port), RDV_DATA_DIR=str(settings.data_dir)
    )
    one_of_several = args.reuse_port or args.fd is not None
    processes = 1 if one_of_several else settings.gateway_process_count
    if settings.requests_per_connection is None:  # each process's protocol reads it
        shared_port = one_of_several or processes > 1
        os.environ["RDV_REQUESTS_PER_CONNECTION"] = str(
            SHARED_PORT_REQUESTS_PER_CONNECTION if shared_port else 0
        )
    if processes > 1:
        share_metrics_between_processes()
    options: dict[str, Any] = dict(
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=settings.proxy_headers,
        http=GuardedHttpToolsProtocol,  # its limits: the settings, read in each process
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.keep_alive_s,  # the guard closes past it too
        server_header=False,  # the fast path never sent one; now neither does the ASGI path
        # No WebSocket route: an Upgrade is ignored (RFC 9110, 7.8) and the request answered
        # as HTTP; uvicorn's WebSocket handshake refused every path 403 with no body.
        ws="none",
    )
    app = "gateway.cli.main:_app_from_env"
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:  # uvicorn said only "[Errno 98] Address already in use", and exit 3
        try:
            sock = listening_socket(settings.host, settings.port, reuse_port=args.reuse_port)
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise SystemExit(f"rdv gateway: cannot listen on {where}: {exc}") from None
    if not one_of_several:
        sock.close()  # only a check: uvicorn binds its own (SO_REUSEADDR: at once)
        if processes == 1:
            uvicorn.run(app, **options)
            return
        with startup_failures() as failed:
            uvicorn.run(app, workers=processes, **options)
            if failed.exists():
                sys.exit(STARTUP_FAILURE)  # uvicorn's supervisor returned as if asked to stop
        return
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # what uvicorn.run does when the app failed to start


def _app_from_env() -> Any:
    from gateway.transport.app import serving_app

    _die_with_uvicorns_supervisor()
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    quiet_noisy_loggers()
    return marking_startup_failure(serving_app(settings))


def _die_with_uvicorns_supervisor() -> None:
    """In a gateway process that uvicorn's supervisor spawned (``rdv gateway`` with several
    processes): go when it goes. Killed outright, it left these serving on the port, and the
    next ``rdv gateway`` could not bind it (found by hand)."""
    import multiprocessing

    from gateway.cli.supervisor import die_with_parent

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    die_with_parent()
    if os.getppid() != parent.pid:  # it died before we asked
        raise SystemExit(f"rdv gateway: its supervisor (pid {parent.pid}) is gone")


def cmd_logbin(args: argparse.Namespace) -> None:
    from models.archive import SegmentWriter
    from models.deployment_purge import Purger
    from models.deployment_store import DeploymentStore
    from models.logbin import LogBin
    from models.name_owner import NameTaken, take_name
    from rendezvous.bus.connection import connect
    from rendezvous.heap import settle_heap

    settings = settings_from_args(args)
    check_redis_once(require_redis(settings), settings)  # the data commands, in one line
    client = connect(require_redis(settings), socket_timeout_s=settings.redis_timeout_s)
    consumer = args.consumer or f"logbin-{socket.gethostname()}"
    from gateway.cli.supervisor import holder_token

    token = holder_token()
    try:
        take_name(client, consumer, token)
    except NameTaken as exc:
        sys.exit(f"rdv logbin: {exc}")
    store = DeploymentStore(client)
    writer = SegmentWriter(
        settings.archive_dir,
        max_bytes=settings.segment_max_bytes,
        max_age_s=settings.segment_max_age_s,
    )
    logbin = LogBin(
        client,
        writer,
        consumer=consumer,
        deployments=store.list,
        batch_size=settings.logbin_batch_size,
        claim_idle_ms=settings.claim_idle_ms,
        batch_wait_ms=settings.logbin_batch_wait_ms,
        max_role_lag=settings.max_role_lag,
        owner_token=token,
        purger=Purger(client, settings.drain_grace_s),
        timeout_s=settings.redis_timeout_s,
    )
    stop = stop_event()
    settle_heap()
    log.info("log bin archiving to %s", settings.archive_dir)
    run_until_stopped(logbin, stop)
    log.info("log bin stopped: %s", logbin.stats)
    if logbin.name_lost is not None:
        sys.exit(f"rdv logbin: {logbin.name_lost}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def serving(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        listens = p.prog.split()[-1] in ("serve", "gateway")
        where = "" if listens else ": the gateway's; this process listens on nothing"
        p.add_argument("--host", help=f"listen address (RDV_HOST, default 127.0.0.1){where}")
        p.add_argument("--port", type=port_number,
                       help=f"listen port (RDV_PORT, default 8000){where}")  # fmt: skip
        p.add_argument("--data-dir", type=folder, help="data folder (RDV_DATA_DIR, default ./data)")
        return p

    def cmd_serve(args: argparse.Namespace) -> None:
        # Imported only for serve: it pulls in scikit-learn (demo training), ~130 MB that
        # every worker and gateway process would otherwise carry.
        from gateway.cli.serve import cmd_serve as run_serve

        run_serve(args)

    serving(sub.add_parser("serve", help="everything in one: Redis, gateway, workers, log bin"))
    sub.choices["serve"].set_defaults(func=cmd_serve)
    p = serving(sub.add_parser("gateway", help="the HTTP gateway"))
    p.add_argument("--reuse-port", action="store_true",
                   help="one process that shares the port with other `rdv gateway --reuse-port` "
                        "processes (SO_REUSEPORT)")  # fmt: skip
    p.add_argument("--fd", type=whole_number(0), default=None,
                   help="serve on this inherited listening socket, shared with other gateway "
                        "processes; rdv serve starts its gateways so")  # fmt: skip
    p.set_defaults(func=cmd_gateway)

    p = serving(sub.add_parser("worker", help="a model worker: one role of a deployment, or a "
                                              "host of many (--roles)"))  # fmt: skip
    p.add_argument("--deployment", type=deployment_name,
                   help="the deployment (with --role); alone, a host of its roles")  # fmt: skip
    p.add_argument("--role", type=role_name,
                   help="real, canary, or a challenger's role: this one role only")  # fmt: skip
    p.add_argument("--roles", choices=["all", "answering", "shadow"], default="all",
                   help="without --role: host every role of this kind of every deployment "
                        "(answering: real, A/B-split challengers), following changes")  # fmt: skip
    p.add_argument("--shard", default="0/1", help="without --role: I/N, this host's share")
    p.add_argument("--consumer", type=consumer_name,
                   help="with --role: its consumer name (stable across restarts)")  # fmt: skip
    p.add_argument("--name", type=consumer_name,
                   help="without --role: this host's name, in each of its consumers' (default "
                        "0); hosts that serve the same roles need their own")  # fmt: skip
    p.set_defaults(func=cmd_worker)

    p = serving(sub.add_parser("logbin", help="archive every request of every deployment"))
    p.add_argument("--consumer", type=consumer_name, help="consumer name in the logbin group")
    p.set_defaults(func=cmd_logbin)

    p = sub.add_parser("train-demo", help="train the breast-cancer demo models into the registry")
    p.add_argument("--data-dir", type=folder)
    p.add_argument("--force", action="store_true", help="retrain even if present")
    p.set_defaults(func=cmd_train_demo)

    from gateway.cli.admin import add_admin_commands
    from gateway.cli.readers import add_reader_commands
    from gateway.cli.replay import add_replay_command

    add_reader_commands(sub)
    add_admin_commands(sub)
    add_replay_command(sub)
    from gateway.cli.feedback import add_feedback_command

    add_feedback_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    one_blas_thread()
    try:
        settings = settings_from_args(args)  # --host, --port, --data-dir checked as well
    except Exception as exc:  # every command reads them: a bad one is one line, status 2
        reason = invalid_settings(exc)
        if reason is None:
            raise
        print(f"rdv {args.command}: {reason}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    quiet_noisy_loggers()
    open_files_to_the_hard_limit()  # children inherit it
    try:
        args.func(args)
    except BrokenPipeError:
        # The output's reader went away (``rdv decisions | head``): a shell's quiet exit, as
        # the Python documentation advises (stdout to devnull, so its flush at exit is silent).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"rdv {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        from rendezvous.bus.failures import permanent_refusal, unreachable

        reason = (permanent_refusal(exc) or unreachable(exc, settings.redis_url)
                  or gateway_unreachable(exc) or operator_fault(exc))  # fmt: skip
        if reason is None:
            raise
        log.debug("rdv %s failed", args.command, exc_info=exc)
        sys.exit(f"rdv {args.command}: {reason}")


if __name__ == "__main__":
    main()
