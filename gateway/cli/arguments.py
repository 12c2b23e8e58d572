"""Argument types of the ``rdv`` commands: a value that cannot be right is a usage error
naming the flag (status 2), before anything is read, sent or started.

Names go into admin URLs: a deployment named ``../models/m1/2`` was sent as a path that
httpx resolved to another route (a model deleted by ``rdv deployments delete``), so every
name is checked against the rules the gateway applies (``rendezvous.names``) here first.
"""

from __future__ import annotations

import argparse
import math
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from rendezvous import names


def usage_error(message: str) -> NoReturn:
    """A usage error found after parsing (flags that need each other): one line and status 2,
    as argparse's own (they were status 1; a helper's CLI probe)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check(text)
        except names.InvalidName as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


deployment_name = _checked(lambda text: names.check_name(text, "deployment"))
model_name = _checked(lambda text: names.check_name(text, "model"))
role_name = _checked(names.check_role)
replay_id = _checked(names.check_replay_id)


def consumer_name(text: str) -> str:
    """A consumer in a group: letters, digits, '.', '_' or '-' (a hostname fits)."""
    if not names.INSTANCE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid consumer {text[:80]!r}: 1-64 letters, digits, '.', '_' or '-'"
        )
    return text


def whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[least, most]`` (-5 reached Redis and ended in a traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{value} is more than {most}")
        return value

    return parse


def folder(text: str) -> Path:
    """A folder's path; an empty one is refused (``Path("")`` is the working folder, where a
    templated ``--data-dir ''`` put models, the archive and Redis's files)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name a folder")
    return Path(text)


def finite_number(text: str) -> float:
    """A finite number (``nan`` and ``inf`` parse as floats, and JSON has neither)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seconds(text: str) -> float:
    """A duration in seconds, 0 to a day."""
    value = finite_number(text)
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 86400 seconds")
    return value


def role_share(text: str) -> tuple[str, float]:
    """``ROLE=FRACTION`` of an A/B split."""
    role, sep, share = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write ROLE=FRACTION, e.g. ab=0.1")
    return role_name(role.strip()), finite_number(share.strip())


port_number = whole_number(0, 65535)


def gateway_url(text: str) -> str:
    """An http(s) base URL with a host and a port in range (``:99999`` was tried, and said
    "connection refused")."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port  # raises on a port out of range or not a number
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text[:200]!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text[:200]!r} is not a gateway URL: write http://HOST:PORT"
        )
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text[:200]!r}: port 0 is no gateway's")
    return text.strip()


def add_url_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", type=gateway_url,
                   help="gateway base URL (default http://RDV_HOST:RDV_PORT)")  # fmt: skip
