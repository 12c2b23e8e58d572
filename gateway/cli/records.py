"""Record files of the bulk commands (``rdv features load``, ``rdv feedback``): one JSON object
a line, read with a message naming the file and line of the first that cannot be read."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; exits on one that is not a JSON object."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            sys.exit(f"{path}:{n}: not JSON: {exc}")
        if not isinstance(doc, dict):
            sys.exit(f"{path}:{n}: not a JSON object")
        yield n, doc
