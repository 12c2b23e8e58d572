"""The commands that read what the system recorded: ``rdv archive`` (the log bin's files on
this host: list, read, export) and ``rdv decisions`` (the latest decision records in Redis)."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from typing import Any

from gateway.cli.arguments import deployment_name, folder, usage_error, whole_number
from gateway.cli.patience import ride_out
from gateway.cli.process import require_archive, require_redis, settings_from_args


def cmd_archive(args: argparse.Namespace) -> None:
    from models.archive import ArchiveReader

    settings = settings_from_args(args)
    _refuse_flags_of_another_action(args)
    if args.action == "export":
        from gateway.cli.export import cmd_export

        cmd_export(args, settings)  # which asks for Redis once its flags are checked
        return
    require_archive(settings, f"rdv archive {args.action}")
    reader = ArchiveReader(settings.archive_dir)
    archived = reader.deployments()
    if args.deployment and args.deployment not in archived:  # it printed nothing
        held = ", ".join(archived) or "none"
        name = args.deployment[:80]
        sys.exit(f"rdv archive {args.action}: nothing archived of deployment {name!r} under "
                 f"{settings.archive_dir} (archived: {held})")  # fmt: skip
    deployments = [args.deployment] if args.deployment else archived
    if args.action == "list":
        for dep in deployments:
            for seg in reader.segments(dep):
                print(f"{dep}\t{seg.path}\t{seg.size_bytes} bytes")
        return
    shown = 0
    for dep in deployments:
        for record in reader.records(dep):
            print(json.dumps(record))
            shown += 1
            if args.limit and shown >= args.limit:
                return


DECISIONS_PAGE = 1000
"""Records read at a time by ``rdv decisions --limit 0`` (a stream may keep many thousands)."""


def cmd_decisions(args: argparse.Namespace) -> None:
    from rendezvous import names
    from rendezvous.bus.connection import connect
    from rendezvous.decision import decode_entries

    settings = settings_from_args(args)
    try:
        stream = names.decisions_stream(args.deployment)
    except names.InvalidName as exc:
        sys.exit(f"rdv decisions: {exc}")
    client = connect(require_redis(settings), wait_s=5)
    what = "rdv decisions"
    if not ride_out(lambda: client.sismember(names.DEPLOYMENTS_SET, args.deployment), what):
        sys.exit(f"rdv decisions: deployment {args.deployment!r} does not exist")
    if args.limit:
        latest = ride_out(lambda: client.xrevrange(stream, count=args.limit), what)
        for record in reversed(decode_entries(latest)):
            print(json.dumps(record.to_dict()))
        return
    start = "-"  # 0: every record the stream keeps, oldest first, a page at a time
    while page := ride_out(partial(client.xrange, stream, min=start, count=DECISIONS_PAGE), what):
        for record in decode_entries(page):
            print(json.dumps(record.to_dict()))
        last = page[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))


EXPORT_ONLY = (("from_", "--from"), ("to", "--to"), ("positions", "--positions"),
               ("format", "--format"), ("out", "--out"))  # fmt: skip


def _refuse_flags_of_another_action(args: argparse.Namespace) -> None:
    """A flag the action does not read is a usage error: ``archive read --from T`` printed
    the whole archive, ``archive export --limit 3`` wrote all of it (a helper's CLI probe)."""
    given = [flag for dest, flag in EXPORT_ONLY if getattr(args, dest) is not None]
    if args.action != "export" and given:
        usage_error(f"rdv archive {args.action}: {', '.join(given)} only for export")
    if args.action == "export" and args.limit:
        usage_error("rdv archive export: --limit is for list and read (a slice is --from/--to "
                    "or --positions)")  # fmt: skip


def add_reader_commands(sub: Any) -> None:
    """``archive`` and ``decisions`` on the ``rdv`` parser's subcommands."""
    p = sub.add_parser("archive", help="list, read or export the log bin's archive")
    p.add_argument("action", choices=["list", "read", "export"])
    p.add_argument("--deployment", type=deployment_name)
    p.add_argument("--limit", type=whole_number(0), default=0, help="records to show (0: all)")
    p.add_argument("--data-dir", type=folder)
    from gateway.cli.export import add_export_arguments

    add_export_arguments(p)
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser("decisions", help="show the latest decision records of a deployment")
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("--limit", type=whole_number(0, 1_000_000), default=10,
                   help="records to show (default 10; 0: all the stream keeps)")  # fmt: skip
    p.set_defaults(func=cmd_decisions)
