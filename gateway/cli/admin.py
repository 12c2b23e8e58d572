"""``rdv`` admin commands: the admin API over HTTP, one command per route.

They talk to a running gateway (``--url``, default ``http://RDV_HOST:RDV_PORT``) with the
token from ``RDV_ADMIN_TOKEN``, print the JSON answer, and exit non-zero with the server's
``detail`` when it refuses (``gateway.cli.admin_http``). ``rdv features load`` is
``gateway.cli.features_load``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.cli.admin_http import admin_request, without_none
from gateway.cli.arguments import (
    add_url_argument,
    deployment_name,
    finite_number,
    model_name,
    role_name,
    role_share,
    usage_error,
    whole_number,
)
from gateway.cli.features_load import cmd_features
from gateway.cli.patience import add_retry_argument


def _require(args: argparse.Namespace, *flags: str) -> None:
    """Exit as argparse does (status 2) when a flag this action needs was not given, before
    a request that would name ``None``."""
    missing = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is None]
    if missing:
        usage_error(f"rdv {args.command} {args.action}: {', '.join(missing)} required")


def cmd_models(args: argparse.Namespace) -> None:
    if args.action != "list":
        _require(args, "name", *(["version"] if args.action == "delete" else []))
        if args.action == "upload":
            _require(args, "file")
    if args.action == "upload":
        _refuse_blank(args, "metrics", "classes", "class_names", "feature_names")
        meta = without_none(
            {
                "name": args.name,
                "version": args.version,
                "deployment": args.deployment,
                "description": args.description,
                "algorithm": args.algorithm,
                "metrics": _metrics(args.metrics),
                "classes": _classes(args.classes),
                "class_names": args.class_names.split(",") if args.class_names else None,
                "feature_names": _feature_names(args.feature_names),
            }
        )
        data = _read(args.file, "--file")
        files = {"file": (Path(args.file).name, data, "application/octet-stream")}
        if args.reference:
            rows = _read(args.reference, "--reference")
            files["reference"] = (Path(args.reference).name, rows, "text/csv")
        admin_request(args, "POST", "/models", files=files, data={"metadata": json.dumps(meta)})
    elif args.action == "list":
        if args.version is not None:  # it listed every version (a helper's CLI probe)
            usage_error("rdv models list: --version is for show and delete (show --name M "
                        "lists a model's versions)")  # fmt: skip
        admin_request(args, "GET", "/models", params=without_none({"name": args.name}))
    elif args.action == "show" and args.version is None:
        admin_request(args, "GET", f"/models/{args.name}")  # every version of it
    elif args.action == "show":
        admin_request(args, "GET", f"/models/{args.name}/{args.version}")
    else:
        admin_request(args, "DELETE", f"/models/{args.name}/{args.version}")


def _refuse_blank(args: argparse.Namespace, *dests: str) -> None:
    """``--feature-names ''`` (an unset shell variable) was dropped, and the gateway's refusal
    then named another cause (a helper's CLI probe): a blank value is a usage error."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and not value.strip():
            usage_error(f"rdv models upload: --{dest.replace('_', '-')} is empty")


MAX_UPLOAD_FILE = 2**28
"""Most bytes an upload's file is read to (256 MB): a gateway takes at most
``RDV_MAX_MODEL_BYTES`` (64 MB by default), and ``/dev/zero`` was read until memory ran out
(a helper's CLI probe)."""


def _read(path: str, flag: str) -> bytes:
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_UPLOAD_FILE + 1)
    except OSError as exc:
        sys.exit(f"rdv models upload: {flag} {path}: {exc.strerror or exc}")
    if len(data) > MAX_UPLOAD_FILE:
        sys.exit(f"rdv models upload: {flag} {path}: larger than {MAX_UPLOAD_FILE} bytes")
    return data


def _metrics(given: str | None) -> Any:
    if not given:
        return None
    try:
        return json.loads(given)
    except (ValueError, RecursionError) as exc:
        sys.exit(f'rdv models upload: --metrics is not JSON ({exc}); e.g. {{"accuracy": 0.97}}')


def _classes(given: str | None) -> list[int] | None:
    if not given:
        return None
    try:
        return [int(c) for c in given.split(",")]
    except ValueError:
        sys.exit(f"rdv models upload: --classes {given!r}: whole numbers, comma-separated")


def _feature_names(given: str | None) -> list[str] | None:
    """``a,b,c``, or ``@file`` with one name a line (names may hold commas)."""
    if not given:
        return None
    if given.startswith("@"):
        try:
            text = _read(given[1:], "--feature-names").decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            sys.exit(f"rdv models upload: --feature-names {given}: not a readable UTF-8 file "
                     f"({getattr(exc, 'strerror', None) or exc})")  # fmt: skip
        lines = text.splitlines()
        return [line.strip() for line in lines if line.strip()]
    return [name.strip() for name in given.split(",")]


def cmd_deployments(args: argparse.Namespace) -> None:
    if args.action != "list":
        _require(args, "deployment", *(["model", "version"] if args.action == "create" else []))
    if args.action == "create" and args.canary_model and args.canary_version is None:
        _require(args, "canary_version")  # a canary model alone was dropped silently
    if args.action == "list":
        admin_request(args, "GET", "/deployments")
    elif args.action == "show":
        admin_request(args, "GET", f"/deployments/{args.deployment}")
    elif args.action == "history":
        admin_request(
            args, "GET", f"/deployments/{args.deployment}/history", params={"limit": args.limit}
        )
    elif args.action == "shadow":
        admin_request(args, "GET", f"/deployments/{args.deployment}/shadow")
    elif args.action == "delete":
        path = f"/deployments/{args.deployment}"
        admin_request(args, "DELETE", path, params={"reason": args.reason})
    else:
        body: dict[str, Any] = {
            "name": args.deployment,
            "real": {"model": args.model, "version": args.version},
            "reason": args.reason,
        }
        if args.canary_version is not None:
            body["canary"] = {
                "model": args.canary_model or args.model,
                "version": args.canary_version,
            }
        admin_request(args, "POST", "/deployments", json=body)


def cmd_promote(args: argparse.Namespace) -> None:
    body = without_none(
        {
            "version": args.version,
            "model": args.model,
            "pin_canary": args.pin_canary,
            "force": args.force,
            "min_shadow_requests": args.min_shadow_requests,
            "max_disagreement": args.max_disagreement,
            "min_labeled": args.min_labeled,
            "min_accuracy_gain": args.min_accuracy_gain,
            "significance": args.significance,
            "require_replay": args.require_replay or None,
            "min_replay_records": args.min_replay_records,
            "min_replay_agreement": args.min_replay_agreement,
            "expect_revision": args.expect_revision,
            "reason": args.reason,
        }
    )
    admin_request(args, "POST", f"/deployments/{args.deployment}/promote", json=body)


def cmd_rollback(args: argparse.Namespace) -> None:
    body = without_none(
        {
            "to_revision": args.to_revision,
            "expect_revision": args.expect_revision,
            "reason": args.reason,
        }
    )
    admin_request(args, "POST", f"/deployments/{args.deployment}/rollback", json=body)


def cmd_challengers(args: argparse.Namespace) -> None:
    path = f"/deployments/{args.deployment}/challengers"
    if args.action == "add":
        _require(args, "version")  # sent without, the gateway's 422 said "Field required"
        body = without_none(
            {
                "role": args.role,
                "version": args.version,
                "model": args.model,
                "split": args.split,
                "expect_revision": args.expect_revision,
                "reason": args.reason,
            }
        )
        admin_request(args, "POST", path, json=body)
    else:
        params = without_none({"reason": args.reason, "expect_revision": args.expect_revision})
        admin_request(args, "DELETE", f"{path}/{args.role}", params=params)


def cmd_schedule(args: argparse.Namespace) -> None:
    splits: dict[str, float] | None = {} if args.clear_split else None
    if args.split is not None:
        splits = {}
        for role, fraction in args.split:
            if role in splits:
                usage_error(f"rdv schedule set: --split names {role} twice")
            splits[role] = fraction
    fallbacks = None
    if args.fallbacks is not None:
        fallbacks = [r for r in args.fallbacks.split(",") if r]
    body = without_none(
        {
            "real_deadline_ms": args.real_deadline_ms,
            "timeout_ms": args.timeout_ms,
            "grace_ms": args.grace_ms,
            "fallbacks": fallbacks,
            "splits": splits,
            "split_seed": args.split_seed,
            "expect_revision": args.expect_revision,
            "reason": args.reason,
        }
    )
    admin_request(args, "PATCH", f"/deployments/{args.deployment}/schedule", json=body)


def cmd_partitions(args: argparse.Namespace) -> None:
    body = without_none(
        {
            "partitions": args.partitions,
            "expect_revision": args.expect_revision,
            "reason": args.reason,
        }
    )
    admin_request(args, "PATCH", f"/deployments/{args.deployment}", json=body)


def add_admin_commands(sub: Any) -> None:
    """Register the admin commands on the ``rdv`` parser's subcommands."""

    def admin(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        add_url_argument(p)
        return p

    def reason(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reason", default="", help="why (kept in the deployment's history)")

    def expect_revision(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--expect-revision",
            type=whole_number(1),
            help="refuse (409) unless the deployment is still at this revision "
            "(rdv deployments show): another operator's change made meanwhile is not undone",
        )

    p = admin("models", "model registry: upload, list, show, delete (admin API)")
    p.add_argument("action", choices=["upload", "list", "show", "delete"])
    p.add_argument("--name", type=model_name, help="model name (all but list)")
    p.add_argument(
        "--version", type=whole_number(1), help="delete; show: one version (default: all)"
    )
    p.add_argument("--file", help="upload: the ONNX file")
    p.add_argument("--deployment", type=deployment_name,
                   help="upload: check the width against this deployment")  # fmt: skip
    p.add_argument("--description")
    p.add_argument("--algorithm")
    p.add_argument("--metrics", help='upload: JSON object, e.g. {"accuracy": 0.97}')
    p.add_argument("--classes", help="upload: comma-separated class labels (default: the model's)")
    p.add_argument("--class-names", help="upload: comma-separated names, one per class")
    p.add_argument(
        "--reference",
        help="upload: held-out rows as CSV with a header of feature names (the model's "
        "training statistics for drift and out-of-distribution checks, its score reference)",
    )
    p.add_argument(
        "--feature-names", help="upload, a model of new features: a,b,c or @file (a name a line)"
    )
    p.set_defaults(func=cmd_models)

    p = admin("deployments",
              "deployments: list, show, create, delete, history, shadow (admin API)")  # fmt: skip
    p.add_argument("action", choices=["list", "show", "create", "delete", "history", "shadow"])
    p.add_argument("--deployment", type=deployment_name, help="all but list")
    p.add_argument("--model", type=model_name, help="create: the real model's name")
    p.add_argument("--version", type=whole_number(1), help="create: the real model's version")
    p.add_argument("--canary-model", type=model_name, help="create: default the real model's")
    p.add_argument("--canary-version", type=whole_number(1), help="create: a canary")
    p.add_argument("--limit", type=whole_number(1, 10_000), default=50,
                   help="history: latest entries")  # fmt: skip
    reason(p)
    p.set_defaults(func=cmd_deployments)

    p = admin("promote", "make a model version real; the old real becomes the canary")
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("--version", type=whole_number(1), required=True)
    p.add_argument("--model", type=model_name, help="default: the real model's name")
    p.add_argument("--pin-canary", action="store_true", help="keep the canary as it is")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    p.add_argument("--min-shadow-requests", type=whole_number(0))
    p.add_argument("--max-disagreement", type=finite_number)
    p.add_argument(
        "--min-labeled", type=whole_number(0), help="labelled rows both it and real scored"
    )
    p.add_argument(
        "--min-accuracy-gain", type=finite_number, help="its accuracy minus real's, paired"
    )
    p.add_argument(
        "--significance", type=finite_number, help="McNemar p-value bound (default 0.05)"
    )
    p.add_argument("--require-replay", action="store_true", help="a finished rdv replay of it")
    p.add_argument("--min-replay-records", type=whole_number(0))
    p.add_argument("--min-replay-agreement", type=finite_number, help="with the answers given then")
    expect_revision(p)
    reason(p)
    p.set_defaults(func=cmd_promote)

    p = admin("rollback", "restore the roles and schedule before their last change")
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("--to-revision", type=whole_number(1))
    expect_revision(p)
    reason(p)
    p.set_defaults(func=cmd_rollback)

    p = admin("challengers", "add or remove a shadow/challenger role")
    p.add_argument("action", choices=["add", "remove"])
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("--role", required=True, type=role_name)
    p.add_argument("--version", type=whole_number(1), help="add: the model version")
    p.add_argument("--model", type=model_name, help="add: default the real model's name")
    p.add_argument("--split", type=finite_number, help="add: fraction of requests it answers (A/B)")
    expect_revision(p)
    reason(p)
    p.set_defaults(func=cmd_challengers)

    p = admin("schedule", "change a deployment's schedule")
    p.add_argument("action", choices=["set"])
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("--real-deadline-ms", type=finite_number)
    p.add_argument("--timeout-ms", type=finite_number)
    p.add_argument("--grace-ms", type=finite_number)
    p.add_argument("--fallbacks", help="comma-separated roles, in order ('' for none)")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--split",
        action="append",
        type=role_share,
        metavar="ROLE=FRACTION",
        help="A/B split (repeat per role; give none to keep it)",
    )
    split.add_argument("--clear-split", action="store_true", help="no A/B split any more")
    p.add_argument("--split-seed", type=int)
    expect_revision(p)
    reason(p)
    p.set_defaults(func=cmd_schedule)

    p = admin("features", "online feature store: load entity features (admin API)")
    p.add_argument("action", choices=["load"])
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("--file", required=True, help="CSV with a header, or JSON lines")
    p.add_argument("--format", choices=["csv", "jsonl"], help="default: by the file's suffix")
    p.add_argument("--batch", type=whole_number(1, 10_000), default=1000,
                   help="entities per call (at most 10000)")  # fmt: skip
    add_retry_argument(p)
    p.set_defaults(func=cmd_features)

    p = admin("partitions", "spread a deployment's requests over N input streams")
    p.add_argument("--deployment", required=True, type=deployment_name)
    p.add_argument("partitions", type=whole_number(1, 64), help="1 to 64")
    expect_revision(p)
    reason(p)
    p.set_defaults(func=cmd_partitions)
