"""The admin API over HTTP for the ``rdv`` commands: a session on the gateway with the admin
token and the actor, and one call that prints the JSON answer or exits with the server's
``detail``."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

from gateway.settings import Settings

if TYPE_CHECKING:
    import httpx

_TIMEOUT_S = 60.0


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
    if resp.status_code >= 300:  # a redirect too: the path named no route (an empty name)
        from gateway.problems import fault_text

        print(json.dumps(body, indent=2), file=sys.stderr)
        detail = body.get("detail") if isinstance(body, dict) else body
        sys.exit(f"{method} /admin{path} -> {resp.status_code}: {fault_text(detail)}")
    if show:
        print(json.dumps(body, indent=2))
    return body


def without_none(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}
