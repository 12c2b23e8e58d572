"""The predict URL, as the ASGI handler and the connection-level protocol match it: built from
``rendezvous.names.NAME_RE`` so that a deployment name means the same thing in a URL and in a
Redis key. Kept apart from the handler so that uvicorn's supervising process, which imports the
protocol, stays small."""

from __future__ import annotations

import re

from rendezvous.names import NAME_RE

PREDICT_PATH = re.compile(rf"^/v1/deployments/({NAME_RE})/predict$")
"""A predict path (ASGI: decoded, no query string)."""

PREDICT_TARGET = re.compile(rb"^/v1/deployments/(" + NAME_RE.encode() + rb")/predict(?:\?[^#]*)?$")
"""A predict request target as it arrives on the connection (a query string allowed)."""
