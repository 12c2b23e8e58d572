"""The admin API over HTTP for the ``rdv`` commands: a session on the gateway with the admin
token and the actor, one call that prints the JSON answer or exits with the server's
``detail``, and ``read_answer``, where every answer a command gets from a gateway is read
(also the feedback route's): a ``--url`` that answers but is no gateway (a web page, a proxy's
redirect, JSON of another shape) is one line saying so, not a ``KeyError`` deep in a command."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.cli.faults import shown_gateway
from gateway.settings import Settings

if TYPE_CHECKING:
    import httpx

_TIMEOUT_S = 60.0
SHOWN_CHARS = 200
"""What a one-line error shows of an answer's text or JSON at most: enough to recognise it."""


class Expect(BaseModel):
    """What a command reads of a JSON answer, as a model of those fields alone (every other
    field passes): a subclass names them, strictly typed (a whole number is never ``"1"`` or
    ``true``)."""

    model_config = ConfigDict(extra="allow", strict=True)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    who = f"{user}@{socket.gethostname()}"
    # what the gateway takes as an actor (printable ASCII), whatever the login's name
    return "".join(c if " " <= c <= "~" else "?" for c in who)[:128]


def admin_session(args: argparse.Namespace) -> httpx.Client:
    """An HTTP client on the gateway, with the admin token and the actor."""
    import httpx

    settings = Settings()
    url = args.url or settings.local_url
    headers = {"X-Actor": _actor()}
    token = settings.admin_token.get_secret_value().strip() if settings.admin_token else ""
    if token:
        headers["Authorization"] = f"Bearer {token}"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    return httpx.Client(base_url=url, timeout=_TIMEOUT_S, headers=headers)


class AnswerFault(Exception):
    """An answer the command cannot take: a refusal (``refusal``: the gateway's JSON, ``body``,
    with its ``detail`` as ``text``), or an answer that is not a gateway's (``text`` says
    what it is). Its ``str`` is the one line to exit with."""

    def __init__(self, call: str, status: int, text: str, *, refusal: bool, body: Any = None):
        super().__init__(call, status, text)
        self.call, self.status, self.text = call, status, text
        self.refusal, self.body = refusal, body

    def __str__(self) -> str:
        if self.refusal:
            return f"{self.call} -> {self.status}: {self.text}"
        return f"{self.call} -> {self.status} but the answer is not a gateway's JSON: {self.text}"


def read_answer(resp: httpx.Response, call: str, expect: type[Expect] | None = None) -> Any:
    """The JSON of a 2xx answer to ``call`` (``"POST /admin/models"``), of the shape the
    caller ``expect``s (without it, an object or a list, as every gateway route answers);
    raises ``AnswerFault`` for a refusal or for an answer no gateway gives."""
    status = resp.status_code
    if 300 <= status < 400:  # a proxy's login page, http to https: nothing a gateway sends
        where = resp.headers.get("location")
        text = f"a redirect to {_excerpt(where)}" if where else "a redirect"
        raise AnswerFault(call, status, text, refusal=False)
    try:
        body = json.loads(resp.content)
    except RecursionError:
        raise AnswerFault(call, status, "nested too deeply", refusal=False) from None
    except ValueError:  # not UTF-8 either
        raise AnswerFault(call, status, _not_json(resp), refusal=False) from None
    if status >= 400:
        raise AnswerFault(call, status, _refusal_text(body), refusal=True, body=body)
    fault = _shape_fault(body, expect)
    if fault is not None:
        raise AnswerFault(call, status, fault, refusal=False)
    return body


def show_refusal(fault: AnswerFault) -> None:
    """The whole of a refusal's JSON on stderr (a promotion's gate figures, the unknown ids of
    feedback), before the one line that ends the command."""
    if fault.body is None:
        return
    try:
        print(json.dumps(fault.body, indent=2), file=sys.stderr)
    except (RecursionError, ValueError):
        print(compact_json(fault.body), file=sys.stderr)


def _not_json(resp: httpx.Response) -> str:
    if not resp.content:
        return "an empty body"
    kind = resp.headers.get("content-type", "no content-type").split(";")[0].strip()
    text = resp.content[: SHOWN_CHARS * 4].decode("utf-8", "replace")
    return f"{_excerpt(kind)} {_excerpt(' '.join(text.split()))!r}"


def _shape_fault(body: Any, expect: type[Expect] | None) -> str | None:
    """What is wrong with ``body`` for a caller that ``expect``s a shape, or None."""
    if expect is None:
        if isinstance(body, dict | list):
            return None
        return f"{_kind(body)}, not an object or a list: {compact_json(body)}"
    if not isinstance(body, dict):
        return f"{_kind(body)}, not an object"
    try:
        expect.model_validate(body)
    except ValidationError as exc:
        from gateway.problems import fault_text

        return f"{fault_text(exc.errors(include_url=False))}: {compact_json(body)}"
    return None


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "text", bool: "true or false",
             type(None): "null"}  # fmt: skip
    return kinds.get(type(value), "a number")


def _refusal_text(body: Any) -> str:
    """A refusal's ``detail`` as one line: text as it is, FastAPI's faults (``loc``, ``msg``)
    as ``version: Field required``, anything else as compact JSON; a body without ``detail``
    as compact JSON."""
    if not isinstance(body, dict) or "detail" not in body:
        return compact_json(body)
    detail = body["detail"]
    if isinstance(detail, str):
        return detail
    faults = detail if isinstance(detail, list) else [detail]
    if faults and all(
        isinstance(f, str) or (isinstance(f, dict) and isinstance(f.get("msg"), str))
        for f in faults
    ):
        from gateway.problems import fault_text

        return fault_text(detail)
    return compact_json(detail)


def compact_json(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``value`` as JSON on one line, cut to ``limit`` characters (``...`` where cut)."""
    try:
        text = json.dumps(value, separators=(",", ":"))
    except (RecursionError, ValueError):
        return "(JSON nested too deeply to show)"
    return _excerpt(text, limit)


def _excerpt(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def admin_request(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    http: httpx.Client | None = None,
    show: bool = True,
    expect: type[Expect] | None = None,
    retry_for: float = 0.0,
    **kw: Any,
) -> Any:
    """One admin call: the JSON answer (printed unless ``show`` is false; of the shape
    ``read_answer`` is told to ``expect``), or exit with the server's ``detail``, or saying
    that what answered is not a gateway. ``http``: a session to reuse (else one for this
    call). ``retry_for``: a call safe to send again is, through a 429, a 503 or a gateway out
    of reach, for that many seconds (``gateway.cli.patience``)."""
    import httpx

    from gateway.cli.patience import send_patiently

    session = http or admin_session(args)
    try:
        resp = send_patiently(lambda: session.request(method, f"/admin{path}", **kw),
                              f"rdv {args.command}", retry_for)  # fmt: skip
    except httpx.HTTPError as exc:
        sys.exit(f"cannot reach the gateway at {shown_gateway(session.base_url)}: {exc}")
    finally:
        if http is None:
            session.close()
    try:
        body = read_answer(resp, f"{method} /admin{path}", expect)
    except AnswerFault as fault:
        show_refusal(fault)
        sys.exit(str(fault))
    if show:
        print(json.dumps(body, indent=2))
    return body


def without_none(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}
