"""The one way the gateway builds an error answer.

Every refusal, whichever layer finds it (the data plane, the body cap, the admin plane), is a
``Problem``: a status, what is wrong, and the headers that go with it. It is rendered as
``{"detail": ...}`` on ``/v1`` and ``/admin`` and as ``{"error": ...}`` on the Open Inference
Protocol routes, as bytes for the transports that write the connection themselves or as a
Starlette response for the framework's routes.
"""

from __future__ import annotations

import codecs
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from starlette.responses import JSONResponse

RETRY = {"Retry-After": "1"}
"""Sent with every 429 and 503: the refusal is momentary."""

BOM_FAULT = ("the body begins with a UTF-8 byte order mark (EF BB BF), which JSON sent over a "
             "network must not carry (RFC 8259): send the JSON without it")  # fmt: skip
"""Some Windows tools write one (PowerShell's UTF8 encoding, .NET's default): the parser's
own words, "expected value at line 1 column 1", did not say what was wrong."""


EMPTY_FAULT = ("the body is empty: send the JSON this route takes (a request with neither "
               "Content-Length nor Transfer-Encoding carries no body)")  # fmt: skip
"""A request without either header has a body of length 0 (RFC 9112, 6.3), as one with
``Content-Length: 0`` or an empty chunked body has: the same words for all three."""


def encoding_fault(raw: bytes | str, what: str = "the body") -> tuple[str, str] | None:
    """(kind, words) for a body that is no JSON text at all, whatever its parser said: none
    (``missing``: empty or blank), a byte order mark (``json_invalid``), or bytes that are not
    UTF-8 (``utf8``: a UTF-16 body, a compressed one); None for UTF-8 without a mark."""
    if not raw or raw.isspace():  # the parser said "EOF while parsing a value"
        return "missing", EMPTY_FAULT if what == "the body" else f"{what} is empty: send JSON"
    if isinstance(raw, str) or raw.isascii():  # no copy of a large ASCII body
        return None
    if raw.startswith(codecs.BOM_UTF8):
        return "json_invalid", BOM_FAULT.replace("the body", what)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return "utf8", f"{what} is not UTF-8: {bad.reason} at byte {bad.start}"
    return None


def not_json(raw: bytes | str, error: BaseException | None, what: str = "the body") -> str:
    """Why ``raw`` did not parse as JSON, in words a caller can act on: its encoding
    (``encoding_fault``), a nesting or a number beyond the parser's bounds; else the parser's
    own ``error``."""
    fault = encoding_fault(raw, what)
    if fault is not None:
        return fault[1]
    if isinstance(error, RecursionError):
        return f"{what} is not JSON this gateway reads: it nests arrays or objects too deeply"
    if isinstance(error, ValueError) and "digits" in str(error):
        return f"{what} is not JSON this gateway reads: an integer of more than 4300 digits"
    return f"{what} is not JSON: {error}"


class AsciiJSONResponse(JSONResponse):
    """JSON with every character beyond ASCII escaped (``\\u00e9``), as the JSON the gateway
    writes itself: a lone surrogate a caller sent (``"\\ud800"``, which JSON allows and
    Python keeps) cannot be encoded as UTF-8, and Starlette's own rendering raised on it, a 500
    wherever an answer echoed the caller's text (a 422 naming the input, a reason in an admin
    change's history; found by a helper's fuzzing)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


class Style(Enum):
    DETAIL = "detail"
    """``{"detail": ...}``: the routes under ``/v1`` and ``/admin`` (FastAPI's own shape)."""
    ERROR = "error"
    """``{"error": "..."}``: the Open Inference Protocol's shape."""


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    detail: Any
    """What is wrong: a sentence, or (for a 422) the list of fields at fault."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """More members of the body (for example the request id of a 504)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    close: bool = False
    """The connection cannot be reused (a body left unread)."""

    def document(self, style: Style = Style.DETAIL) -> dict[str, Any]:
        if style is Style.ERROR:
            text = self.detail if isinstance(self.detail, str) else json.dumps(self.detail)
            return {"error": text, **self.extra}
        return {"detail": self.detail, **self.extra}

    def body(self, style: Style = Style.DETAIL) -> bytes:
        return json.dumps(self.document(style), separators=(",", ":")).encode()

    def all_headers(self) -> dict[str, str]:
        return {**self.headers, "Connection": "close"} if self.close else dict(self.headers)

    def reply(self, style: Style = Style.DETAIL) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, JSON body, headers besides content-type and content-length), for the
        transports that write the connection themselves."""
        headers = [(k.lower().encode(), v.encode()) for k, v in self.all_headers().items()]
        return self.status, self.body(style), headers

    def response(self, style: Style = Style.DETAIL) -> JSONResponse:
        return AsciiJSONResponse(
            self.document(style), status_code=self.status, headers=self.all_headers() or None
        )


def too_large(limit: int) -> Problem:
    return Problem(413, f"request body larger than {limit} bytes", close=True)


def bad_length() -> Problem:
    return Problem(400, "invalid Content-Length header", close=True)


def compressed(encoding: bytes | str) -> Problem | None:
    """A body in a ``Content-Encoding`` other than identity: 415, which names it (it read as
    a 422 "not UTF-8" on the predict route); None for an uncompressed one."""
    name = (encoding.decode("latin-1") if isinstance(encoding, bytes) else encoding).strip()
    if name.lower() in ("", "identity"):
        return None
    return Problem(415, f"Content-Encoding {name[:20]!r} is not taken: send the body uncompressed")


def unavailable(detail: str) -> Problem:
    return Problem(503, detail, headers=RETRY)


def bearer_refusal(
    authorizations: list[str], token: bytes, what: str, setting: str
) -> Problem | None:
    """None when the one ``Authorization`` header is ``Bearer <token>`` (compared in constant
    time; what was given is never logged), else 401 (none given), 403 (a wrong one) or 400
    (two or more: which one counts would be the server's guess), naming ``setting``."""
    if len(authorizations) > 1:
        return Problem(400, f"send one Authorization header, not {len(authorizations)}")
    scheme, _, given = (authorizations[0] if authorizations else "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return Problem(401, f"{what} routes need 'Authorization: Bearer <{setting}>'",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if not hmac.compare_digest(given.strip().encode(), token):
        return Problem(403, f"wrong {what} token")
    return None


def fault_text(detail: Any) -> str:
    """A 422's list of faults (FastAPI's) as one line: ``inputs[0].datatype: ...; ...``, for
    the Open Inference Protocol's ``{"error"}`` and the command line."""
    if isinstance(detail, str):
        return detail
    parts = []
    for fault in detail if isinstance(detail, list) else [detail]:
        if not isinstance(fault, dict):
            parts.append(str(fault))
            continue
        loc = list(fault.get("loc") or ())
        if loc[:1] == ["body"]:
            loc = loc[1:]
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        parts.append(f"{path}: {fault.get('msg')}" if path else str(fault.get("msg")))
    return "; ".join(parts)
