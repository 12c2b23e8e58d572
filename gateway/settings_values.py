"""What a setting's value may be where pydantic's types cannot say it (a Redis URL redis-py
can use, a token an HTTP header can carry, an origin a browser can send), and the one line that
names each wrong value to the person starting a command, secrets hidden. Apart from
``gateway.settings`` so that the settings object stays a list of settings."""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, ValidationError
from pydantic_settings import SettingsError

from rendezvous.bus.urls import redacted, seed_urls

TOKEN = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
"""A bearer token: printable ASCII, spaces only inside."""

ORIGIN = re.compile(r"https?://[a-z0-9.-]+(?::[0-9]{1,5})?|\*")
"""An origin as a browser sends it (scheme, host, optional port; no path), or ``*``: any."""


def checked_redis_url(value: str) -> str:
    """``value`` if redis-py can connect to each node it names, else ValueError naming the
    fault: a bad scheme or port was a traceback after ``rdv serve`` had trained the demo."""
    from redis.connection import parse_url

    if "#" in value:  # read as a fragment: the rest of a password taken for host and port
        raise ValueError("a '#' in the URL: percent-encode it in a user or password (%23)")
    seeds = seed_urls(value)
    for seed in seeds:
        where = f"{redacted(seed)!r}: " if len(seeds) > 1 else ""
        parts = urlsplit(seed)
        try:
            found = parse_url(seed)  # ValueError naming the fault
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError:
            if "@" not in seed and "password=" not in seed.lower():
                raise
            # its words quote the URL's parts, which a password with a '/', '?' or '@' in it
            # spills into ("Port could not be cast to integer value as 'PwPart1'", a probe)
            raise ValueError(f"{where}cannot be read as redis://user:password@host:port/db: "
                             "percent-encode '/', '?', '#', '@' and ':' in a user or password "
                             "(%2F, %3F, %23, %40, %3A)") from None  # fmt: skip
        if parts.scheme in ("redis", "rediss") and "@" in parts.path:  # a '/' in the user
            raise ValueError(f"{where}an '@' after the host: percent-encode '/' and '@' in a "
                             "user or password (%2F, %40)")  # fmt: skip
        # what parse_url lets through, to fail at the first connection (after 11 s of
        # retries: "did not answer") or never (a database name read as 0); a helper's probe
        if "path" not in found and not found.get("host"):
            raise ValueError(f"{where}names no host")
        if found.get("port") == 0:
            raise ValueError(f"{where}port 0 is no Redis's")
        if "path" not in found and parts.path.strip("/") and "db" not in found:
            raise ValueError(f"{where}the database must be a number (/0)")
        if found.get("protocol") not in (None, 2, 3):
            raise ValueError(f"{where}protocol must be 2 or 3")
        _check_options(found, where)
    return value


def _check_options(found: dict[str, object], where: str) -> None:
    """A query option redis-py's connection does not take was a TypeError traceback at the
    first connection of every command (``?timeout=5``, ``?ssl_cert_reqs=none`` on
    ``redis://``: a helper's probe); ``decode_responses`` makes every reply text, which the
    gateway reads as bytes."""
    import inspect

    from redis.connection import Connection

    if found.get("decode_responses"):
        raise ValueError(f"{where}decode_responses: the gateway reads Redis's replies as bytes")
    cls = found.get("connection_class", Connection)
    taken = {
        name
        for klass in getattr(cls, "__mro__", ())
        if "__init__" in vars(klass)
        for name in inspect.signature(vars(klass)["__init__"]).parameters
    }
    for option in sorted(set(found) - taken - {"connection_class", "path"}):
        ssl = option.startswith("ssl") and cls is Connection
        raise ValueError(
            f"{where}the option {option!r} needs rediss://"
            if ssl
            else f"{where}unknown option {option!r} (redis-py's connection does not take it)"
        )


def checked_token(value: str) -> str:
    """A token travels in an HTTP header: printable ASCII only (a non-ASCII one was a
    traceback in every admin command, and no client could have sent it)."""
    if not value.strip():
        raise ValueError("empty: give a token, or leave the variable unset")
    if not TOKEN.fullmatch(value.strip()):
        raise ValueError("printable ASCII characters only (an HTTP header carries it)")
    return value


def normalised_origin(value: str) -> str:
    """``value`` as browsers write an origin (lower case, no trailing slash), or ValueError
    naming what is wrong: an origin that can never match would refuse every call silently."""
    origin = value.strip().lower().removesuffix("/")
    if not ORIGIN.fullmatch(origin):
        raise ValueError(
            f"{value!r} is not an origin: scheme://host[:port] with no path, e.g. "
            '"https://app.example.com", or "*" for any'
        )
    return origin


def checked_http_url(value: str) -> str:
    """An http(s) URL with a host, without a trailing slash, or ValueError: a webhook URL
    without a scheme failed only when the first alert was sent, ten minutes of retries later."""
    url = value.strip().removesuffix("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ValueError(f'{value!r} is not an http(s) URL, e.g. "https://host.example/path"')
    return url


HttpUrlText = Annotated[str, AfterValidator(checked_http_url)]
"""A setting's http(s) URL, kept as the text it was (``checked_http_url``)."""
OptionalHttpUrlText = Annotated[str, AfterValidator(lambda v: v.strip() and checked_http_url(v))]
"""The same, or empty: not set."""


class JointFault(ValueError):
    """Settings that are each valid but not together: the message names every one of them with
    its value, so the line says it alone (prefixed with the one field it was checked on, it
    read as that field's fault: ``RDV_FALLBACKS='["canary"]'`` for a deadline past the
    timeout)."""


def invalid_settings(exc: Exception) -> str | None:
    """One line naming each ``RDV_`` variable at fault, for a ``Settings()`` that failed (None
    for any other error): what a person starting a command should read, not a traceback."""
    if isinstance(exc, ValidationError):
        faults = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]] or ["?"]
            name = f"RDV_{loc[0].upper()}" + "".join(f"[{part}]" for part in loc[1:])
            message = str(error["msg"]).removeprefix("Value error, ")
            if isinstance(error.get("ctx", {}).get("error"), JointFault):
                faults.append(message)
                continue
            faults.append(f"{name}={_shown(error.get('input'), loc[0])}: {message}")
        return "invalid configuration: " + "; ".join(faults)
    if isinstance(exc, SettingsError):
        found = re.search(r'field "(\w+)"', str(exc))
        if found is None:
            return f"invalid configuration: {exc}"
        name = f"RDV_{found.group(1).upper()}"
        given = _shown(os.environ.get(name))
        return f"invalid configuration: {name}={given}: not valid JSON (see the README's table)"
    return None


def _shown(value: Any, field: str = "") -> str:
    if field.endswith("token"):  # a secret is not printed back, even a wrong one
        return "(hidden)"
    if field == "redis_url" and isinstance(value, str):
        value = redacted(value)  # nor the password a URL may hold
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text[:80])
