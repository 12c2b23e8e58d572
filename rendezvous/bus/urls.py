"""The Redis URL's parts that the processes share: the nodes it names, and the URL as a log may
show it (never its password)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit


def seed_urls(url: str) -> list[str]:
    """The nodes ``url`` names, one URL each. ``RDV_REDIS_URL`` may name several nodes of one
    cluster (``redis://user:password@host1:port1,host2:port2``), so that a process starting
    while one of them is down finds the cluster through another; each URL keeps the scheme,
    user, password, path and query."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return [url]
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return [f"{parts.scheme}://{userinfo}{at}{host}{tail}" for host in hosts.split(",") if host]


def redacted(url: str) -> str:
    """Never log a password that sits in the URL: the user information up to the last ``@``
    (a password may hold one, which redis-py takes: cut at the first, its tail was logged; a
    helper's probe), and a ``password`` or ``username`` in the query."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + "://" + _SECRET_OPTION.sub(r"\1\2=***", rest)


_SECRET_OPTION = re.compile(r"([?&])(password|username)=[^&]*", re.IGNORECASE)
