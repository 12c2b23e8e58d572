"""Reading a model upload: the two body formats ``POST /admin/models`` accepts (multipart with
a ``file`` part, or JSON with ``onnx_base64``), their OpenAPI description and the body cap
they need. Apart from the routes because parsing a body is not routing one: this module knows
the formats, the route only hands their result to ``AdminService.upload``."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from gateway.admin.bodies import AdminError, Invalid, UploadJSON, UploadMeta
from gateway.problems import not_json
from gateway.settings import Settings


def upload_body_cap(settings: Settings) -> int:
    """Largest upload body: the artifact as base64 (4/3) plus room for its metadata."""
    return settings.max_model_bytes * 4 // 3 + 1024 * 1024


ASCII_DIGITS = re.compile(r"[0-9]{1,30}")
"""A multipart ``version`` field read as a number (longer: int() of thousands of digits is
slow; the model's bound names a long one)."""
MULTIPART_PARTS = frozenset(
    {"file", "metadata", "reference", "name", "version", "deployment", "description", "algorithm"}
)
"""The parts a multipart upload may hold: any other is refused, as the JSON form refuses a key
it does not know."""
MAX_REFERENCE_ROWS = 100_000
MAX_REFERENCE_CELLS = 5_000_000
"""Bounds on reference rows, checked as they are read: a one-column CSV of 16 MB held 1.4 GB
of Python lists before the row cap refused it (found by hand)."""


def reference_csv(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """A ``reference`` part: CSV with a header of column names, a row of numbers per line."""
    if len(raw) > max_bytes:
        raise AdminError(f"the reference is larger than {max_bytes} bytes", status=413)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Invalid(f"reference: not UTF-8: {exc}") from None
    lines = csv.reader(io.StringIO(text))
    try:
        header = next(lines, None)
        if not header:
            raise Invalid("reference: an empty CSV (a header of feature names comes first)")
        rows: list[list[float]] = []
        cells = 0
        for n, line in enumerate(lines, start=2):
            if not line:
                continue
            cells += len(line)
            if len(rows) >= MAX_REFERENCE_ROWS or cells > MAX_REFERENCE_CELLS:
                raise Invalid(f"reference: more than {MAX_REFERENCE_ROWS} rows or "
                              f"{MAX_REFERENCE_CELLS} values")  # fmt: skip
            try:
                rows.append([float(cell) for cell in line])
            except ValueError as exc:
                raise Invalid(f"reference: line {n}: {exc}") from None
    except csv.Error as exc:  # a field past the reader's limit, a NUL, a quote left open
        raise Invalid(f"reference: line {lines.line_num}: not CSV this reads: {exc}") from None
    return {"columns": [name.strip() for name in header], "rows": rows}


def json_document(raw: str | bytes, what: str) -> Any:
    """``raw`` parsed as JSON, or a 422 saying why in the caller's terms (``json``'s own
    words for a deep nesting or a long number named Python's limits, not the body's fault)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Invalid(not_json(raw, exc, what)) from None


def _validated(model: type[UploadMeta], doc: Any) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise Invalid(
            "invalid model metadata",
            errors=exc.errors(include_url=False, include_context=False, include_input=False),
        ) from None


async def read_upload(request: Request, max_bytes: int) -> tuple[UploadMeta, bytes]:
    """(metadata, ONNX bytes) from multipart/form-data or from JSON with base64."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=3, max_fields=32)
        try:
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise Invalid("a multipart upload needs a 'file' part holding the ONNX model")
            unknown = sorted(set(form.keys()) - MULTIPART_PARTS)
            if unknown:  # a typo ("refrence") was a 201 without what it carried (a probe)
                raise Invalid(f"a multipart upload has no {unknown[0][:40]!r} part: it takes "
                              f"{', '.join(sorted(MULTIPART_PARTS))}")  # fmt: skip
            for key in ("file", "metadata", "reference"):
                if len(form.getlist(key)) > 1:
                    raise Invalid(f"a multipart upload holds one '{key}' part, not several")
            data = await part.read(max_bytes + 1)
            reference = form.get("reference")
            doc: dict[str, Any] = {}
            raw_meta = form.get("metadata")
            if isinstance(raw_meta, UploadFile):  # curl -F metadata=@meta.json
                try:
                    raw_meta = (await raw_meta.read(max_bytes + 1)).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise Invalid(f"the 'metadata' part is not UTF-8: {exc}") from None
            if isinstance(raw_meta, str) and raw_meta.strip():
                doc = json_document(raw_meta, "the 'metadata' part")
                if not isinstance(doc, dict):
                    raise Invalid("the 'metadata' part must be a JSON object")
            for key in ("name", "version", "deployment", "description", "algorithm"):
                value = form.get(key)
                if isinstance(value, str):
                    # a form's fields are text: a version of digits is the number it says
                    # (ASCII digits only: int() read full-width "12" and " 7 " as numbers; a probe)
                    digits = key == "version" and ASCII_DIGITS.fullmatch(value) is not None
                    doc[key] = int(value) if digits else value
            if reference is not None:  # a file part, or the CSV as a field's text
                csv_bytes = (
                    await reference.read(max_bytes + 1)
                    if isinstance(reference, UploadFile)
                    else reference.encode()
                )
                doc["reference"] = await run_in_threadpool(reference_csv, csv_bytes, max_bytes)
        finally:
            await form.close()
        meta: UploadMeta = await run_in_threadpool(_validated, UploadMeta, doc)
        return meta, data
    if ctype.startswith("application/json"):
        # Parsed in a thread: a body of tens of MB (the artifact as base64, reference rows)
        # held the event loop, and every request of this gateway process, for seconds.
        return await run_in_threadpool(_json_upload, await request.body())
    raise AdminError(
        "send multipart/form-data (a 'file' part and a 'metadata' JSON part) or "
        "JSON with 'onnx_base64'",
        status=415,
    )


MAX_LISTED = 250_000
"""Values an upload's other arrays may hold at most (``feature_names`` and the reference's
``columns``, 100,000 each; ``classes`` and ``class_names``, 10,000 each), beside the
reference's cells."""


def _json_upload(body: bytes) -> tuple[UploadMeta, bytes]:
    # Values in a JSON array are comma-separated: more commas than the arrays may hold values
    # is refused before the parse makes a Python float of each (32 bytes a number: an 80 MB
    # body of reference values would take gigabytes; found by a helper's fuzzing).
    if body.count(b",") > MAX_REFERENCE_CELLS + MAX_LISTED:
        raise Invalid(f"reference: more than {MAX_REFERENCE_ROWS} rows or "
                      f"{MAX_REFERENCE_CELLS} values")  # fmt: skip
    upload = _validated(UploadJSON, json_document(body, "the body"))
    try:
        data = base64.b64decode(upload.onnx_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Invalid(f"onnx_base64 is not base64: {exc}") from None
    # Checked already: not validated (and copied) a second time.
    fields = {name: getattr(upload, name) for name in UploadMeta.model_fields}
    return UploadMeta.model_construct(**fields), data


UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": UploadJSON.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "metadata": {"type": "string", "description": "UploadMeta as JSON"},
                        "reference": {
                            "type": "string",
                            "format": "binary",
                            "description": "held-out rows as CSV, a header of feature names",
                        },
                    },
                }
            },
        },
    }
}
"""The request body of ``POST /admin/models`` for OpenAPI: the route reads it itself, so
FastAPI cannot derive it."""
