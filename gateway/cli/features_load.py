"""``rdv features load``: entity features in bulk from a CSV or JSON-lines file, through the
admin API's ``PUT /admin/deployments/{d}/entities``, in batches, with progress on stderr."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from gateway.cli.admin_http import (
    AnswerFault,
    Expect,
    admin_request,
    admin_session,
    read_answer,
    show_refusal,
)
from gateway.cli.faults import shown_gateway
from gateway.cli.patience import send_patiently
from gateway.cli.records import csv_rows, json_lines
from rendezvous.spec import decimal_number, float32_number


class _Lookup(Expect):
    key: str


class _Spec(Expect):
    lookup: _Lookup | None = None


class _Deployment(Expect):
    """What the command reads of ``GET /admin/deployments/{d}``: the lookup, if any, and its
    key."""

    feature_spec: _Spec


class _Loaded(Expect):
    loaded: int


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
    import httpx

    with admin_session(args) as http:
        dep = admin_request(
            args,
            "GET",
            f"/deployments/{args.deployment}",
            http=http,
            show=False,
            expect=_Deployment,
            retry_for=args.retry_for,
        )  # a 503 ended it at once (a probe)
        lookup = dep["feature_spec"].get("lookup")
        if not lookup:
            sys.exit(
                f"deployment {args.deployment} looks nothing up: declare its lookup first "
                f"(PATCH /admin/deployments/{args.deployment}/enrichment)"
            )
        total, entities = _counted(path, kind, lookup["key"])
        if not total:
            print(f"{path}: no entities in it; nothing sent", file=sys.stderr)
        progress = _Progress(total)
        batch: list[tuple[int, str]] = []
        size = 0
        loaded = batches = 0

        def send() -> None:
            nonlocal batch, size, loaded, batches
            body = "[" + ",".join(text for _, text in batch) + "]"
            path = f"/admin/deployments/{args.deployment}/entities"

            def put() -> httpx.Response:
                return http.put(path, content=body, headers={"content-type": "application/json"})

            try:  # a PUT sets values: sent again, no harm
                resp = send_patiently(put, "rdv features load", args.retry_for, progress.tty)
            except httpx.TransportError as exc:
                progress.close()
                sys.exit(f"cannot reach the gateway at {shown_gateway(http.base_url)}: {exc}; "
                         f"{loaded} rows were loaded before it (a load again is safe)")  # fmt: skip
            try:  # a web page answering 200 counted its batch as loaded
                read_answer(resp, f"PUT {path}", _Loaded)
            except AnswerFault as fault:
                progress.close()
                _refused(fault, [line for line, _ in batch], loaded)
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
                      "entities": entities, "batches": batches,
                      "seconds": seconds}))  # fmt: skip


def _counted(path: Path, kind: str, key: str) -> tuple[int, int]:
    """(rows, distinct entities) of the file, read whole once before anything is sent; rows
    that name an entity an earlier row named are said on stderr (the later values are the
    ones stored: a file of updates in order is fine, a file joined twice by mistake is not)."""
    first_line: dict[str, int] = {}
    again: list[tuple[str, int, int]] = []
    rows = 0
    for n, row in _records(path, kind, key):
        rows += 1
        entity = str(row[key])
        if entity in first_line:
            again.append((entity, first_line[entity], n))
        else:
            first_line[entity] = n
    if again:
        entity, first, later = again[0]
        print(f"{path}: {len(again)} rows name an entity an earlier row named (the first: "
              f"{key} {entity[:80]!r}, lines {first} and {later}); the later values are "
              "stored", file=sys.stderr)  # fmt: skip
    return rows, len(first_line)


def _records(path: Path, kind: str, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, entity) of each record of the file; exits on one that cannot be read or
    holds a value the gateway would refuse (no finite float32 number), so that a bad file
    sends nothing. A UTF-8 byte-order mark (a spreadsheet's CSV) is skipped."""
    try:
        with path.open(newline="" if kind == "csv" else None, encoding="utf-8-sig") as f:
            if kind == "jsonl":
                for n, doc in json_lines(path, f):
                    if not isinstance(doc.get(key), str):  # the gateway said "None" or "5"
                        what = "no" if key not in doc else f"{doc[key]!r}, not text, as"
                        sys.exit(f"{path}:{n}: {what} {key!r} (the lookup's key)")
                    for column, value in doc.items():
                        if column != key and not float32_number(value):
                            sys.exit(f"{path}:{n}: {column} {value!r} is not a finite "
                                     "float32 number")  # fmt: skip
                    yield n, doc
                return
            header, rows = csv_rows(path, f)
            if not header:  # an empty file: nothing to load, as an empty JSON lines file
                return
            if key not in header:
                sys.exit(f"{path}: no column {key!r} (the lookup's key) in the header")
            twice = sorted({column for column in header if header.count(column) > 1})
            if twice:  # the reader keeps the last of them: a value would go unseen
                sys.exit(f"{path}: column {twice[0]!r} appears more than once in the header")
            for n, row in rows:
                entity: dict[str, Any] = {}
                for column, value in row.items():
                    if column is None or value is None:
                        sys.exit(f"{path}:{n}: the row does not match the header")
                    if column == key:
                        entity[column] = value
                    elif value.strip():
                        number = decimal_number(value)
                        entity[column] = value if math.isnan(number) else number
                        if not float32_number(entity[column]):
                            sys.exit(f"{path}:{n}: {column} {value!r} is not a finite "
                                     "float32 number")  # fmt: skip
                yield n, entity
    except OSError as exc:
        sys.exit(f"cannot read {path}: {exc}")
    except UnicodeDecodeError as exc:
        sys.exit(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8")


def _refused(fault: AnswerFault, lines: list[int], loaded: int) -> NoReturn:
    """Exit naming the batch's lines: the gateway's refusal (its faults on stderr, each with
    the file's line of its row), or the answer that was no gateway's."""
    body = fault.body
    for error in body.get("errors", []) if isinstance(body, dict) else []:
        row = error.get("row") if isinstance(error, dict) else None
        if type(row) is int and 0 <= row < len(lines):
            error["line"] = lines[row]
    show_refusal(fault)
    which = f"batch of lines {lines[0]}-{lines[-1]}"
    said = f" refused ({fault.status}: {fault.text})" if fault.refusal else f": {fault}"
    sys.exit(f"{which}{said}; {loaded} rows were loaded before it")


class _Progress:
    """``loaded N/T rows (P%)`` on stderr, rewritten in place on a terminal, a line per batch
    otherwise (a log). Rows, not entities: a file may name an entity twice (4/4 said
    "entities" for 3)."""

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, loaded: int) -> None:
        share = f" ({100 * loaded // self.total}%)" if self.total else ""
        text = f"features load: {loaded}/{self.total} rows{share}"
        sys.stderr.write(f"\r{text}" if self.tty else f"{text}\n")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
        self.shown = False
