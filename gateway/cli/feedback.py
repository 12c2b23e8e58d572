"""``rdv feedback``: labels in bulk from a file, through the gateway's feedback route.

The file is a CSV with a header (``request_id`` and ``label`` or ``correct``, optionally
``weight``; a label is a class or its name; a request of several rows takes a JSON list of
labels, ``"[1,0]"``) or JSON lines
(one feedback object a line). It is read and checked whole before
anything is sent, then posted to ``POST /v1/deployments/{d}/feedback`` at ``--url`` in batches
(each all or nothing on the gateway), with a progress bar on stderr. A refused batch stops the
load with the gateway's reason; the batches before it stay accepted. A momentary refusal is
waited out (``gateway.cli.patience``), and ``--skip-unknown`` sends a batch on without the ids
the gateway no longer knows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.admin_http import AnswerFault, Expect, read_answer, show_refusal
from gateway.cli.arguments import add_url_argument, deployment_name, whole_number
from gateway.cli.faults import shown_gateway
from gateway.cli.patience import add_retry_argument, send_patiently
from gateway.cli.records import csv_rows, json_lines
from gateway.settings import Settings

if TYPE_CHECKING:
    import httpx

BATCH_BYTES = 512 * 1024
"""A batch stays under this many bytes of JSON (RDV_MAX_BODY_BYTES is 1 MiB by default)."""
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


class _Accepted(Expect):
    accepted: int
    relabelled: int


def read_items(path: Path, kind: str) -> list[dict[str, Any]]:
    """Every feedback item of the file, in order; exits naming the first line it cannot read."""
    items: list[dict[str, Any]] = []
    try:
        # utf-8-sig: a CSV saved by Excel starts with a byte-order mark
        with path.open(newline="" if kind == "csv" else None, encoding="utf-8-sig") as f:
            if kind == "jsonl":
                return [doc for _, doc in json_lines(path, f)]
            header, rows = csv_rows(path, f)
            if not header:  # an empty file: nothing to send, as an empty JSON lines file
                return []
            columns = set(header)
            if "request_id" not in columns or not columns & {"label", "correct"}:
                sys.exit(f"{path}: the header needs request_id and label (or correct)")
            for n, row in rows:
                items.append(_csv_item(path, n, row))
    except OSError as exc:
        sys.exit(f"cannot read {path}: {exc}")
    except UnicodeDecodeError as exc:
        sys.exit(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8")
    return items


def _csv_item(path: Path, n: int, row: dict[str, Any]) -> dict[str, Any]:
    if None in row or None in row.values():
        sys.exit(f"{path}:{n}: the row does not match the header")
    item: dict[str, Any] = {"request_id": row["request_id"]}
    try:
        label = (row.get("label") or "").strip()
        if label.startswith("["):  # one label per row of the request: a JSON list
            item["label"] = _label_list(label)
        elif label:  # a class, or its name (the gateway knows the model's class_names)
            item["label"] = _class(label) if label.lstrip("-").isdigit() else label
        if (row.get("correct") or "").strip():
            value = row["correct"].strip().lower()
            if value not in _TRUE | _FALSE:
                raise ValueError(f"correct {row['correct']!r} is not true or false")
            item["correct"] = value in _TRUE
        if (row.get("weight") or "").strip():
            item["weight"] = float(row["weight"])
    except ValueError as exc:
        sys.exit(f"{path}:{n}: {exc}")
    return item


MAX_CLASS_DIGITS = 19
"""A class is a 64-bit integer: Python's own words on a 5,000-digit one named its digit
limit and ``sys.set_int_max_str_digits`` (a helper's CLI probe)."""


def _class(cell: str) -> int:
    if len(cell.lstrip("-")) > MAX_CLASS_DIGITS:
        raise ValueError(f"label {cell[:24]}... ({len(cell)} characters) is no class: a class "
                         "is a 64-bit integer")  # fmt: skip
    return int(cell)


def _label_list(cell: str) -> list[int | str]:
    try:
        labels = json.loads(cell)
    except (ValueError, RecursionError):  # "[[[..." past json's nesting too
        labels = None
    if not isinstance(labels, list) or not all(type(v) in (int, str) for v in labels):
        shown = repr(cell if len(cell) <= 80 else cell[:80] + "...")  # a cell may be 128 KiB
        raise ValueError(f"label {shown} is not a class or a JSON list of classes (or names)")
    return labels


class Progress:
    """A bar on stderr, rewritten in place on a terminal, a line per batch otherwise."""

    WIDTH = 30

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        share = done / self.total if self.total else 1.0
        bar = "#" * int(share * self.WIDTH)
        text = f"feedback [{bar:<{self.WIDTH}}] {done}/{self.total} ({100 * share:.0f}%)"
        sys.stderr.write(f"\r{text}" if self.tty else f"{text}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _session(url: str | None) -> httpx.Client:
    import httpx

    settings = Settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    token = settings.feedback_token.get_secret_value() if settings.feedback_token else ""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url or settings.local_url, timeout=60, headers=headers)


def cmd_feedback(args: argparse.Namespace) -> None:
    path = Path(args.file)
    kind = args.format or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    items = read_items(path, kind)
    if not items:  # a day with no labels is no error, but say so: it may be the wrong file
        print(f"{path}: no labels in it; nothing sent", file=sys.stderr)
    started = time.monotonic()
    progress = Progress(len(items))
    accepted = relabelled = batches = 0
    route = f"/v1/deployments/{args.deployment}/feedback"
    import httpx

    skipped: list[str] = []
    done = 0  # items of the batches before, sent or skipped: the file's count, not accepted
    with _session(args.url) as http:
        batch: list[tuple[str, str]] = []  # (request id, the item's JSON)
        size = 0

        def post() -> httpx.Response:
            body = "[" + ",".join(text for _, text in batch) + "]"
            return http.post(route, content=body, headers={"content-type": "application/json"})

        def send() -> None:
            nonlocal batch, size, accepted, relabelled, batches, done
            which = f"batch {batches + 1} (items {done + 1}-{done + len(batch)})"
            done += len(batch)
            while True:
                try:
                    resp = send_patiently(post, "rdv feedback", args.retry_for, progress.tty)
                except httpx.TransportError as exc:
                    progress.close()
                    sys.exit(f"cannot reach the gateway at {shown_gateway(http.base_url)}: {exc}; "
                             f"{accepted} labels were accepted before it (sending them again "
                             "is safe)")  # fmt: skip
                unknown = _unknown_ids(resp) if args.skip_unknown else set()
                dropped = [rid for rid, _ in batch if rid in unknown]
                if not dropped:  # none to skip (or none of this batch's: refused as it is)
                    break
                skipped.extend(dropped)
                batch = [(rid, text) for rid, text in batch if rid not in unknown]
                if not batch:
                    break
            if batch:
                try:  # a --url that is not a gateway: its answer said, not a KeyError
                    doc = read_answer(resp, f"POST {route}", _Accepted)
                except AnswerFault as fault:
                    progress.close()
                    show_refusal(fault)
                    said = (f" refused: {fault.status}: {fault.text}" if fault.refusal
                            else f": {fault}")  # fmt: skip
                    sys.exit(f"{which}{said}; {accepted} labels were accepted before it")
                accepted += doc["accepted"]
                relabelled += doc["relabelled"]
            batches += 1
            batch, size = [], 0
            progress.update(accepted + len(skipped))

        for item in items:
            text = json.dumps(item, separators=(",", ":"))
            if batch and (len(batch) >= args.batch or size + len(text) > BATCH_BYTES):
                send()
            batch.append((str(item.get("request_id")), text))
            size += len(text) + 1
        if batch:
            send()
    progress.close()
    if skipped:
        print(f"{path}: {len(skipped)} labels skipped, their request ids unknown or expired "
              f"(the first: {skipped[0]!r})", file=sys.stderr)  # fmt: skip
    print(json.dumps({"deployment": args.deployment, "file": str(path), "accepted": accepted,
                      "relabelled": relabelled, "batches": batches,
                      **({"skipped_unknown": len(skipped)} if args.skip_unknown else {}),
                      "seconds": round(time.monotonic() - started, 3)}))  # fmt: skip


def _unknown_ids(resp: httpx.Response) -> set[str]:
    """The ids a 404 of the feedback route names unknown or expired (none for another answer,
    or a 404 of an unknown deployment)."""
    if resp.status_code != 404:
        return set()
    try:
        doc = resp.json()
    except ValueError:
        return set()
    listed = doc.get("unknown") if isinstance(doc, dict) else None
    return {rid for rid in listed if isinstance(rid, str)} if isinstance(listed, list) else set()


def add_feedback_command(sub: Any) -> None:
    p = sub.add_parser("feedback", help="send labels in bulk (CSV or JSON lines) to a gateway")
    p.add_argument("file", help="CSV (request_id,label[,weight] or correct) or JSON lines")
    p.add_argument("--deployment", required=True, type=deployment_name)
    add_url_argument(p)
    p.add_argument("--format", choices=["csv", "jsonl"], help="default: by the file's suffix")
    p.add_argument("--batch", type=whole_number(1), default=500,
                   help="items per call, at most the gateway's RDV_MAX_ROWS (it refuses "
                        "more with 413)")  # fmt: skip
    p.add_argument("--skip-unknown", action="store_true",
                   help="send the rest of a batch that names unknown or expired request ids "
                        "(counted in skipped_unknown) instead of stopping")  # fmt: skip
    add_retry_argument(p)
    p.set_defaults(func=cmd_feedback)
