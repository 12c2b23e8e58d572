"""Record files of the bulk commands (``rdv features load``, ``rdv feedback``): CSV with a
header or one JSON object a line, read with a message naming the file and line of the first
that cannot be read: also a line, a cell or a nesting past what the readers take, which ended
in a traceback (or, for a file with no line end such as ``/dev/zero``, in a read for ever)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

LINE_LIMIT = 16 * 1024 * 1024
"""The longest line a record file may hold, in bytes (16 MiB): a line is read whole before it
is parsed, so one with no end is refused at this length rather than held in memory growing.
A record the gateway takes is far shorter (its bodies stop at ``RDV_MAX_BODY_BYTES``, 1 MiB by
default)."""


def bounded_lines(path: Path, f: TextIO, limit: int = LINE_LIMIT) -> Iterator[str]:
    """The lines of ``f``, their ends kept (as ``csv`` wants them); exits naming the first
    longer than ``limit`` bytes of UTF-8."""
    n = 0
    while line := f.readline(limit + 1):  # characters: at least as many bytes
        n += 1
        if len(line) > limit or (len(line) > limit // 4 and len(line.encode()) > limit):
            sys.exit(f"{path}:{n}: line longer than {limit} bytes (a record file has a record "
                     "a line)")  # fmt: skip
        yield line


def json_lines(path: Path, f: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; exits on one that is not a JSON object."""
    for n, line in enumerate(bounded_lines(path, f), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except RecursionError:  # json's own message named no line
            sys.exit(f"{path}:{n}: not JSON: nested too deeply")
        except ValueError as exc:
            if "digits" in str(exc):  # Python's words named sys.set_int_max_str_digits
                sys.exit(f"{path}:{n}: not JSON this command reads: an integer of more than "
                         "4300 digits")  # fmt: skip
            sys.exit(f"{path}:{n}: not JSON: {exc}")
        if not isinstance(doc, dict):
            sys.exit(f"{path}:{n}: not a JSON object")
        yield n, doc


def csv_rows(path: Path, f: TextIO) -> tuple[list[str], Iterator[tuple[int, dict[Any, Any]]]]:
    """The header of a CSV file opened with ``newline=""``, and (line number, row) of each row
    after it (as ``csv.DictReader`` gives them); exits naming the line the ``csv`` module
    cannot read (a cell longer than its limit, 131072 characters)."""
    reader = csv.DictReader(bounded_lines(path, f))
    try:
        header = list(reader.fieldnames or [])
    except csv.Error as exc:  # DictReader's line_num is set after a row is read: its reader's
        sys.exit(_csv_fault(path, reader.reader.line_num, exc))

    def rows() -> Iterator[tuple[int, dict[Any, Any]]]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                sys.exit(_csv_fault(path, reader.reader.line_num, exc))
            yield reader.line_num, row

    return header, rows()


def _csv_fault(path: Path, n: int, exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return f"{path}:{n}: a cell longer than {csv.field_size_limit()} characters"
    return f"{path}:{n}: not CSV: {exc}"
