"""An input-stream entry as the log bin archives it: one JSON line. An entry that decodes is
archived as the models saw it (``record_from_envelope``); one that does not is archived all
the same, its fields kept as base64 with the reason, so that nothing the gateway accepted is
lost from the archive for being malformed."""

from __future__ import annotations

import base64
import json
import logging

from models.archive import record_from_envelope
from rendezvous.envelope import RequestEnvelope

log = logging.getLogger(__name__)


def archive_line(
    dep: str,
    stream_id: str,
    fields: dict[bytes, bytes],
    archived_ms: float,
    stream: str = "",
) -> tuple[str, RequestEnvelope | None]:
    """The entry's archive line, and its envelope if it decoded (else the line keeps its
    fields). ``stream``: the partition's stream, for a deployment with several."""
    if not fields:
        error = "entry was deleted from the stream before it was archived"
    else:
        try:
            env = RequestEnvelope.decode(fields)
            return record_from_envelope(stream_id, env, archived_ms, stream), env
        except Exception as exc:  # any malformed entry is archived as such, never fatal
            error = f"{type(exc).__name__}: {exc}"
    log.warning("logbin: %s entry %s undecodable: %s", dep, stream_id, error)
    record = {
        "stream_id": stream_id,
        **({"stream": stream} if stream else {}),
        "deployment": dep,
        "undecodable": True,
        "error": error,
        "archived_ms": archived_ms,
        "fields_b64": {
            text(k): base64.b64encode(v if isinstance(v, bytes) else str(v).encode()).decode()
            for k, v in fields.items()
        },
    }
    return json.dumps(record, separators=(",", ":")), None


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
