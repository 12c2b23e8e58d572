"""The admin API in-process (the real app, a real Redis, real ONNX models): the token guards
every route, refused uploads change nothing, and each change lands in state and history.

Longer than ~400 lines on purpose: one app, one Redis and one set of uploaded models serve
every route's tests, and the token test walks the whole route table."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from admin_support import (
    AUTH,
    TOKEN,
    AppClient,
    copy_demo_models,
    features_body,
    upload_body,
    variant_onnx,
)
from fastapi.routing import APIRoute

from gateway.admin.bodies import NotFound
from gateway.settings import Settings
from gateway.transport.app import create_app
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.deployments import Deployment, ModelRef, promoted
from models.meta import ModelMeta
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, DEMO_MODEL, demo_data
from processes import PREDICT
from rendezvous import names
from rendezvous.decision import build_decision
from rendezvous.envelope import ModelResult
from rendezvous.schedule import Schedule

DEP = f"/admin/deployments/{DEMO_DEPLOYMENT}"
ClientFactory = Callable[..., AppClient]


@pytest.fixture
def make_client(
    r: redis.Redis, redis_url: str, demo_data_dir: Path, tmp_path: Path
) -> Iterator[ClientFactory]:
    data = copy_demo_models(demo_data_dir, tmp_path / "data")
    DeploymentStore(r).create(demo_deployment(ModelRegistry(data / "models"), Schedule()))
    clients: list[AppClient] = []

    def make(**overrides: Any) -> AppClient:
        settings = Settings(
            redis_url=redis_url, data_dir=data, **{"admin_token": TOKEN, **overrides}
        )
        client = AppClient(create_app(settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def admin(make_client: ClientFactory) -> AppClient:
    return make_client()


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """Every API route, also inside included routers (FastAPI keeps those as one entry of
    ``app.routes`` that holds the router)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _walk(inner.routes, prefix + getattr(context, "prefix", ""))
        elif isinstance(route, APIRoute):  # as the schema names it: no {name:path} converter
            yield prefix + re.sub(r":\w+}", "}", route.path), route


def admin_routes(client: AppClient) -> list[tuple[str, str]]:
    out = []
    for path, route in _walk(client.app.routes):
        if path.startswith("/admin"):
            out.extend((method, path) for method in sorted(route.methods))
    documented = {
        (method.upper(), path)
        for path, ops in client.app.openapi()["paths"].items()
        if path.startswith("/admin")
        for method in ops
    }
    assert documented <= set(out), documented - set(out)
    return out


def fill(path: str) -> str:
    values = {
        "name": "breast-cancer",
        "version": "1",
        "deployment": DEMO_DEPLOYMENT,
        "role": "canary",
        "replay_id": "18c0a0b0c0d-0123456789ab",
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def state(r: redis.Redis, data: Path) -> tuple[Any, ...]:
    """Everything an admin call could change: index, files, deployment, history, groups."""
    files = sorted(str(p.relative_to(data)) for p in (data / "models").rglob("*"))
    groups = sorted(g["name"] for g in r.xinfo_groups(names.input_stream(DEMO_DEPLOYMENT)))
    return (
        sorted(r.hkeys(names.MODELS_INDEX)),
        files,
        r.get(names.deployment_key(DEMO_DEPLOYMENT)),
        r.lrange(names.history_key(DEMO_DEPLOYMENT), 0, -1),
        groups,
    )


def data_dir(client: AppClient) -> Path:
    return Path(client.app.state.settings.data_dir)


# -- the token ---------------------------------------------------------------------------------


def test_every_admin_route_refuses_a_missing_or_wrong_token(
    admin: AppClient, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    routes = admin_routes(admin)
    assert len(routes) >= 15, routes
    before = state(r, data_dir(admin))
    for method, path in routes:
        url = fill(path)
        body = {"version": 1, "role": "x", "name": "x", "real": {"model": "x", "version": 1}}
        resp = admin.request(method, url, json=body)
        assert resp.status_code == 401, (method, path, resp.text)
        assert resp.headers["www-authenticate"] == "Bearer"
        resp = admin.request(method, url, json=body, headers={"Authorization": "Basic abc"})
        assert resp.status_code == 401, (method, path)
        for wrong in ("Bearer not-the-token", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
            resp = admin.request(method, url, json=body, headers={"Authorization": wrong})
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json() == {"detail": "wrong admin token"}
        # two headers, whichever comes first: the first used to win silently
        right, wrong_one = (*AUTH.items(),), ("Authorization", "Bearer x")
        for two in ([*right, wrong_one], [wrong_one, *right], [*right, *right]):
            resp = admin.request(method, url, json=body, headers=two)
            assert resp.status_code == 400, (method, path, resp.text)
            assert resp.json() == {"detail": "send one Authorization header, not 2"}
    assert state(r, data_dir(admin)) == before
    assert TOKEN not in caplog.text and "not-the-token" not in caplog.text
    # and the right token opens them
    assert admin.get("/admin/models", headers=AUTH).status_code == 200


def test_without_a_token_the_admin_api_is_off(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = make_client(admin_token=None)
    assert "admin API is off" in caplog.text
    for method, path in admin_routes(client):
        resp = client.request(method, fill(path), headers=AUTH, json={})
        assert resp.status_code == 404, (method, path)
        assert "RDV_ADMIN_TOKEN" in resp.json()["detail"]
    assert client.get("/healthz").status_code == 200


# -- the registry ------------------------------------------------------------------------------


def test_upload_list_show_delete(admin: AppClient, r: redis.Redis) -> None:
    resp = admin.post(
        "/admin/models",
        json=upload_body("weak", description="weak lr", metrics={"auc": 0.9}),
        headers={**AUTH, "X-Actor": "ana"},
    )
    assert resp.status_code == 201, resp.text
    v3 = resp.json()
    assert (v3["name"], v3["version"], v3["uploaded_by"]) == ("breast-cancer", 3, "ana")
    assert v3["sha256"] == hashlib.sha256(variant_onnx("weak")).hexdigest()
    assert v3["classes"] == [0, 1] and v3["metrics"] == {"auc": 0.9}
    assert v3["feature_spec"]["width"] == 30

    files = {"file": ("m.onnx", variant_onnx("flipped"), "application/octet-stream")}
    meta = {"name": "breast-cancer", "deployment": DEMO_DEPLOYMENT, "description": "flipped"}
    resp = admin.post(
        "/admin/models", files=files, data={"metadata": json.dumps(meta)}, headers=AUTH
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["version"] == 4

    listed = admin.get("/admin/models", headers=AUTH).json()["models"]
    assert [(m["name"], m["version"]) for m in listed] == [
        ("breast-cancer", v) for v in (1, 2, 3, 4)
    ]
    roles = {m["version"]: m["roles"] for m in listed}
    assert roles[2] == [f"{DEMO_DEPLOYMENT}/real"] and roles[3] == []
    shown = admin.get("/admin/models/breast-cancer/3", headers=AUTH).json()
    assert shown["artifact_intact"] and shown["description"] == "weak lr"
    assert len(shown["feature_spec"]["names"]) == 30
    assert admin.get("/admin/models/breast-cancer", headers=AUTH).json()["versions"]
    assert admin.get("/admin/models/nope/1", headers=AUTH).status_code == 404
    # every process sees the same index
    other = ModelRegistry(data_dir(admin) / "models", index=r)
    assert [m.version for m in other.list("breast-cancer")] == [1, 2, 3, 4]

    held = admin.delete("/admin/models/breast-cancer/2", headers=AUTH)
    assert held.status_code == 409 and f"{DEMO_DEPLOYMENT}/real" in held.json()["detail"]
    assert admin.delete("/admin/models/breast-cancer/4", headers=AUTH).status_code == 200
    assert not (data_dir(admin) / "models" / "breast-cancer" / "4" / "model.onnx").exists()
    assert [m.version for m in other.list("breast-cancer")] == [1, 2, 3]
    assert admin.delete("/admin/models/breast-cancer/4", headers=AUTH).status_code == 404
    # a deleted number is not handed out again while a later one exists
    resp = admin.post("/admin/models", json=upload_body("flipped", version=3), headers=AUTH)
    assert resp.status_code == 409
    # nor a deleted one ever: a replay or labels kept for version 4 were about the deleted one
    resp = admin.post("/admin/models", json=upload_body("flipped", version=4), headers=AUTH)
    assert resp.status_code == 409 and "was deleted" in resp.json()["detail"]
    resp = admin.post("/admin/models", json=upload_body("flipped"), headers=AUTH)
    assert resp.status_code == 201 and resp.json()["version"] == 5


def test_a_multipart_upload_takes_its_parts_as_forms_send_them(admin: AppClient) -> None:
    """Found by a fuzzing probe: a ``version`` field was always a 422 (a form's fields are
    text), a ``reference`` or ``metadata`` sent as a field or a file the other way round was
    ignored (201 without it), a second ``file`` part won silently, and the errors of a
    metadata part or a CSV named Python's limits ("use sys.set_int_max_str_digits()")."""
    onnx = ("m.onnx", variant_onnx("weak"), "application/octet-stream")
    names = list(demo_data().names)
    rows = "\n".join(",".join(map(str, row)) for row in demo_data().x_test[:60])
    csv_text = ",".join(names) + "\n" + rows + "\n"
    meta = json.dumps({"name": "formed", "feature_names": names})

    def post(files: list[tuple[str, Any]], **data: str) -> Any:
        return admin.post("/admin/models", files=files, data=data, headers=AUTH)

    resp = post([("file", onnx)], metadata=meta, version="7", reference=csv_text)
    assert resp.status_code == 201, resp.text
    stored = admin.get("/admin/models/formed/7", headers=AUTH).json()
    assert len(stored["score_reference"]) == 10  # the field's CSV was read
    resp = post([("file", onnx), ("metadata", ("meta.json", meta.encode(), "application/json"))])
    assert resp.status_code == 201 and resp.json()["version"] == 8, resp.text

    refusals = [
        ([("file", onnx), ("file", onnx)], {"metadata": meta}, "one 'file' part"),
        ([("file", onnx)], {"metadata": '{"name": ' + "1" * 5000 + "}"}, "more than 4300 digits"),
        ([("file", onnx)], {"metadata": "[" * 100_000}, "nests arrays or objects too deeply"),
        ([("file", onnx)], {"metadata": meta, "reference": "a\n" + "1" * 200_000},
         "line 2: not CSV this reads: field larger than field limit"),
        ([("file", onnx)], {"metadata": meta, "version": "seven"}, "invalid model metadata"),
        # a typo was a 201 without the reference it carried (a helper's fuzzing)
        ([("file", onnx)], {"metadata": meta, "refrence": csv_text}, "no 'refrence' part"),
    ]  # fmt: skip
    for files, data, says in refusals:
        resp = post(files, **data)
        assert resp.status_code == 422 and says in resp.text, (says, resp.text)
        assert "sys." not in resp.text and "recursion" not in resp.text


@pytest.mark.parametrize(
    ("case", "status", "needle"),
    [
        ("pickle", 422, "pickle"),
        ("text", 422, "not an ONNX model"),
        ("narrow", 422, "width is 10"),
        ("oversize", 413, "RDV_MAX_MODEL_BYTES"),
        # a probe's: a part is read to one byte past the cap, which was named as its size
        ("oversize-form", 413, "the model artifact is larger than RDV_MAX_MODEL_BYTES=4096"),
        # a probe's: int() read these as 12 and 3, where a path's version refuses them
        ("unicode-version", 422, "valid integer"),
        ("long-version", 422, "less than or equal to 2147483647"),
        ("bad-base64", 422, "not base64"),
        ("no-name", 422, "invalid model metadata"),
        ("bad-name", 422, "invalid model name"),
        ("form-without-file", 422, "'file' part"),
        ("plain-text", 415, "multipart"),
        ("nested-json", 422, "not JSON"),
        ("unknown-deployment", 404, "does not exist"),
        ("wrong-sha256", 422, "does not match the artifact"),  # these two answered 500
        ("repeated-names", 422, "feature names must be unique"),
        # a label sent by name matched the last class of that name (found by a fuzzing probe)
        ("repeated-class-names", 422, "class_names must be distinct: ['good']"),
        ("control-characters", 422, "invalid model metadata"),  # a name forged log lines
        ("c1-and-separators", 422, "invalid model metadata"),
        ("many-metrics", 422, "invalid model metadata"),
    ],
)
def test_refused_uploads_are_4xx_and_change_nothing(
    make_client: ClientFactory, r: redis.Redis, case: str, status: int, needle: str
) -> None:
    client = make_client(max_model_bytes=4096) if case.startswith("oversize") else make_client()
    before = state(r, data_dir(client))
    blob = {"pickle": pickle.dumps({"coef": [1.0, 2.0]}), "text": b"this is not a model"}
    if case in blob:
        body = upload_body("weak", onnx_base64=base64.b64encode(blob[case]).decode())
        resp = client.post("/admin/models", json=body, headers=AUTH)
    elif case == "narrow":
        resp = client.post("/admin/models", json=upload_body("narrow"), headers=AUTH)
    elif case == "oversize":  # the demo's gradient-boosted model, far over 4 KiB
        onnx = (data_dir(client) / "models" / "breast-cancer" / "2" / "model.onnx").read_bytes()
        assert len(onnx) > 4096
        body = upload_body("weak", onnx_base64=base64.b64encode(onnx).decode())
        resp = client.post("/admin/models", json=body, headers=AUTH)
    elif case in ("oversize-form", "unicode-version", "long-version"):
        onnx = (data_dir(client) / "models" / "breast-cancer" / "2" / "model.onnx").read_bytes()
        version = {"unicode-version": "\uff11\uff12", "long-version": "9" * 25}.get(case)
        fields = {"name": "breast-cancer", **({"version": version} if version else {})}
        resp = client.post("/admin/models", files={"file": ("m.onnx", onnx)}, data=fields,
                           headers=AUTH)  # fmt: skip
    elif case == "bad-base64":
        resp = client.post(
            "/admin/models", json=upload_body("weak", onnx_base64="@@@"), headers=AUTH
        )
    elif case in ("no-name", "bad-name"):
        body = upload_body("weak")
        body.pop("name") if case == "no-name" else body.update(name="../../etc")
        resp = client.post("/admin/models", json=body, headers=AUTH)
    elif case == "form-without-file":
        resp = client.post("/admin/models", files={"metadata": (None, "{}")}, headers=AUTH)
    elif case == "nested-json":
        resp = client.post(
            "/admin/models",
            content=b"[" * 200_000,
            headers={**AUTH, "content-type": "application/json"},
        )
    elif case == "plain-text":
        resp = client.post(
            "/admin/models", content=b"x", headers={**AUTH, "content-type": "text/plain"}
        )
    elif case == "wrong-sha256":
        resp = client.post("/admin/models", json=upload_body("weak", sha256="ab" * 32),
                           headers=AUTH)  # fmt: skip
    elif case == "control-characters":
        names = [*demo_data().names[:-1], "x\n2026-12-05 INFO forged line \x1b[2J"]
        body = upload_body("weak", deployment=None, name="other", feature_names=names)
        resp = client.post("/admin/models", json=body, headers=AUTH)
    elif case == "c1-and-separators":  # U+0085 ends a line, U+009B is a terminal's CSI
        for odd in ("a\x85INFO forged", "b\x9b2J", "c\u2028d"):
            names = [*demo_data().names[:-1], odd]
            body = upload_body("weak", deployment=None, name="other", feature_names=names)
            resp = client.post("/admin/models", json=body, headers=AUTH)
            assert resp.status_code == 422, (odd, resp.text)
    elif case == "many-metrics":
        body = upload_body("weak", metrics={f"m{i}": 1.0 for i in range(101)})
        resp = client.post("/admin/models", json=body, headers=AUTH)
    elif case == "repeated-class-names":
        body = upload_body("weak", class_names=["good", "good"])
        resp = client.post("/admin/models", json=body, headers=AUTH)
    elif case == "repeated-names":
        names = [*demo_data().names[:-1], demo_data().names[0]]
        body = upload_body("weak", deployment=None, name="other", feature_names=names)
        resp = client.post("/admin/models", json=body, headers=AUTH)
    else:
        resp = client.post(
            "/admin/models", json=upload_body("weak", deployment="nope"), headers=AUTH
        )
    assert resp.status_code == status, resp.text
    assert needle in resp.text
    assert state(r, data_dir(client)) == before


def test_an_upload_onto_a_full_disk_is_a_507_that_stores_nothing_and_the_next_one_lands(
    admin: AppClient, r: redis.Redis, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The registry's files written where the kernel says the disk is full (``/dev/full``,
    ENOSPC at the write): a 507 saying so, no version folder or index entry left behind (it
    was a 500). Once there is room again the same upload is stored under the next number."""
    import models.registry as registry_module

    before = state(r, data_dir(admin))
    real_open = open

    def full_disk(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return real_open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

    monkeypatch.setattr(registry_module, "open", full_disk, raising=False)
    body = upload_body("weak")
    resp = admin.post("/admin/models", json=body, headers=AUTH)
    assert resp.status_code == 507, resp.text
    assert "No space left on device" in resp.json()["detail"]
    assert state(r, data_dir(admin)) == before
    # the log says where (a write's error names no file: a helper's probe)
    refused = [r.getMessage() for r in caplog.records if "disk was refused" in r.getMessage()]
    assert refused and f"{data_dir(admin) / 'models' / DEMO_MODEL}" in refused[0], refused
    assert str(data_dir(admin)) not in resp.text  # the caller is not told the server's paths
    # a new model's name: its folder went too (it stayed, empty; a helper's disk-full probe)
    resp = admin.post("/admin/models", json=upload_body("weak", name="brand-new"), headers=AUTH)
    assert resp.status_code == 507, resp.text
    assert state(r, data_dir(admin)) == before

    monkeypatch.undo()  # room again
    resp = admin.post("/admin/models", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    assert resp.json()["version"] == 3


def test_a_model_delete_on_a_full_disk_is_a_507_that_deletes_nothing_and_the_next_one_does(
    admin: AppClient, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version's retired marker is the first thing a delete writes: a disk that refuses
    it leaves the version listed and free to take a role (it was dropped from the index and
    marked retired while its files stayed). Once there is room the same delete completes."""
    import models.registry as registry_module

    version = upload(admin, "weak")
    before = state(r, data_dir(admin))
    real_open = open

    def full_disk(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return real_open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

    monkeypatch.setattr(registry_module, "open", full_disk, raising=False)
    path = f"/admin/models/{DEMO_DEPLOYMENT}/{version}"
    resp = admin.delete(path, headers=AUTH)
    assert resp.status_code == 507, resp.text
    assert state(r, data_dir(admin)) == before
    assert not r.sismember(names.MODELS_RETIRED, f"{DEMO_DEPLOYMENT}:{version}")
    listed = admin.get("/admin/models", headers=AUTH).json()["models"]
    assert any(m["version"] == version for m in listed if m["name"] == DEMO_DEPLOYMENT), listed

    monkeypatch.undo()  # room again
    assert admin.delete(path, headers=AUTH).status_code == 200
    assert admin.delete(path, headers=AUTH).status_code == 404


def test_a_version_whose_file_changed_on_disk_takes_no_role(
    admin: AppClient, r: redis.Redis
) -> None:
    """Its workers refuse an artifact whose sha256 is not the upload's: a promote of it made
    it real all the same, and the fallbacks answered every request. Now a 409 naming it."""
    version = upload(admin, "weak")
    path = data_dir(admin) / "models" / DEMO_DEPLOYMENT / str(version) / "model.onnx"
    path.write_bytes(variant_onnx("flipped"))  # another valid model, in its place
    before = state(r, data_dir(admin))
    resp = admin.post(f"{DEP}/promote", json={"version": version}, headers=AUTH)
    assert resp.status_code == 409, resp.text
    assert "the artifact on disk is not the one uploaded" in resp.json()["detail"]
    assert state(r, data_dir(admin)) == before


def test_a_rollback_to_a_version_whose_file_changed_on_disk_is_refused(
    admin: AppClient, r: redis.Redis
) -> None:
    """A rollback restores roles from history: the version it would make real again is
    checked as a promote's is, or its workers refuse it and the fallbacks answer for good."""
    version = upload(admin, "weak")
    resp = admin.post(f"{DEP}/promote", json={"version": version}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    resp = admin.post(f"{DEP}/promote", json={"version": upload(admin, "weak")}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    path = data_dir(admin) / "models" / DEMO_DEPLOYMENT / str(version) / "model.onnx"
    original = path.read_bytes()
    path.write_bytes(variant_onnx("flipped"))
    before = state(r, data_dir(admin))
    resp = admin.post(f"{DEP}/rollback", json={}, headers=AUTH)
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert f"{DEMO_DEPLOYMENT}:{version}" in detail and "not the one uploaded" in detail
    assert state(r, data_dir(admin)) == before

    path.write_bytes(original)  # put back: the same rollback goes through
    resp = admin.post(f"{DEP}/rollback", json={}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert roles(admin)["real"] == f"{DEMO_DEPLOYMENT}:{version}"


def test_only_a_disk_that_refuses_writes_is_a_507() -> None:
    """No space, over quota or read-only: 507; any other OS error stays a fault of ours."""
    import errno

    from gateway.dataplane.failures import problem_of

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        problem = problem_of(OSError(code, os.strerror(code), "/data/models/x/3/model.onnx"))
        assert problem is not None and problem.status == 507
        assert "/data" not in str(problem.detail)  # the path goes to the log, not the caller
    assert problem_of(OSError(errno.EIO, "Input/output error")) is None
    assert problem_of(PermissionError(errno.EACCES, "Permission denied")) is None


# -- deployments -------------------------------------------------------------------------------


def upload(client: AppClient, kind: str) -> int:
    resp = client.post("/admin/models", json=upload_body(kind), headers=AUTH)
    assert resp.status_code == 201, resp.text
    return int(resp.json()["version"])


def roles(client: AppClient) -> dict[str, str]:
    doc = client.get(DEP, headers=AUTH).json()["roles"]
    return {role: f"{ref['name']}:{ref['version']}" for role, ref in doc.items()}


def test_promote_and_rollback_keep_history_and_refresh_the_cache_at_once(
    admin: AppClient,
) -> None:
    v3 = upload(admin, "weak")
    cache = admin.app.state.deployments
    resp = admin.post(
        f"{DEP}/promote",
        json={"version": v3, "reason": "better auc"},
        headers={**AUTH, "X-Actor": "ana"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["revision"] == 2
    assert roles(admin) == {"real": "breast-cancer:3", "canary": "breast-cancer:2"}
    assert cache.get(DEMO_DEPLOYMENT).roles["real"].version == 3, "cache refreshed at once"

    again = admin.post(f"{DEP}/promote", json={"version": v3}, headers=AUTH)
    assert again.status_code == 409 and "already the real" in again.json()["detail"]

    back = admin.post(f"{DEP}/rollback", json={"reason": "pager"}, headers=AUTH)
    assert back.status_code == 200, back.text
    assert roles(admin) == {"real": "breast-cancer:2", "canary": "breast-cancer:1"}
    assert cache.get(DEMO_DEPLOYMENT).roles["real"].version == 2

    pinned = admin.post(f"{DEP}/promote", json={"version": v3, "pin_canary": True}, headers=AUTH)
    assert pinned.status_code == 200
    assert roles(admin) == {"real": "breast-cancer:3", "canary": "breast-cancer:1"}
    to_first = admin.post(f"{DEP}/rollback", json={"to_revision": 1}, headers=AUTH)
    assert to_first.status_code == 200 and to_first.json()["revision"] == 5
    assert roles(admin) == {"real": "breast-cancer:2", "canary": "breast-cancer:1"}

    history = admin.get(f"{DEP}/history", headers=AUTH).json()["history"]
    assert [h["revision"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["action"] for h in history] == [
        "create",
        "promote",
        "rollback",
        "promote",
        "rollback",
    ]
    assert history[1]["actor"] == "ana" and history[1]["reason"] == "better auc"
    assert history[1]["changes"] == {
        "real": ["breast-cancer:2", "breast-cancer:3"],
        "canary": ["breast-cancer:1", "breast-cancer:2"],
    }
    assert history[2]["detail"] == {"to_revision": 1}
    assert all(h["ts_ms"] > 0 for h in history)
    assert admin.post(f"{DEP}/rollback", json={"to_revision": 9}, headers=AUTH).status_code == 409

    # found by hand: a rollback after a promotion and a partition change restored the state
    # before the partition change (the same roles), so the promotion stayed
    assert admin.post(f"{DEP}/promote", json={"version": v3}, headers=AUTH).status_code == 200
    patched = admin.patch(DEP, json={"partitions": 2}, headers=AUTH)
    assert patched.status_code == 200, patched.text
    undo = admin.post(f"{DEP}/rollback", json={}, headers=AUTH)
    assert undo.status_code == 200, undo.text
    assert roles(admin) == {"real": "breast-cancer:2", "canary": "breast-cancer:1"}
    assert admin.get(f"{DEP}/history", headers=AUTH).json()["history"][-1]["detail"] == {
        "to_revision": 5
    }
    redo = admin.post(f"{DEP}/rollback", json={}, headers=AUTH)  # a second undoes the first
    assert redo.status_code == 200 and roles(admin)["real"] == "breast-cancer:3"
    real = {"model": "breast-cancer", "version": 2}
    solo = admin.post("/admin/deployments", headers=AUTH, json={"name": "solo", "real": real})
    assert solo.status_code == 201, solo.text
    nothing = admin.post("/admin/deployments/solo/rollback", json={}, headers=AUTH)
    assert nothing.status_code == 409 and "nothing to roll back" in nothing.json()["detail"]


def test_a_version_deleted_while_a_promote_of_it_commits_is_refused_to_one_of_them(
    admin: AppClient,
) -> None:
    """A delete and a promote of one version at once both answered 200 (6 of 15 tries in a
    helper's probe), leaving real on a deleted model and its worker silently serving the old
    one. Here the delete runs whole between the promote's read of the state and its commit
    (the promote's check already passed): the commit must find the state moved, read again,
    and refuse the deleted version."""
    v3 = upload(admin, "weak")
    service = admin.app.state.admin
    deleted: list[dict[str, Any]] = []

    def promote_meanwhile_deleted(dep: Deployment) -> Deployment:
        if not deleted:  # the first read: the delete comes in now
            deleted.append(service.delete_model(DEMO_DEPLOYMENT, v3, "other"))
        return promoted(dep, ModelRef(DEMO_DEPLOYMENT, v3))

    with pytest.raises(NotFound, match=f"version {v3} was deleted"):
        service._change(DEMO_DEPLOYMENT, promote_meanwhile_deleted, "promote", "ana", "", {})
    assert deleted and roles(admin)["real"] == f"{DEMO_DEPLOYMENT}:2"
    # and a delete refused for a holder leaves the version promotable (its mark undone)
    v4 = upload(admin, "weak")
    assert admin.post(f"{DEP}/promote", json={"version": v4}, headers=AUTH).status_code == 200
    refused = admin.delete(f"/admin/models/{DEMO_DEPLOYMENT}/{v4}", headers=AUTH)
    assert refused.status_code == 409, refused.text
    assert admin.post(f"{DEP}/rollback", json={}, headers=AUTH).status_code == 200
    again = admin.post(f"{DEP}/promote", json={"version": v4}, headers=AUTH)
    assert again.status_code == 200, again.text


def test_a_fallback_naming_a_challenger_removed_meanwhile_is_refused(
    admin: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schedule change and a challenger's removal at once both answered 200 (2 of 15 tries
    in a helper's probe), leaving a fallback on a role the deployment no longer has. Here the
    removal lands between the change's check and its transaction."""
    v3 = upload(admin, "weak")
    added = admin.post(f"{DEP}/challengers", json={"role": "ch1", "version": v3}, headers=AUTH)
    assert added.status_code in (200, 201), added.text
    service = admin.app.state.admin
    update = service.store.update
    removed: list[bool] = []

    def removal_first(*args: Any, **kw: Any) -> Any:
        if not removed:
            removed.append(True)
            service.remove_challenger(DEMO_DEPLOYMENT, "ch1", "other", "")
        return update(*args, **kw)

    monkeypatch.setattr(service.store, "update", removal_first)
    resp = admin.patch(f"{DEP}/schedule", json={"fallbacks": ["ch1", "canary"]}, headers=AUTH)
    assert resp.status_code == 422 and "'ch1' is not a role" in resp.text, resp.text
    monkeypatch.undo()
    state = admin.get(DEP, headers=AUTH).json()
    assert "ch1" not in state["roles"] and "ch1" not in state["schedule"]["fallbacks"]


def test_every_change_that_takes_expect_revision_refuses_a_stale_one(admin: AppClient) -> None:
    """Only a promote could be guarded against another operator's change made meanwhile
    (found by a helper's probe of concurrent operators)."""
    v3 = upload(admin, "weak")
    revision = admin.get(DEP, headers=AUTH).json()["revision"]
    stale = revision - 1 if revision > 1 else revision + 5
    changes = [
        ("PATCH", f"{DEP}/schedule", {"grace_ms": 150}),
        ("POST", f"{DEP}/challengers", {"role": "guarded", "version": v3}),
        ("PATCH", DEP, {"partitions": 2}),
    ]
    for method, path, body in changes:
        refused = admin.request(method, path, json={**body, "expect_revision": stale},
                                headers=AUTH)  # fmt: skip
        assert refused.status_code == 409, (path, refused.text)
        assert f"not {stale}" in refused.text
    assert admin.get(DEP, headers=AUTH).json()["revision"] == revision  # nothing changed
    for method, path, body in changes:
        done = admin.request(method, path, json={**body, "expect_revision": revision},
                             headers=AUTH)  # fmt: skip
        assert done.status_code in (200, 201), (path, done.text)
        revision = done.json()["revision"]
    state = admin.get(DEP, headers=AUTH).json()
    assert state["schedule"]["grace_ms"] == 150 and "guarded" in state["roles"]
    assert "expect_revision" not in json.dumps(state["schedule"])
    # a rollback and a challenger's removal take it too (a rollback undid whatever came last)
    removal = f"{DEP}/challengers/guarded"
    for expected in (revision - 1, revision):
        removed = admin.delete(removal, params={"expect_revision": expected}, headers=AUTH)
        assert removed.status_code == (409 if expected < revision else 200), removed.text
    revision = removed.json()["revision"]
    for expected in (revision - 1, revision):
        back = admin.post(f"{DEP}/rollback", json={"expect_revision": expected}, headers=AUTH)
        assert back.status_code == (409 if expected < revision else 200), back.text
    assert "guarded" in admin.get(DEP, headers=AUTH).json()["roles"]  # the removal undone


def test_an_admin_body_that_does_not_parse_gets_a_422_naming_why(admin: AppClient) -> None:
    """FastAPI's own "400 There was an error parsing the body" named nothing, and a gzip body
    got it too (predict answers 415); found by a helper's fuzzing."""
    headers = {**AUTH, "content-type": "application/json"}
    for raw, says in ((b'{"grace_ms": \xff}', "not UTF-8: invalid start byte at byte 13"),
                      (b'{"grace_ms": ' + b"7" * 5000 + b"}", "more than 4300 digits"),
                      (b"[" * 10_000 + b"]" * 10_000, "too deeply"),
                      # FastAPI's "JSON decode error" said where, not what (a probe's)
                      (b'{"grace_ms": 2,', "not JSON: Expecting property name"),
                      (b'{"grace_ms": 2} x', "not JSON: Extra data"),
                      (b'{"grace_ms": 2\x00}', "not JSON: ")):  # fmt: skip
        refused = admin.patch(f"{DEP}/schedule", content=raw, headers=headers)
        assert refused.status_code == 422 and says in refused.json()["detail"], refused.text
    # NaN parses (Python's JSON reads it): its refusal said "less than or equal to 600000"
    nan = admin.patch(f"{DEP}/schedule", content=b'{"grace_ms": NaN}', headers=headers)
    assert nan.status_code == 422 and "finite number" in nan.text, nan.text
    zipped = admin.patch(f"{DEP}/schedule", content=b"\x1f\x8b",
                         headers={**headers, "content-encoding": "gzip"})  # fmt: skip
    assert zipped.status_code == 415 and "uncompressed" in zipped.text
    # Python's JSON reads these (they were taken), where predict and feedback refuse them
    for raw, says in ((b'\xef\xbb\xbf{"grace_ms": 130}', "byte order mark"),
                      ('{"grace_ms": 130}'.encode("utf-16"), "not UTF-8")):  # fmt: skip
        for route, method in ((f"{DEP}/schedule", admin.patch),
                              ("/admin/deployments", admin.post)):  # fmt: skip
            refused = method(route, content=raw, headers=headers)
            assert refused.status_code == 422 and says in refused.text, (route, refused.text)
        upload = admin.post("/admin/models", content=raw, headers=headers)
        assert upload.status_code == 422 and says in upload.text, upload.text
    assert admin.get(DEP, headers=AUTH).json()["schedule"]["grace_ms"] != 130


def test_an_actor_is_printable_ascii(admin: AppClient) -> None:
    """HTTP headers are read as Latin-1: an actor "é" sent as UTF-8 was recorded as "Ã©", and
    a tab was kept (found by a helper's fuzzing)."""
    actor: str | bytes
    for actor in ("jos\u00e9".encode(), "a\tb"):
        refused = admin.patch(f"{DEP}/schedule", json={"grace_ms": 130},
                              headers={**AUTH, "X-Actor": actor})  # fmt: skip
        assert refused.status_code == 422 and "x-actor" in refused.text.lower(), refused.text
    done = admin.patch(f"{DEP}/schedule", json={"grace_ms": 130},
                       headers={**AUTH, "X-Actor": "jose m."})  # fmt: skip
    assert done.status_code == 200
    assert admin.get(f"{DEP}/history", headers=AUTH).json()["history"][-1]["actor"] == "jose m."


def test_a_version_in_a_path_is_digits_alone(admin: AppClient) -> None:
    """``/admin/models/m/1.0``, ``+01`` and `` 1`` meant version 1 (a DELETE of ``1.0``
    deleted it), where a body refuses 2.0 (found by a helper's fuzzing)."""
    for written in ("1.0", "+1", "%201", "01", "1e0"):
        refused = admin.get(f"/admin/models/{DEMO_MODEL}/{written}", headers=AUTH)
        assert refused.status_code == 422 and "digits alone" in refused.text, (written, refused)
    assert admin.get(f"/admin/models/{DEMO_MODEL}/1", headers=AUTH).status_code == 200


def test_a_lone_surrogate_in_an_admin_body_is_answered_not_a_500(admin: AppClient) -> None:
    """JSON may spell a lone surrogate ("\\ud800") and Python keeps it, but it cannot be
    encoded as UTF-8: every admin 422 echoing one as the input at fault was a 500 with a
    traceback (found by a helper's fuzzing of every route)."""
    headers = {**AUTH, "content-type": "application/json"}
    for body, field in ((b'{"grace_ms": "\\ud800"}', "grace_ms"),
                        (b'{"grace_ms": 140, "reason": "\\ud800"}', "reason"),
                        (b'{"grace_ms": 140, "\\ud800": 1}', "body")):  # fmt: skip
        refused = admin.patch(f"{DEP}/schedule", content=body, headers=headers)
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["loc"][-1] == field  # a key: the body at fault
    done = admin.patch(f"{DEP}/schedule", headers=headers,
                       content=b'{"grace_ms": 140, "reason": "caf\\u00e9"}')  # fmt: skip
    assert done.status_code == 200 and done.json()["deployment"]["schedule"]["grace_ms"] == 140


def test_a_version_deleted_while_a_deployment_of_it_is_created_is_refused_to_one_of_them(
    admin: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create checked its models, then wrote with a plain SET NX: a delete that ran whole in
    between saw no deployment holding the version, so both answered 2xx and the new deployment
    served a deleted model. The create lists its name first and looks for the mark once
    written; a refused create leaves nothing behind."""
    v3 = upload(admin, "weak")
    service = admin.app.state.admin
    write = service.store.create

    def create_meanwhile_deleted(dep: Deployment, **options: Any) -> bool:
        service.delete_model(DEMO_DEPLOYMENT, v3, "other")  # after the create's checks
        return bool(write(dep, **options))

    monkeypatch.setattr(service.store, "create", create_meanwhile_deleted)
    real = {"model": DEMO_DEPLOYMENT, "version": v3}
    refused = admin.post("/admin/deployments", headers=AUTH, json={"name": "late", "real": real})
    assert refused.status_code == 404 and f"version {v3} was deleted" in refused.text
    assert admin.get("/admin/deployments/late", headers=AUTH).status_code == 404
    assert "late" not in service.store.list()  # not even as a name without a state
    monkeypatch.undo()
    real = {"model": DEMO_DEPLOYMENT, "version": 1}
    again = admin.post("/admin/deployments", headers=AUTH, json={"name": "late", "real": real})
    assert again.status_code == 201, again.text
    assert again.json()["revision"] == 1  # nothing of the refused one was kept


def test_a_version_without_class_names_takes_those_of_the_model_it_follows(
    admin: AppClient,
) -> None:
    """An upload for a deployment without ``class_names`` was named "0", "1": promoted, it
    turned every label sent by name ("benign") into a 422, for requests the old real answered
    too (a helper's probe). It now takes the names of the model it follows when its classes
    are the same; given names, or other classes, are its own."""

    def upload(**meta: Any) -> dict[str, Any]:
        resp = admin.post("/admin/models", json=upload_body("weak", **meta), headers=AUTH)
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]

    assert upload()["class_names"] == ["malignant", "benign"]  # the deployment's real's
    assert upload(class_names=["bad", "good"])["class_names"] == ["bad", "good"]
    names = list(demo_data().names)
    own = {"deployment": None, "name": "own", "feature_names": names}
    assert upload(**own)["class_names"] == ["0", "1"]  # a first version: nothing to follow
    upload(**own, class_names=["no", "yes"])
    assert upload(**own)["class_names"] == ["no", "yes"]  # the name's latest version's


def test_reference_rows_give_a_model_of_its_own_features_its_training_statistics(
    admin: AppClient,
) -> None:
    """A model uploaded with feature names of its own had no training statistics nor score
    reference, so every drift and out-of-distribution check stayed off for it (found by
    hand). Held-out rows given with the upload now make them, as the demo's training does."""
    from models.reference import training_spec
    from rendezvous.ood import OodReference

    data = demo_data()
    names = [f"x {n}" for n in data.names]
    x = data.x_test
    columns = ["id", *reversed(names)]  # any order, extra columns left out
    rows = [[float(i), *map(float, reversed(row))] for i, row in enumerate(x)]
    body = upload_body("weak", deployment=None, name="own", feature_names=names,
                       reference={"columns": columns, "rows": rows})  # fmt: skip
    resp = admin.post("/admin/models", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    stored = admin.get("/admin/models/own/1", headers=AUTH).json()
    expected = training_spec(names, x).to_dict()
    assert stored["feature_spec"]["stats"] == expected["stats"]
    assert stored["feature_spec"]["centre"] == expected["centre"]
    reference = stored["score_reference"]
    assert len(reference) == 10 and abs(sum(reference) - 1) < 1e-9
    created = admin.post("/admin/deployments", headers=AUTH,
                         json={"name": "own", "real": {"model": "own", "version": 1}})  # fmt: skip
    assert created.status_code == 201, created.text
    spec = ModelMeta.from_dict(stored).feature_spec
    assert OodReference.from_spec(spec) is not None
    for reference_in, says in (
        ({"columns": names, "rows": rows[:10]}, "give at least 50"),
        ({"columns": names[1:], "rows": [r[2:] for r in rows]}, "no column for features"),
    ):
        body = upload_body("weak", deployment=None, name="own", feature_names=names,
                           reference=reference_in)  # fmt: skip
        refused = admin.post("/admin/models", json=body, headers=AUTH)
        assert refused.status_code == 422 and says in refused.text, refused.text


def test_reference_rows_with_no_spread_or_beyond_float32_are_taken_or_refused_not_a_500(
    admin: AppClient,
) -> None:
    """Found by a fuzzing probe: constant columns, or columns that copy each other, left a
    correlation with no inverse, and a value past float32's range an infinite column: each
    upload was a 500. Now the first two keep no correlation (the diagonal distance, as past
    256 features) and the last is a 422 naming the value."""
    data = demo_data()
    names = [f"x {n}" for n in data.names]
    x = data.x_test[:60]
    constant = [[1.0] * len(names) for _ in range(60)]
    copies = [[float(i % 2)] * len(names) for i in range(60)]
    some_constant = [[*map(float, row[:-1]), 7.0] for row in x]
    for version, rows in enumerate((constant, copies, some_constant), start=1):
        body = upload_body("weak", deployment=None, name="flat", feature_names=names,
                           reference={"columns": names, "rows": rows})  # fmt: skip
        resp = admin.post("/admin/models", json=body, headers=AUTH)
        assert resp.status_code == 201, (version, resp.text)
        spec = admin.get(f"/admin/models/flat/{version}", headers=AUTH).json()["feature_spec"]
        if rows is copies:  # no correlation to keep: the diagonal distance
            assert "centre" not in spec and "diagonal_centre" in spec, spec.keys()
        else:
            assert len(spec["centre"]["whitening"]) == len(names)
    for value in (1e39, -1e308):
        rows = [list(map(float, row)) for row in x]
        rows[7][3] = value
        body = upload_body("weak", deployment=None, name="flat", feature_names=names,
                           reference={"columns": names, "rows": rows})  # fmt: skip
        resp = admin.post("/admin/models", json=body, headers=AUTH)
        assert resp.status_code == 422, resp.text
        assert f"row 7, '{names[3]}'" in resp.text and "beyond float32" in resp.text
    # within float32 but so wide that the dry batch's rows overflow the model: said so
    huge = [[3e38 * (1 if (i + j) % 2 else -1) for j in range(len(names))] for i in range(60)]
    body = upload_body("weak", deployment=None, name="flat", feature_names=names,
                       reference={"columns": names, "rows": huge})  # fmt: skip
    resp = admin.post("/admin/models", json=body, headers=AUTH)
    assert resp.status_code == 422 and "non-finite probabilities" in resp.text, resp.text
    assert "within each feature's training range" in resp.text


def test_an_upload_body_of_millions_of_values_is_refused_before_it_is_parsed(
    admin: AppClient,
) -> None:
    """A JSON upload's reference of one row of millions of numbers was parsed whole (32 bytes
    a number): a 40 MB body held about 900 MB of the gateway (a helper's fuzzing). And a
    metric of NaN or 1e309 was stored as null."""
    head = b'{"name": "huge", "feature_names": ["a"], "onnx_base64": "", "reference": '
    body = head + b'{"columns": ["a"], "rows": [[' + b"0," * 5_300_000 + b"0]]}}"
    refused = admin.post("/admin/models", content=body,
                         headers={**AUTH, "content-type": "application/json"})  # fmt: skip
    assert refused.status_code == 422 and "5000000 values" in refused.text, refused.text
    for value in ("NaN", "1e309"):
        raw = json.dumps(upload_body("weak", metrics={"auc": 0.5})).replace("0.5", value)
        refused = admin.post("/admin/models", content=raw.encode(),
                             headers={**AUTH, "content-type": "application/json"})  # fmt: skip
        assert refused.status_code == 422 and "metrics" in refused.text, refused.text


def test_models_of_other_features_or_classes_never_take_a_role(admin: AppClient) -> None:
    """Only the width was checked: a model declaring the deployment's 30 features in another
    order, or other classes, became a challenger and real, fed the deployment's columns and
    compared on other classes (found by hand)."""
    names = list(reversed(demo_data().names))
    body = upload_body("weak", deployment=None, name="reordered", feature_names=names)
    assert admin.post("/admin/models", json=body, headers=AUTH).status_code == 201
    for call in (
        admin.post(f"{DEP}/promote", json={"model": "reordered", "version": 1}, headers=AUTH),
        admin.post(
            f"{DEP}/challengers",
            json={"role": "r", "model": "reordered", "version": 1},
            headers=AUTH,
        ),
        admin.post(
            f"{DEP}/replays", json={"model": "reordered", "version": 1, "last": 10}, headers=AUTH
        ),
    ):
        assert call.status_code == 422, call.text
        assert "feeds 'mean radius'" in call.json()["detail"]


def test_wrong_width_models_never_take_a_role(admin: AppClient) -> None:
    body = upload_body(
        "narrow", deployment=None, name="narrow-model", feature_names=[f"f{i}" for i in range(10)]
    )
    resp = admin.post("/admin/models", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    for call in (
        admin.post(f"{DEP}/promote", json={"model": "narrow-model", "version": 1}, headers=AUTH),
        admin.post(
            f"{DEP}/challengers",
            json={"role": "n", "model": "narrow-model", "version": 1},
            headers=AUTH,
        ),
    ):
        assert call.status_code == 422 and "takes 10 features" in call.json()["detail"]
    created = admin.post(
        "/admin/deployments",
        headers=AUTH,
        json={"name": "narrow", "real": {"model": "narrow-model", "version": 1}},
    )
    assert created.status_code == 201, created.text
    assert created.json()["feature_spec"]["names"][0] == "f0"
    assert admin.app.state.deployments.get("narrow").revision == 1
    assert (
        admin.post(
            "/admin/deployments",
            headers=AUTH,
            json={"name": "narrow", "real": {"model": "narrow-model", "version": 1}},
        ).status_code
        == 409
    )
    listed = admin.get("/admin/deployments", headers=AUTH).json()["deployments"]
    assert {d["name"] for d in listed} == {DEMO_DEPLOYMENT, "narrow"}


def test_challengers_and_schedule(admin: AppClient, r: redis.Redis) -> None:
    v3 = upload(admin, "weak")
    stream = names.input_stream(DEMO_DEPLOYMENT)
    last = r.xadd(stream, {b"d": b"old entry"})
    resp = admin.post(f"{DEP}/challengers", json={"role": "shadow", "version": v3}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    groups = {g["name"].decode(): g for g in r.xinfo_groups(stream)}
    assert groups["model:shadow"]["last-delivered-id"] == last, "starts at the end: no replay"
    assert groups["model:real"]["last-delivered-id"] == b"0-0"
    assert admin.app.state.deployments.get(DEMO_DEPLOYMENT).role_names == [
        "real",
        "canary",
        "shadow",
    ]

    dup = admin.post(f"{DEP}/challengers", json={"role": "shadow", "version": 1}, headers=AUTH)
    assert dup.status_code == 409
    bad = admin.patch(
        f"{DEP}/schedule", json={"timeout_ms": 10, "real_deadline_ms": 20}, headers=AUTH
    )
    assert bad.status_code == 422 and "real_deadline_ms" in bad.json()["detail"]
    ghost = admin.patch(f"{DEP}/schedule", json={"splits": {"ghost": 0.5}}, headers=AUTH)
    assert ghost.status_code == 422
    # found by hand: each was taken (200); the first two then made every predict a 500 or lost
    # every decision record, the others named a fallback that never answers
    revision = admin.app.state.deployments.get(DEMO_DEPLOYMENT).revision
    for body, says in [
        ({"timeout_ms": 1e300}, "timeout_ms"),
        ({"grace_ms": 1e12}, "grace_ms"),
        ({"real_deadline_ms": 600_001, "timeout_ms": 600_001}, "real_deadline_ms"),
        ({"split_seed": 2**64}, "split_seed"),
        ({"split_seed": -(2**63) - 1}, "split_seed"),
        ({"fallbacks": ["canery"]}, "fallback 'canery' is not a role of breast-cancer (roles: "),
        ({"fallbacks": ["canary", "canary"]}, "fallback 'canary' is named twice"),
    ]:
        refused = admin.patch(f"{DEP}/schedule", json=body, headers=AUTH)
        assert refused.status_code == 422 and says in str(refused.json()["detail"]), (
            body,
            refused.text,
        )
    assert admin.app.state.deployments.get(DEMO_DEPLOYMENT).revision == revision
    ok = admin.patch(
        f"{DEP}/schedule",
        headers=AUTH,
        json={
            "real_deadline_ms": 80,
            "grace_ms": 50,
            "fallbacks": ["canary", "shadow"],
            "splits": {"shadow": 0.25},
            "split_seed": 11,
            "reason": "ab test",
        },
    )
    assert ok.status_code == 200, ok.text
    sched = admin.app.state.deployments.get(DEMO_DEPLOYMENT).schedule
    assert (
        sched.real_deadline_ms,
        sched.grace_ms,
        sched.fallbacks,
        sched.splits,
        sched.split_seed,
    ) == (80, 50, ("canary", "shadow"), (("shadow", 0.25),), 11)

    assert admin.delete(f"{DEP}/challengers/real", headers=AUTH).status_code == 409
    assert admin.delete(f"{DEP}/challengers/nobody", headers=AUTH).status_code == 404
    gone = admin.delete(f"{DEP}/challengers/shadow", params={"reason": "done"}, headers=AUTH)
    assert gone.status_code == 200, gone.text
    assert "model:shadow" not in {g["name"].decode() for g in r.xinfo_groups(stream)}
    left = admin.app.state.deployments.get(DEMO_DEPLOYMENT).schedule
    assert (left.splits, left.fallbacks) == ((), ("canary",))
    # what the deployment shows may be sent back (a fallback left behind was refused)
    shown = admin.get(DEP, headers=AUTH).json()["schedule"]["fallbacks"]
    again = admin.patch(f"{DEP}/schedule", headers=AUTH, json={"fallbacks": shown})
    assert again.status_code == 200, again.text
    actions = [h["action"] for h in admin.get(f"{DEP}/history", headers=AUTH).json()["history"]]
    assert actions == ["create", "add-challenger", "set-schedule", "remove-challenger",
                       "set-schedule"]  # fmt: skip


def _record(rid: str, ts_ms: float, p_real: float, p_cand: float) -> dict[str, bytes]:
    def res(role: str, version: int, p: float) -> ModelResult:
        import numpy as np

        return ModelResult(
            rid,
            DEMO_DEPLOYMENT,
            "breast-cancer",
            version,
            role,
            [int(p > 0.5)],
            np.array([[1 - p, p]], np.float32),
            [0, 1],
            0.2,
            0.1,
            extra={"arrived_ms": 3.0},
        )

    results = {"real": res("real", 2, p_real), "cand": res("cand", 3, p_cand)}
    return build_decision(
        request_id=rid,
        deployment=DEMO_DEPLOYMENT,
        started_ms=ts_ms,
        expected_roles=["real", "cand"],
        results=results,
        chosen_role="real",
        outcome="real",
        answered_after_ms=3.0,
    ).encode()


def test_gate_refuses_short_evidence_records_it_and_accepts_once_it_is_there(
    admin: AppClient, r: redis.Redis
) -> None:
    import time

    v3 = upload(admin, "weak")
    assert (
        admin.post(
            f"{DEP}/challengers", json={"role": "cand", "version": v3}, headers=AUTH
        ).status_code
        == 201
    )
    gate = {"version": v3, "min_shadow_requests": 5, "max_disagreement": 0.25}
    refused = admin.post(f"{DEP}/promote", json=gate, headers=AUTH)
    assert refused.status_code == 409
    assert refused.json()["gate"]["shadow"]["scored"] == 0
    assert "needs at least 5" in refused.json()["detail"]

    stream = names.decisions_stream(DEMO_DEPLOYMENT)
    now_ms = time.time() * 1000
    r.xadd(stream, _record("before-the-role", now_ms - 60_000, 0.9, 0.1))  # not counted
    for i in range(4):
        r.xadd(stream, _record(f"ok-{i}", now_ms + i, 0.9, 0.8))
    r.xadd(stream, _record("disagree", now_ms + 5, 0.9, 0.2))
    shadow = admin.get(f"{DEP}/shadow", headers=AUTH).json()["roles"]["cand"]
    assert (shadow["scored"], shadow["disagreements"]) == (5, 1)
    assert shadow["disagreement_rate"] == pytest.approx(0.2)
    assert shadow["latency_p50_ms"] == pytest.approx(3.0)

    strict = admin.post(f"{DEP}/promote", json={**gate, "max_disagreement": 0.1}, headers=AUTH)
    assert strict.status_code == 409 and "0.2000 of rows" in strict.json()["detail"]
    accepted = admin.post(f"{DEP}/promote", json=gate, headers=AUTH)
    assert accepted.status_code == 200, accepted.text
    assert roles(admin) == {"real": "breast-cancer:3", "canary": "breast-cancer:2"}

    # real itself: said so before any gate (it judged real against itself, and recorded it)
    same = admin.post(f"{DEP}/promote", json={**gate, "max_disagreement": 0.01}, headers=AUTH)
    assert same.status_code == 409 and "is already the real model" in same.json()["detail"]
    history = admin.get(f"{DEP}/history", headers=AUTH).json()["history"]
    refusals = [h for h in history if h["action"] == "promote-refused"]
    assert len(refusals) == 2 and not any(h["applied"] for h in refusals)
    assert refusals[0]["detail"]["gate"]["shortfalls"]
    assert history[-1]["action"] == "promote" and history[-1]["detail"]["gate"]["forced"] is False
    # forcing past a refusal is allowed and recorded
    forced = admin.post(
        f"{DEP}/promote",
        headers=AUTH,
        json={"version": 2, "min_shadow_requests": 1000, "force": True},
    )
    assert forced.status_code == 200, forced.text
    last = admin.get(f"{DEP}/history", headers=AUTH).json()["history"][-1]
    assert last["detail"]["force"] and last["detail"]["gate"]["forced"]


def test_names_ending_in_a_newline_and_versions_past_2_31_are_refused_422(
    admin: AppClient,
) -> None:
    calls = [
        admin.post(
            "/admin/deployments",
            headers=AUTH,
            json={"name": "zz\n", "real": {"model": DEMO_MODEL, "version": 2}},
        ),
        admin.post(
            f"{DEP}/challengers",
            headers=AUTH,
            json={"role": "cand\n", "model": DEMO_MODEL, "version": 1},
        ),
        admin.post("/admin/models", headers=AUTH, json=upload_body("weak", name="evil\n")),
        admin.post(f"{DEP}/promote", headers=AUTH, json={"version": 2**64}),
        admin.get(f"/admin/models/{DEMO_MODEL}/{2**31}", headers=AUTH),
    ]
    for call in calls:
        assert call.status_code == 422, call.text
    listed = admin.get("/admin/deployments", headers=AUTH).json()["deployments"]
    assert {d["name"] for d in listed} == {DEMO_DEPLOYMENT}


def test_partitions_are_set_by_patch_with_their_groups_and_old_streams_kept(
    admin: AppClient, r: redis.Redis
) -> None:
    resp = admin.patch(DEP, json={"partitions": 3, "reason": "busy"}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["deployment"]["partitions"] == 3
    assert resp.json()["detail"] == {"partitions": [1, 3]}
    streams = names.input_streams(DEMO_DEPLOYMENT, 3)
    for stream in streams:  # every group on every partition, from its start
        groups = {g["name"].decode(): g for g in r.xinfo_groups(stream)}
        assert set(groups) == {"logbin", "model:real", "model:canary"}, stream
    assert admin.app.state.deployments.get(DEMO_DEPLOYMENT).partitions == 3
    shrunk = admin.patch(DEP, json={"partitions": 2}, headers=AUTH).json()["deployment"]
    assert shrunk["partitions"] == 2 and shrunk["past_partitions"] == [3]
    same = admin.patch(DEP, json={"partitions": 2}, headers=AUTH)
    assert same.status_code == 409
    for bad in (
        {"partitions": 0},
        {"partitions": 65},
        {},
        {"partitions": 2, "x": 1},
        {"partitions": "3"},
        {"partitions": 3.0},
    ):  # coerced, found by a helper's probe
        refused = admin.patch(DEP, json=bad, headers=AUTH)
        assert refused.status_code == 422, (bad, refused.text)
    history = admin.get(f"{DEP}/history", headers=AUTH).json()
    assert [e["action"] for e in history["history"][-2:]] == ["set-partitions"] * 2
    r.xadd(streams[1], {b"d": b"one"})
    view = admin.get(DEP, headers=AUTH).json()["input"]  # per-partition backlog
    assert [v["stream"] for v in view] == names.input_streams(DEMO_DEPLOYMENT, 2) + streams[1:]
    assert [v["published_to"] for v in view] == [True, True, False, False]
    one = next(v for v in view if v["stream"] == streams[1])
    assert one["length"] == 1 and set(one["groups"]) == {"logbin", "model:real", "model:canary"}


def test_a_deleted_deployment_is_gone_to_callers_and_refused_every_change(
    admin: AppClient, r: redis.Redis
) -> None:
    """Without a log bin to purge it, a deleted deployment stays deleted: every way in says so
    (404), a second create is a 409 until it is purged, and its history stays readable."""
    path = f"/admin/deployments/{DEMO_DEPLOYMENT}"
    assert admin.delete("/admin/deployments/nope", headers=AUTH).status_code == 404
    deleted = admin.delete(path, params={"reason": "retired"}, headers=AUTH)
    assert deleted.status_code == 202, deleted.text
    assert deleted.json()["action"] == "delete"
    for method, url, body in (
        ("DELETE", path, None),
        ("GET", path, None),
        ("PATCH", path, {"partitions": 2}),
        ("PATCH", f"{path}/schedule", {"timeout_ms": 900}),
        ("POST", f"{path}/rollback", {}),
        ("GET", f"{path}/shadow", None),
    ):
        answer = admin.request(method, url, json=body, headers=AUTH)
        assert answer.status_code == 404, (method, url, answer.text)
        assert "was deleted at" in answer.json()["detail"], answer.text
    predicted = admin.post(PREDICT, json=features_body(np.asarray(demo_data().x_test[0])))
    assert predicted.status_code == 404 and "deleted" in predicted.json()["detail"]
    listed = admin.get("/admin/deployments", headers=AUTH).json()["deployments"]
    assert DEMO_DEPLOYMENT not in [d["name"] for d in listed]
    real = demo_deployment(ModelRegistry(data_dir(admin) / "models"), Schedule()).roles["real"]
    body = {"name": DEMO_DEPLOYMENT, "real": {"model": real.name, "version": real.version}}
    created = admin.post("/admin/deployments", json=body, headers=AUTH)
    assert created.status_code == 409 and "still draining" in created.json()["detail"]
    history = admin.get(f"{path}/history", headers=AUTH).json()["history"]
    assert (history[-1]["action"], history[-1]["reason"]) == ("delete", "retired")
    # no history: 404 as for the other routes; a name none can have 422, as on every route
    for name, status in (("nope", 404), ("BAD%20NAME", 422)):
        assert admin.get(f"/admin/deployments/{name}/history", headers=AUTH).status_code == status
    assert r.exists(names.input_stream(DEMO_DEPLOYMENT))  # kept for its readers to drain


def test_a_deployment_state_this_version_cannot_read_is_a_409_on_every_route(
    admin: AppClient, r: redis.Redis
) -> None:
    """A state a newer version wrote (a rolling upgrade) or a damaged one: every admin route
    answers it with a status that names the deployment, never a 500 (one was, found by a
    helper's upgrade probe); the lists leave it out; a model delete cannot tell whether the
    deployment holds the version, so it is refused rather than risked."""
    key = names.deployment_key(DEMO_DEPLOYMENT)
    good = r.get(key)
    assert good is not None
    r.set(key, good.replace(b'"roles"', b'"rolez"'))
    statuses: dict[tuple[str, str], int] = {}
    for method, path in admin_routes(admin):
        if "{deployment}" not in path and path != "/admin/models/{name}/{version}":
            continue
        resp = admin.request(method, fill(path), json={}, headers=AUTH)
        statuses[method, path] = resp.status_code
        assert resp.status_code < 500, (method, path, resp.text)
    shown = admin.get(DEP, headers=AUTH)
    assert shown.status_code == 409, shown.text
    assert DEMO_DEPLOYMENT in shown.json()["detail"] and "cannot" in shown.json()["detail"]
    promote = admin.post(f"{DEP}/promote", json={"version": 1}, headers=AUTH)
    assert promote.status_code == 409 and DEMO_DEPLOYMENT in promote.json()["detail"]
    held = admin.delete("/admin/models/breast-cancer/1", headers=AUTH)
    assert held.status_code == 409 and DEMO_DEPLOYMENT in held.json()["detail"], held.text
    assert r.get(key) == good.replace(b'"roles"', b'"rolez"')  # nothing rewrote it
    assert DEMO_DEPLOYMENT not in admin.get("/admin/deployments", headers=AUTH).text
    r.set(key, good)
    assert admin.get(DEP, headers=AUTH).status_code == 200


def test_a_deployment_another_process_made_or_deleted_is_named_as_it_is(
    admin: AppClient, demo_registry: ModelRegistry
) -> None:
    """From a helper's churn probe: the drift thresholds' routes read this process's cache,
    so a deployment just made through another gateway process was a 404 there; and a model
    held only by a deleted deployment, still draining, was refused with "promote or remove it
    first", which a deleted deployment refuses."""
    v3 = upload(admin, "weak")
    service = admin.app.state.admin
    made = dataclasses.replace(demo_deployment(demo_registry, Schedule()), name="elsewhere",
                               roles={"real": ModelRef(DEMO_DEPLOYMENT, v3)})  # fmt: skip
    service.store.create(made)  # as another process would: this one's cache has not seen it
    put = admin.put("/admin/deployments/elsewhere/drift/thresholds", json={}, headers=AUTH)
    assert put.status_code == 200, put.text
    gone = admin.get("/admin/deployments/nowhere/drift/thresholds", headers=AUTH)
    assert gone.status_code == 404
    assert admin.delete("/admin/deployments/elsewhere", headers=AUTH).status_code == 202
    held = admin.delete(f"/admin/models/{DEMO_DEPLOYMENT}/{v3}", headers=AUTH)
    assert held.status_code == 409 and "still draining" in held.json()["detail"], held.text
    assert "elsewhere/real" in held.json()["detail"]


def test_a_change_applied_is_not_answered_503_when_the_cache_refresh_after_it_fails(
    admin: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a helper's probe on a real cluster: a master killed under a rollback, the
    sync client (the change) found the new master before the gateway's async client (the
    cache refresh after it), so each rollback landed and was answered 503 'Redis is
    unavailable' with Retry-After: six sent in a second, six applied (a second undoes the
    first), the operator told each time that nothing happened."""
    cache = admin.app.state.deployments

    async def down() -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:7002")

    v3 = upload(admin, "weak")
    monkeypatch.setattr(cache, "refresh", down)
    resp = admin.post(f"{DEP}/promote", json={"version": v3}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    back = admin.post(f"{DEP}/rollback", json={}, headers=AUTH)
    assert back.status_code == 200, back.text
    assert roles(admin) == {"real": "breast-cancer:2", "canary": "breast-cancer:1"}
