"""``rdv replay``: score a model version on the archive through the running gateway's admin
API, show progress on stderr, print the report as JSON on stdout.

Exits 0 when the replay is done, non-zero with the reason otherwise (refused, failed, or
interrupted: Ctrl-C asks the gateway to stop it, and ``--resume ID`` continues it later).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Annotated, Any

from pydantic import StringConstraints

from gateway.cli.admin_http import Expect, admin_request, admin_session, without_none
from gateway.cli.arguments import (
    add_url_argument,
    deployment_name,
    model_name,
    replay_id,
    usage_error,
    whole_number,
)
from gateway.cli.patience import DEFAULT_BUDGET_S
from rendezvous import names

_POLL_S = 0.5


class _Progress(Expect):
    done: int
    total: int | None


class Report(Expect):
    """What the command reads of a replay report: the answer of each of its calls is checked
    to hold it, so that a ``--url`` that is no gateway is one line, not a ``KeyError`` (and
    its ``id`` goes into the paths that follow: a replay id, never ``..``)."""

    id: Annotated[str, StringConstraints(pattern=f"^{names.REPLAY_ID_PATTERN.pattern}$")]
    state: str
    progress: _Progress


def cmd_replay(args: argparse.Namespace) -> None:
    base = f"/deployments/{args.deployment}/replays"
    if args.resume:  # its report says what it scores: these were ignored (a CLI probe)
        given = [flag for dest, flag in (("version", "--version"), ("model", "--model"),
                 ("from_", "--from"), ("to", "--to"), ("last", "--last"))
                 if getattr(args, dest) is not None]  # fmt: skip
        if given:
            usage_error(f"rdv replay: --resume continues a replay as it was asked: "
                        f"{', '.join(given)} not taken with it")  # fmt: skip
    with admin_session(args) as http:
        if args.resume:
            path = f"{base}/{args.resume}/resume"
            report = admin_request(args, "POST", path, http=http, show=False, expect=Report)
        else:
            if args.version is None:
                usage_error("rdv replay: --version is required (or --resume ID)")
            body = without_none(
                {"version": args.version, "model": args.model, "from": args.from_,
                 "to": args.to, "last": args.last}
            )  # fmt: skip
            report = admin_request(
                args, "POST", base, http=http, show=False, expect=Report, json=body
            )
        rid = report["id"]
        print(f"replay {rid} of {args.deployment} started", file=sys.stderr)
        if args.no_wait:
            print(json.dumps(report, indent=2))
            return
        try:
            report = _follow(args, http, f"{base}/{rid}", report)
        except KeyboardInterrupt:
            path = f"{base}/{rid}/cancel"
            report = admin_request(args, "POST", path, http=http, show=False, expect=Report)
            print(json.dumps(report, indent=2))
            sys.exit(f"replay {rid} stopped at {report['progress']['done']} records; "
                     f"continue it with: rdv replay --deployment {args.deployment} "
                     f"--resume {rid}")  # fmt: skip
    print(json.dumps(report, indent=2))
    if report["state"] != "done":
        sys.exit(f"replay {rid} {report['state']}: {report.get('reason', '')}")


def _follow(args: argparse.Namespace, http: Any, path: str, report: dict[str, Any]) -> Any:
    """Poll until the replay leaves ``running``; progress on stderr (in place on a tty)."""
    tty = sys.stderr.isatty()
    shown = None
    while report["state"] == "running":
        time.sleep(_POLL_S)
        # a read: a failover's 503 (or a gateway restarting) is waited out, as the bulk
        # commands do, not taken for the replay's end (it runs on meanwhile)
        report = admin_request(args, "GET", path, http=http, show=False, expect=Report,
                               retry_for=DEFAULT_BUDGET_S)  # fmt: skip
        progress = report["progress"]
        total = progress.get("total")
        line = (
            "replay: resolving the range to stream positions"
            if total is None
            else f"replay: {progress['done']}/{total} records"
            + (f" ({100 * progress['done'] // total}%)" if total else "")
        )
        if line != shown:
            sys.stderr.write(f"\r{line}" if tty else f"{line}\n")
            sys.stderr.flush()
            shown = line
    if tty and shown:
        sys.stderr.write("\n")
    return report


def add_replay_command(sub: Any) -> None:
    """Register ``rdv replay`` on the ``rdv`` parser's subcommands."""
    p: argparse.ArgumentParser = sub.add_parser(
        "replay", help="score a model version on archived requests (admin API); prints a report"
    )
    add_url_argument(p)
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("--version", type=whole_number(1), help="the model version to score")
    p.add_argument("--model", type=model_name, help="default: the real model's name")
    p.add_argument(
        "--from", dest="from_", metavar="T", help="ISO-8601 or epoch ms (request time, inclusive)"
    )
    p.add_argument("--to", metavar="T", help="ISO-8601 or epoch ms (inclusive; default now)")
    p.add_argument("--last", type=whole_number(1), help="the last N archived requests")
    p.add_argument("--resume", metavar="ID", type=replay_id, help="continue an interrupted replay")
    p.add_argument("--no-wait", action="store_true", help="print the started report and exit")
    p.set_defaults(func=cmd_replay)
