"""``rdv archive export``: a slice of the archive to Parquet or CSV, for retraining.

Runs where the archive is (``--data-dir``) with Redis at hand (``RDV_REDIS_URL``, or the
``rdv serve`` of that data folder): the deployment's feature names, the outputs of the
decision records still kept, and the labels come from there. Prints the file's metadata,
with the stream positions it covers; ``--positions`` takes them back to export the same slice.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.arguments import usage_error
from gateway.cli.patience import ride_out
from gateway.cli.process import require_archive, require_redis
from gateway.cli.records import LINE_LIMIT
from gateway.settings import Settings

if TYPE_CHECKING:
    from models.archive import ArchiveReader
    from models.deployment_store import DeploymentStore
    from models.deployments import ModelRef
    from models.registry import ModelRegistry


def _positions_arg(value: str) -> Any:
    """JSON, or ``@FILE`` holding JSON (an export's ``.meta.json`` or a replay report: their
    ``positions`` are taken)."""
    flag = f"rdv archive export: --positions {_shown(value)}"
    try:
        text = _read_positions(Path(value[1:])) if value.startswith("@") else value
        doc = json.loads(text)
    except OSError as exc:
        sys.exit(f"{flag}: cannot read: {exc.strerror or exc}")
    except RecursionError:  # json's own message named no flag
        sys.exit(f"{flag}: not JSON: nested too deeply")
    except ValueError as exc:  # not UTF-8 either
        sys.exit(f"{flag}: not JSON: {exc}")
    if isinstance(doc, dict) and isinstance(doc.get("positions"), dict):
        return doc["positions"]
    return doc


def _read_positions(path: Path) -> str:
    """The file's text, up to ``LINE_LIMIT`` bytes (a replay report is some kilobytes; a
    ``/dev/zero`` was read for ever)."""
    with path.open("rb") as f:
        raw = f.read(LINE_LIMIT + 1)
    if len(raw) > LINE_LIMIT:
        raise ValueError(f"longer than {LINE_LIMIT} bytes")
    return raw.decode()


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:80] + "...")  # a JSON may be long


def cmd_export(args: argparse.Namespace, settings: Settings) -> None:
    """Export a slice; every flag is checked (``--positions`` read) before Redis is asked."""
    from models.archive import ArchiveReader
    from models.archive_frontier import (
        OPEN_TO_MARGIN_MS,
        archived_until_ms,
        last_archived_ms,
        open_to_ms,
    )
    from models.archive_slice import SliceError, parse_time, positions_from, resolve
    from models.deployment_store import DeploymentStore
    from models.deployments import DeploymentNotFound, DeploymentUnreadable
    from models.export import Exporter, iso_ms
    from models.registry import ModelNotFound, ModelRegistry
    from rendezvous.bus.connection import connect

    if not args.deployment or not args.out:
        usage_error("rdv archive export: --deployment and --out are required")
    out = Path(args.out)
    fmt = args.format or ("csv" if out.suffix.lower() == ".csv" else "parquet")
    if not out.parent.is_dir():  # said before any work, not as a traceback after it
        sys.exit(f"rdv archive export: --out {args.out}: no folder {out.parent}")
    for written in (out, Path(f"{out}.meta.json") if fmt == "csv" else out):
        if written.is_dir():  # found after the export's work, a CSV left without its metadata
            sys.exit(f"rdv archive export: --out {args.out}: {written} is a folder")
    if args.positions is not None and (args.from_ or args.to):
        usage_error("rdv archive export: give --positions, or --from/--to: not both")
    given = None if args.positions is None else _positions_arg(args.positions)
    require_archive(settings, "rdv archive export")
    client = connect(require_redis(settings), wait_s=5)

    def ride(read: Callable[[], Any]) -> Any:  # every Redis read, through a failover
        return ride_out(read, "rdv archive export")

    registry = ModelRegistry(settings.models_dir)
    store = DeploymentStore(client)
    reader = ArchiveReader(settings.archive_dir)
    real: ModelRef | None
    try:
        dep = ride(lambda: store.get(args.deployment))
        feature_names, streams = dep.feature_spec.names, dep.input_streams
        real = dep.roles["real"]
        lookup = dep.feature_spec.lookup
        entity_key = lookup.key if lookup is not None else None
    except DeploymentNotFound as exc:  # deleted and purged: its archive stays, and history
        feature_names, real, entity_key = _as_last_served(store, registry, reader,
                                                          args.deployment, exc)  # fmt: skip
        streams = []  # purged only once all of it was archived
    except (DeploymentUnreadable, ValueError) as exc:
        sys.exit(f"rdv archive export: {exc}")
    try:
        classes = registry.meta(real.name, real.version).classes if real else []
    except ModelNotFound:
        classes = []
    request: dict[str, Any]
    try:
        if args.positions is not None:
            positions = positions_from(given, args.deployment, empty_ok=True)
            request = {"positions": True}
        else:
            from_ms = parse_time(args.from_, "--from") if args.from_ else None
            now_ms = time.time() * 1000
            asked_ms = parse_time(args.to, "--to") if args.to else open_to_ms(now_ms)
            if from_ms is not None and from_ms > asked_ms:
                sys.exit(f"rdv archive export: --from {args.from_} is after --to "
                         f"{args.to or 'now'}")  # fmt: skip
            until_ms = ride(lambda: archived_until_ms(client, streams))
            future = until_ms is None and asked_ms > open_to_ms(now_ms)
            if future:  # complete until now, and requests of the --to's times are still to come
                until_ms = now_ms
            to_ms = last_archived_ms(until_ms, asked_ms, OPEN_TO_MARGIN_MS)
            # cut short: ended before the --to's millisecond (whose fraction is in it: a
            # fractional --to read as cut, "from None on"; a helper's CLI probe)
            cut = to_ms < math.floor(asked_ms)
            if cut and args.to:  # an open --to ends where the archive does
                print(f"rdv archive export: --to {args.to} is still to come" if future else
                      f"rdv archive export: the log bin has yet to archive requests from "
                      f"{iso_ms(until_ms)} on", end="", file=sys.stderr)  # fmt: skip
                print(f": the slice ends at {iso_ms(to_ms)} (its to_ms); export from there "
                      "later for the rest", file=sys.stderr)  # fmt: skip
            if from_ms is not None and to_ms < from_ms:  # the archive has not reached it yet:
                to_ms = math.floor(from_ms) - 1  # an empty slice, and the next starts there
                positions = {}
            else:
                positions = resolve(reader, args.deployment, from_ms=from_ms, to_ms=to_ms)
            request = {"from_ms": from_ms, "to_ms": to_ms}
            if cut:
                request |= {"asked_to_ms": asked_ms, "archived_until_ms": until_ms}
    except SliceError as exc:
        sys.exit(f"rdv archive export: {exc}")
    retention_s = settings.feedback_retention_s  # 0: feedback off, no label ever stored
    since_ms = time.time() * 1000 - retention_s * 1000 if retention_s else None
    exporter = Exporter(client, reader, args.deployment, feature_names, classes, entity_key,
                        labels_since_ms=since_ms, ride=ride)  # fmt: skip
    try:
        doc = exporter.export(positions, out, fmt, {"request": request, "file": str(out)})
    except OSError as exc:  # not writable, the disk full (the file at fault: its .meta.json?)
        sys.exit(f"rdv archive export: cannot write {exc.filename or out}: "
                 f"{exc.strerror or exc}")  # fmt: skip
    print(json.dumps(doc, indent=2))
    if doc["rows"] == 0:
        print("rdv archive export: no archived records in that slice", file=sys.stderr)
    elif doc["rows_past_label_retention"]:
        print(f"rdv archive export: {doc['rows_past_label_retention']} rows are of requests "
              f"older than RDV_FEEDBACK_RETENTION_S ({settings.feedback_retention_s:g} s): "
              "their labels, if any were sent, are gone from Redis (label empty); export "
              "within the retention to keep them", file=sys.stderr)  # fmt: skip


def _as_last_served(
    store: DeploymentStore,
    registry: ModelRegistry,
    reader: ArchiveReader,
    name: str,
    gone: Exception,
) -> tuple[tuple[str, ...], ModelRef | None, str | None]:
    """The feature names, real model and entity key (None: none) of a deployment deleted and
    purged, which took its state: the names from the real model its history last kept, and
    from the registry (else ``feature_0`` ... as wide as its archived rows, said on stderr);
    entity columns when its archived requests say what was looked up. An export of its
    archive was refused, though the archive stays for this (a helper's probe)."""
    from models.deployments import ModelRef
    from models.registry import ModelNotFound

    first = next((r for r in reader.records(name) if r.get("features")), None)
    if first is None:
        sys.exit(f"rdv archive export: {gone}, and no request of it is archived")
    entity_key = "entity" if first.get("looked_up") is not None else None
    real = None
    for entry in reversed(store.history(name)):
        held = entry.get("roles", {}).get("real")
        if entry.get("applied", True) and held:
            real = ModelRef.from_dict(held)
            break
    if real is not None:
        try:
            return registry.meta(real.name, real.version).feature_spec.names, real, entity_key
        except ModelNotFound:
            pass
    width = len(first["features"][0])
    print(f"rdv archive export: {gone}, and its real model ({real or 'not in its history'}) "
          f"is not in the registry: its {width} features are named feature_0 ...",
          file=sys.stderr)  # fmt: skip
    return tuple(f"feature_{i}" for i in range(width)), real, entity_key


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_", metavar="T",
                   help="export: ISO-8601 or epoch ms (inclusive)")  # fmt: skip
    p.add_argument("--to", metavar="T",
                   help="export: ISO-8601 or epoch ms (inclusive; default now)")  # fmt: skip
    p.add_argument("--positions", help="export: the stream positions to take again (JSON, or "
                   "@FILE of an export's .meta.json or a replay report)")  # fmt: skip
    p.add_argument("--format", choices=["parquet", "csv"],
                   help="export: default by --out's suffix (.csv: CSV), else Parquet")  # fmt: skip
    p.add_argument("--out", help="export: the file to write")
