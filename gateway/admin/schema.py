"""The OpenAPI schema and its documentation page, with the admin routes shown only to whoever
holds the admin token: an anonymous caller of ``/openapi.json`` or ``/docs`` sees the
data-plane and read-only routes, not the map of the admin API."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from gateway.admin.guard import admin_token, refusal
from gateway.admin.routes import PREFIX
from gateway.settings import Settings


def install_schema(app: FastAPI, settings: Settings) -> None:
    """``GET /openapi.json`` (everything with the admin token, the rest without it) and
    ``GET /docs``. The app must be made with ``openapi_url=None`` and ``docs_url=None``."""
    token = admin_token(settings)
    schemas: dict[bool, dict[str, Any]] = {}

    def schema(with_admin: bool) -> dict[str, Any]:
        if with_admin not in schemas:
            full = app.openapi()
            schemas[True] = full
            schemas[False] = without_prefix(full, PREFIX)
        return schemas[with_admin]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        with_admin = token is not None and refusal(request, token) is None
        return JSONResponse(schema(with_admin))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")


def without_prefix(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``schema`` less the paths under ``prefix`` and the component schemas only they used."""
    paths = {p: ops for p, ops in schema.get("paths", {}).items() if not p.startswith(prefix)}
    components = schema.get("components", {}).get("schemas", {})
    kept: set[str] = set()
    todo = _refs(paths)
    while todo:
        name = todo.pop()
        if name not in kept and name in components:
            kept.add(name)
            todo |= _refs(components[name])
    out = {**schema, "paths": paths}
    if components:
        out["components"] = {
            **schema["components"],
            "schemas": {n: s for n, s in components.items() if n in kept},
        }
    return out


def _refs(node: Any) -> set[str]:
    """Names of the component schemas ``node`` refers to (``#/components/schemas/<name>``)."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found
