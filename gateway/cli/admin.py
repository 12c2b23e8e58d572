"""``rdv`` admin commands: the admin API over HTTP, one command per route.

They talk to a running gateway (``--url``, default ``http://RDV_HOST:RDV_PORT``) with the
token from ``RDV_ADMIN_TOKEN``, print the JSON answer, and exit non-zero with the server's
``detail`` when it refuses.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import logging
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.records import json_lines
from gateway.settings import Settings

if TYPE_CHECKING:
    import httpx

_TIMEOUT_S = 60.0


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


def admin_session(args: argparse.Namespace) -> httpx.Client:
    """An HTTP client on the gateway, with the admin token and the actor."""
    import httpx

    settings = Settings()
    url = args.url or f"http://{settings.host}:{settings.port}"
    headers = {"X-Actor": _actor()}
    token = settings.admin_token.get_secret_value().strip() if settings.admin_token else ""
    if token:
        headers["Authorization"] = f"Bearer {token}"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    return httpx.Client(base_url=url, timeout=_TIMEOUT_S, headers=headers)


def admin_request(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    http: httpx.Client | None = None,
    show: bool = True,
    **kw: Any,
) -> Any:
    """One admin call: the JSON answer (printed unless ``show`` is false), or exit with the
    server's ``detail``. ``http``: a session to reuse (else one for this call)."""
    import httpx

    session = http or admin_session(args)
    try:
        resp = session.request(method, f"/admin{path}", **kw)
    except httpx.HTTPError as exc:
        sys.exit(f"cannot reach the gateway at {session.base_url}: {exc}")
    finally:
        if http is None:
            session.close()
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text}
    if resp.status_code >= 400:
        print(json.dumps(body, indent=2), file=sys.stderr)
        detail = body.get("detail") if isinstance(body, dict) else body
        sys.exit(f"{method} /admin{path} -> {resp.status_code}: {detail}")
    if show:
        print(json.dumps(body, indent=2))
    return body


def without_none(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}


def cmd_models(args: argparse.Namespace) -> None:
    if args.action == "upload":
        meta = without_none(
            {
                "name": args.name,
                "version": args.version,
                "deployment": args.deployment,
                "description": args.description,
                "algorithm": args.algorithm,
                "metrics": json.loads(args.metrics) if args.metrics else None,
                "classes": [int(c) for c in args.classes.split(",")] if args.classes else None,
            }
        )
        data = Path(args.file).read_bytes()
        files = {"file": (Path(args.file).name, data, "application/octet-stream")}
        admin_request(args, "POST", "/models", files=files, data={"metadata": json.dumps(meta)})
    elif args.action == "list":
        admin_request(args, "GET", "/models", params=without_none({"name": args.name}))
    elif args.action == "show":
        admin_request(args, "GET", f"/models/{args.name}/{args.version}")
    else:
        admin_request(args, "DELETE", f"/models/{args.name}/{args.version}")


def cmd_deployments(args: argparse.Namespace) -> None:
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
            "reason": args.reason,
        }
    )
    admin_request(args, "POST", f"/deployments/{args.deployment}/promote", json=body)


def cmd_rollback(args: argparse.Namespace) -> None:
    body = without_none({"to_revision": args.to_revision, "reason": args.reason})
    admin_request(args, "POST", f"/deployments/{args.deployment}/rollback", json=body)


def cmd_challengers(args: argparse.Namespace) -> None:
    path = f"/deployments/{args.deployment}/challengers"
    if args.action == "add":
        body = without_none(
            {
                "role": args.role,
                "version": args.version,
                "model": args.model,
                "split": args.split,
                "reason": args.reason,
            }
        )
        admin_request(args, "POST", path, json=body)
    else:
        admin_request(args, "DELETE", f"{path}/{args.role}", params={"reason": args.reason})


def cmd_schedule(args: argparse.Namespace) -> None:
    splits: dict[str, float] | None = {} if args.clear_split else None
    if args.split is not None:
        splits = {}
        for item in args.split:
            role, _, fraction = item.partition("=")
            splits[role] = float(fraction)
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
            "reason": args.reason,
        }
    )
    admin_request(args, "PATCH", f"/deployments/{args.deployment}/schedule", json=body)


def cmd_partitions(args: argparse.Namespace) -> None:
    body = {"partitions": args.partitions, "reason": args.reason}
    admin_request(args, "PATCH", f"/deployments/{args.deployment}", json=body)


_BATCH_BYTES = 512 * 1024
"""A ``features load`` batch stays under this many bytes of JSON (RDV_MAX_BODY_BYTES is 1 MiB
by default)."""


def cmd_features(args: argparse.Namespace) -> None:
    """Load entity features from a CSV (a header row; the lookup's key column and feature
    columns, an empty cell is no value) or JSON-lines file (one object a line), in batches
    of ``--batch`` entities through ``PUT /admin/deployments/{d}/entities``, with progress on
    stderr. The whole file is read once before anything is sent, so a malformed one writes
    nothing; a batch the gateway refuses stops the load, and the batches before it stay."""
    path = Path(args.file)
    kind = args.format or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    started = time.monotonic()
    with admin_session(args) as http:
        dep = admin_request(args, "GET", f"/deployments/{args.deployment}", http=http, show=False)
        lookup = dep.get("feature_spec", {}).get("lookup")
        if not lookup:
            sys.exit(
                f"deployment {args.deployment} looks nothing up: declare its lookup first "
                f"(PATCH /admin/deployments/{args.deployment}/enrichment)"
            )
        total = sum(1 for _ in _records(path, kind, lookup["key"]))
        progress = _Progress(total)
        batch: list[tuple[int, str]] = []
        size = 0
        loaded = batches = 0

        def send() -> None:
            nonlocal batch, size, loaded, batches
            body = "[" + ",".join(text for _, text in batch) + "]"
            resp = http.put(f"/admin/deployments/{args.deployment}/entities", content=body,
                            headers={"content-type": "application/json"})  # fmt: skip
            if resp.status_code >= 400:
                progress.close()
                _refused(resp, [line for line, _ in batch], loaded)
            loaded += len(batch)
            batches += 1
            batch, size = [], 0
            progress.update(loaded)

        for line, row in _records(path, kind, lookup["key"]):
            text = json.dumps(row, separators=(",", ":"))
            if batch and (len(batch) >= args.batch or size + len(text) > _BATCH_BYTES):
                send()
            batch.append((line, text))
            size += len(text) + 1
        if batch:
            send()
        progress.close()
    seconds = round(time.monotonic() - started, 3)
    print(json.dumps({"deployment": args.deployment, "file": str(path), "loaded": loaded,
                      "batches": batches, "seconds": seconds}))  # fmt: skip


def _records(path: Path, kind: str, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, entity) of each record of the file; exits on one that cannot be read."""
    try:
        with path.open(newline="" if kind == "csv" else None, encoding="utf-8") as f:
            if kind == "jsonl":
                yield from json_lines(path, f)
                return
            reader = csv.DictReader(f)
            if key not in (reader.fieldnames or []):
                sys.exit(f"{path}: no column {key!r} (the lookup's key) in the header")
            for row in reader:
                n = reader.line_num
                entity: dict[str, Any] = {}
                for column, value in row.items():
                    if column is None or value is None:
                        sys.exit(f"{path}:{n}: the row does not match the header")
                    if column == key:
                        entity[column] = value
                    elif value.strip():
                        try:
                            entity[column] = float(value)
                        except ValueError:
                            sys.exit(f"{path}:{n}: {column} {value!r} is not a number")
                yield n, entity
    except OSError as exc:
        sys.exit(f"cannot read {path}: {exc}")


def _refused(resp: httpx.Response, lines: list[int], loaded: int) -> None:
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text}
    for error in body.get("errors", []) if isinstance(body, dict) else []:
        if isinstance(error, dict) and isinstance(error.get("row"), int):
            error["line"] = lines[error["row"]]
    print(json.dumps(body, indent=2), file=sys.stderr)
    detail = body.get("detail") if isinstance(body, dict) else body
    sys.exit(f"batch of lines {lines[0]}-{lines[-1]} refused ({resp.status_code}: {detail}); "
             f"{loaded} entities were loaded before it")  # fmt: skip


class _Progress:
    """``loaded N/T entities (P%)`` on stderr: rewritten in place on a terminal, a line per
    batch otherwise (a log)."""

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, loaded: int) -> None:
        share = f" ({100 * loaded // self.total}%)" if self.total else ""
        text = f"features load: {loaded}/{self.total} entities{share}"
        sys.stderr.write(f"\r{text}" if self.tty else f"{text}\n")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
        self.shown = False


def add_admin_commands(sub: Any) -> None:
    """Register the admin commands on the ``rdv`` parser's subcommands."""

    def admin(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--url", help="gateway base URL (default http://RDV_HOST:RDV_PORT)")
        return p

    def reason(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reason", default="", help="why (kept in the deployment's history)")

    p = admin("models", "model registry: upload, list, show, delete (admin API)")
    p.add_argument("action", choices=["upload", "list", "show", "delete"])
    p.add_argument("--name", help="model name")
    p.add_argument("--version", type=int)
    p.add_argument("--file", help="upload: the ONNX file")
    p.add_argument("--deployment", help="upload: check the width against this deployment")
    p.add_argument("--description")
    p.add_argument("--algorithm")
    p.add_argument("--metrics", help='upload: JSON object, e.g. {"accuracy": 0.97}')
    p.add_argument("--classes", help="upload: comma-separated class labels")
    p.set_defaults(func=cmd_models)

    p = admin("deployments", "deployments: list, show, create, history, shadow (admin API)")
    p.add_argument("action", choices=["list", "show", "create", "history", "shadow"])
    p.add_argument("--deployment")
    p.add_argument("--model", help="create: the real model's name")
    p.add_argument("--version", type=int, help="create: the real model's version")
    p.add_argument("--canary-model")
    p.add_argument("--canary-version", type=int)
    p.add_argument("--limit", type=int, default=50, help="history: latest entries")
    reason(p)
    p.set_defaults(func=cmd_deployments)

    p = admin("promote", "make a model version real; the old real becomes the canary")
    p.add_argument("--deployment", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--model", help="default: the real model's name")
    p.add_argument("--pin-canary", action="store_true", help="keep the canary as it is")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    p.add_argument("--min-shadow-requests", type=int)
    p.add_argument("--max-disagreement", type=float)
    p.add_argument("--min-labeled", type=int, help="labelled rows both it and real scored")
    p.add_argument("--min-accuracy-gain", type=float, help="its accuracy minus real's, paired")
    p.add_argument("--significance", type=float, help="McNemar p-value bound (default 0.05)")
    p.add_argument("--require-replay", action="store_true", help="a finished rdv replay of it")
    p.add_argument("--min-replay-records", type=int)
    p.add_argument("--min-replay-agreement", type=float, help="with the answers given then")
    reason(p)
    p.set_defaults(func=cmd_promote)

    p = admin("rollback", "restore the previous (or a given) revision's roles and schedule")
    p.add_argument("--deployment", required=True)
    p.add_argument("--to-revision", type=int)
    reason(p)
    p.set_defaults(func=cmd_rollback)

    p = admin("challengers", "add or remove a shadow/challenger role")
    p.add_argument("action", choices=["add", "remove"])
    p.add_argument("--deployment", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--version", type=int, help="add: the model version")
    p.add_argument("--model", help="add: default the real model's name")
    p.add_argument("--split", type=float, help="add: fraction of requests it answers (A/B)")
    reason(p)
    p.set_defaults(func=cmd_challengers)

    p = admin("schedule", "change a deployment's schedule")
    p.add_argument("action", choices=["set"])
    p.add_argument("--deployment", required=True)
    p.add_argument("--real-deadline-ms", type=float)
    p.add_argument("--timeout-ms", type=float)
    p.add_argument("--grace-ms", type=float)
    p.add_argument("--fallbacks", help="comma-separated roles, in order ('' for none)")
    p.add_argument(
        "--split",
        action="append",
        metavar="ROLE=FRACTION",
        help="A/B split (repeat per role; give none to keep it)",
    )
    p.add_argument("--clear-split", action="store_true", help="no A/B split any more")
    p.add_argument("--split-seed", type=int)
    reason(p)
    p.set_defaults(func=cmd_schedule)

    p = admin("features", "online feature store: load entity features (admin API)")
    p.add_argument("action", choices=["load"])
    p.add_argument("--deployment", required=True)
    p.add_argument("--file", required=True, help="CSV with a header, or JSON lines")
    p.add_argument("--format", choices=["csv", "jsonl"], help="default: by the file's suffix")
    p.add_argument("--batch", type=int, default=1000, help="entities per call (at most 10000)")
    p.set_defaults(func=cmd_features)

    p = admin("partitions", "spread a deployment's requests over N input streams")
    p.add_argument("--deployment", required=True)
    p.add_argument("partitions", type=int, help="1 to 64")
    reason(p)
    p.set_defaults(func=cmd_partitions)
