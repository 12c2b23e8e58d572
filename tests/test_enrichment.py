"""Enrichment before the stream (issue 17 part 3): features a deployment looks up by entity
from the online store, merged with the caller's before the envelope is published, so that the
archive holds the raw request, the looked-up values and the final features the models saw.

Pure checks of the spec, the merge, the envelope and the archive record; then the whole path
with real processes (gateway, real worker, log bin, ``rdv features load``) on a single Redis
and on a real Redis Cluster."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from redis.crc import key_slot

from gateway.dataplane.entity_features import read_entities
from gateway.dataplane.validation import enriched_rows, merged, parse_body, to_matrix
from models.archive import ArchiveReader
from models.archive_line import record_from_envelope
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import PREDICT, System, launch_system, wait_until
from rdv_client import Client, RdvError
from rendezvous import names
from rendezvous.bus.async_router import Router
from rendezvous.bus.connection import connect_async
from rendezvous.bus.failures import REDIS_FAILURES
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.envelope import RequestEnvelope
from rendezvous.schedule import Schedule
from rendezvous.spec import FeatureSpec, Lookup

SPEC = FeatureSpec.from_names(["a", "b", "c", "d"]).with_lookup(
    Lookup("customer_id", ("d", "b"), {"b": 9.0})
)


def _refusal(call) -> list[dict]:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestValidationError) as caught:
        call()
    return list(caught.value.errors())


async def test_a_lookup_waits_no_longer_than_its_request_may(tmp_path: Path) -> None:
    """The lookup goes by the hot path's router, bounded by the deployment's timeout: through
    redis-py's cluster client, enriched requests caught by a failover waited out its retries
    (3-4 s) and by a stalled node 5 s, well past their timeout, where the others got a quick
    503 (found by hand)."""
    server = EmbeddedRedis(tmp_path).start()
    client = await connect_async(server.url, timeout_s=5.0)
    router = Router(client, timeout_s=5.0)
    try:
        lookup = SPEC.lookup
        assert lookup is not None
        await client.hset(names.entity_key("dep", "e-1"), mapping={"d": "4.5", "b": "2"})
        stored = await read_entities(router, "dep", lookup, ["e-1", "e-1", "none"], 0.5)
        assert stored == {"e-1": [b"4.5", b"2"], "none": [None, None]}
        await client.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # a stalled node
        t0 = time.monotonic()
        with pytest.raises(REDIS_FAILURES):
            await read_entities(router, "dep", lookup, ["e-1"], 0.3)
        assert time.monotonic() - t0 < 1.0
    finally:
        await router.close()
        await client.aclose()
        server.stop()


# -- pure --------------------------------------------------------------------------------------


def test_a_lookup_travels_with_the_spec_and_leaves_its_layout_alone() -> None:
    doc = json.loads(json.dumps(SPEC.to_dict()))
    assert doc["lookup"] == {"key": "customer_id", "features": ["d", "b"], "defaults": {"b": 9.0}}
    assert FeatureSpec.from_dict(doc) == SPEC
    plain = SPEC.with_lookup(None)
    assert "lookup" not in plain.to_dict() and plain.caller_names == plain.names
    assert SPEC.version == plain.version  # the models' input layout is the same
    assert SPEC.caller_names == ("a", "c")
    for bad in (
        dict(key="k", features=("zz",)),  # not in the spec
        dict(key="k", features=("a",), defaults={"b": 1.0}),  # default of no looked-up feature
        dict(key="k", features=("a",), defaults={"a": float("nan")}),
        dict(key="", features=("a",)),
    ):
        with pytest.raises(ValueError):
            SPEC.with_lookup(Lookup(**bad))  # type: ignore[arg-type]


def test_entity_keys_stay_in_the_deployments_slot() -> None:
    key = names.entity_key("dep", "c-17@x.org")
    assert key == "rdv:{dep}:entity:c-17@x.org"
    assert key_slot(key.encode()) == key_slot(names.deployment_key("dep").encode())
    for bad in ("", "c 17", "c{x}", "c*", "x" * 129, "é"):
        with pytest.raises(names.InvalidName):
            names.entity_key("dep", bad)


def test_the_callers_part_and_the_stored_values_merge_by_the_spec() -> None:
    body = b'{"entities": ["c-1", "c-2", "c-1"], "instances": [[1, 3], [5, 7], [2, 4]]}'
    caller, entities = enriched_rows(SPEC, parse_body(body, SPEC, 10), 10)
    assert entities == ["c-1", "c-2", "c-1"]
    stored = {"c-1": [b"4.5", b"-2"], "c-2": [b"8", None]}  # c-2 has no b: its default
    x, looked_up = merged(SPEC, caller, entities, stored)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1, -2, 3, 4.5], [5, 9, 7, 8], [2, -2, 4, 4.5]])
    assert looked_up[0] == {"entity": "c-1", "found": True, "values": {"d": 4.5, "b": -2.0}}
    assert looked_up[1] == {
        "entity": "c-2", "found": True, "values": {"d": 8.0, "b": 9.0}, "defaulted": ["b"]
    }  # fmt: skip

    one = parse_body(b'{"entity": "c-1", "features": {"c": 3, "a": 1}}', SPEC, 10)
    caller, entities = enriched_rows(SPEC, one, 10)
    x, _ = merged(SPEC, caller, entities, {"c-1": [b"4.5", b"-2"]})
    np.testing.assert_array_equal(x, [[1, -2, 3, 4.5]])


def test_a_missing_entity_is_named_unless_defaults_fill_it() -> None:
    body = b'{"entities": ["c-1", "gone-7"], "instances": [[1, 2], [3, 4]]}'
    caller, entities = enriched_rows(SPEC, parse_body(body, SPEC, 10), 10)
    stored = {"c-1": [b"1", b"2"], "gone-7": [None, None]}
    [error] = _refusal(lambda: merged(SPEC, caller, entities, stored))
    assert error["loc"] == ("body", "entities", 1) and error["type"] == "entity_not_found"
    assert "customer_id 'gone-7' not found" in error["msg"] and "'d'" in error["msg"]
    full = SPEC.with_lookup(Lookup("customer_id", ("d", "b"), {"b": 9.0, "d": -1.0}))
    x, looked_up = merged(full, caller, entities, stored)
    np.testing.assert_array_equal(x[1], [3, 9, 4, -1])
    assert looked_up[1] == {"entity": "gone-7", "found": False, "values": {"d": -1.0, "b": 9.0},
                            "defaulted": ["d", "b"]}  # fmt: skip
    caller, entities = enriched_rows(
        SPEC, parse_body(b'{"entity": "c-1", "features": {"a": 1, "c": 2}}', SPEC, 10), 10
    )
    cases = [([None, b"2"], "entity_incomplete"), ([b"nan", b"2"], "entity_value"),
             ([b"1e39", b"2"], "entity_value"), ([b"x", b"2"], "entity_value")]  # fmt: skip
    for stored, kind in cases:
        [error] = _refusal(lambda s=stored: merged(SPEC, caller, entities, {"c-1": s}))
        assert error["type"] == kind and "'c-1'" in error["msg"], error


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"entity": "c 1", "features": {"a": 1, "c": 3}}', "invalid customer_id 'c 1'"),
        (b'{"entities": ["ok", "c*"], "instances": [[1, 2], [3, 4]]}', "invalid customer_id 'c*'"),
        (b'{"entity": 17, "features": {"a": 1, "c": 3}}', "valid string"),
        (b'{"entity": "c1", "features": {"a": 1, "c": 3, "d": 1}}', "'d' is looked up"),
        (b'{"features": {"a": 1, "c": 3}}', "looks up features by customer_id"),
        (b'{"entity": "c1", "features": {"a": 1}}', "missing feature 'c'"),
        (b'{"entities": ["c1"], "instances": [[1, 2], [3, 4]]}', "1 entities for 2 instances"),
        (b'{"entities": ["c1"]}', "send 'instances'"),
        (b'{"entity": "c1", "entities": ["c1"], "features": {"a": 1, "c": 3}}', "send 'entity'"),
    ],
)
def test_bad_bodies_are_refused_naming_the_fault(body: bytes, needle: str) -> None:
    errors = _refusal(lambda: enriched_rows(SPEC, parse_body(body, SPEC, 10), 10))
    assert any(needle in e["msg"] for e in errors), errors


def test_a_full_batch_with_its_entities_is_taken() -> None:
    """The bound on arrays opened did not count the ``entities`` array: a batch of
    ``max_rows`` rows was refused as too many rows (found by a probe)."""
    rows = 10
    body = json.dumps({"entities": [f"c{i}" for i in range(rows)],
                       "instances": [[1.0, 2.0]] * rows}).encode()  # fmt: skip
    x, entities = enriched_rows(SPEC, parse_body(body, SPEC, rows), rows)
    assert x.shape == (rows, 2) and len(entities) == rows
    over = body.replace(b'"instances": [', b'"instances": [[1.0, 2.0], ')
    [error] = _refusal(lambda: parse_body(over, SPEC, rows))
    assert "at most 10 rows" in error["msg"]


def test_a_deployment_without_a_lookup_refuses_an_entity() -> None:
    plain = SPEC.with_lookup(None)
    body = b'{"entity": "c-1", "features": {"a": 1, "b": 2, "c": 3, "d": 4}}'
    [error] = _refusal(lambda: to_matrix(plain, parse_body(body, plain, 10), 10))
    assert error["loc"] == ("body", "entity") and "looks no features up" in error["msg"]


def test_the_envelope_and_the_archive_carry_raw_looked_up_and_final_features() -> None:
    raw = b'{"entity": "c-1", "features": {"a": 1, "c": 3}}'
    looked_up = [{"entity": "c-1", "found": True, "values": {"d": 4.5, "b": -2.0}}]
    x = np.array([[1, -2, 3, 4.5]], np.float32)
    env = RequestEnvelope("r1", "dep", "reply", 10, 5.0, raw, x, SPEC.version, looked_up)
    back = RequestEnvelope.decode(env.encode())
    assert back.looked_up == looked_up and back.raw == raw
    np.testing.assert_array_equal(back.features, x)
    record = json.loads(record_from_envelope("1-0", back, 7.0))
    assert record["raw"] == json.loads(raw)
    assert record["looked_up"] == looked_up
    assert record["features"] == [[1.0, -2.0, 3.0, 4.5]]
    plain = RequestEnvelope("r2", "dep", "reply", 10, 5.0, raw, x, SPEC.version)
    assert RequestEnvelope.decode(plain.encode()).looked_up is None
    assert "looked_up" not in json.loads(record_from_envelope("2-0", plain, 7.0))


# -- the whole path, real processes ------------------------------------------------------------

TOKEN = "enrichment-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEDULE = Schedule(real_deadline_ms=200, timeout_ms=2000, fallbacks=(), grace_ms=20)
DATA = demo_data()
LOOKED_UP = tuple(DATA.names[20:25])  # the "worst ..." radius, texture, perimeter, area, smoothness
LOOKUP = {"key": "customer_id", "features": list(LOOKED_UP)}
COLS = [DATA.names.index(n) for n in LOOKED_UP]
CALLER = [n for n in DATA.names if n not in LOOKED_UP]
ENTITY_ROWS = {f"c-{k}": DATA.x_test[40 + k] for k in range(6)}
"""Each entity's stored features: those of another test row than the caller's."""


def stored_values(entity: str) -> dict[str, float]:
    return {n: float(ENTITY_ROWS[entity][c]) for n, c in zip(LOOKED_UP, COLS, strict=True)}


def merged_row(caller_row: np.ndarray, values: dict[str, float]) -> np.ndarray:
    x = caller_row.astype(np.float32).copy()
    for name, col in zip(LOOKED_UP, COLS, strict=True):
        x[col] = values[name]
    return x


def caller_part(row: np.ndarray) -> dict[str, float]:
    return {n: float(row[DATA.names.index(n)]) for n in CALLER}


@pytest.fixture(scope="module")
def system(
    bus_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(bus_url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_ADMIN_TOKEN=TOKEN) as sys_:  # fmt: skip
        sys_.start_worker("real")
        yield sys_


@pytest.fixture(scope="module")
def real(demo_data_dir: Path) -> OnnxClassifier:
    """The deployment's real model, run here on the merged features."""
    registry = ModelRegistry(demo_data_dir / "models")
    return OnnxClassifier(registry.artifact_path("breast-cancer", 2),
                          registry.meta("breast-cancer", 2))  # fmt: skip


def admin(system: System, method: str, path: str, auth: bool = True, **kw: Any) -> httpx.Response:
    url = f"/admin/deployments/{DEMO_DEPLOYMENT}{path}"
    return system.http.request(method, url, headers=AUTH if auth else {}, **kw)


def archived(system: System, request_ids: set[str]) -> dict[str, dict]:
    """The archive records of ``request_ids``, once the log bin has written them all."""
    reader = ArchiveReader(system.data_dir / "logbin")

    def found() -> dict[str, dict] | None:
        records = {r["request_id"]: r for r in reader.records(DEMO_DEPLOYMENT)}
        return records if request_ids <= set(records) else None

    return wait_until(found, 10, f"the archive records of {sorted(request_ids)}")  # type: ignore[no-any-return]


def rdv_features_load(system: System, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "features", "load", "--deployment",
         DEMO_DEPLOYMENT, "--file", str(path), "--url", str(system.http.base_url)],
        env=system.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def enriched(system: System, tmp_path_factory: pytest.TempPathFactory) -> System:
    """The demo deployment looks 5 features up by customer_id; c-0..c-5 are loaded: c-0..c-2
    from CSV and c-3, c-4 from JSON lines by ``rdv features load``, c-5 by the admin API."""
    # loading before a lookup is declared is refused, naming the way
    early = admin(system, "PUT", "/entities", json=[{"customer_id": "c-0", LOOKED_UP[0]: 1.0}])
    assert early.status_code == 409 and "enrichment" in early.json()["detail"]
    nothing = admin(system, "PATCH", "/enrichment", json={"lookup": None})  # said "already has"
    assert nothing.status_code == 409 and "no lookup to drop" in nothing.text, nothing.text
    resp = admin(system, "PATCH", "/enrichment", json={"lookup": LOOKUP, "reason": "store"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["deployment"]["feature_spec"]["lookup"] == {**LOOKUP, "defaults": {}}
    [entry] = admin(system, "GET", "/history", params={"limit": 1}).json()["history"]
    assert entry["action"] == "set-enrichment" and entry["reason"] == "store"
    assert entry["detail"]["lookup"] == [None, {**LOOKUP, "defaults": {}}]

    folder = tmp_path_factory.mktemp("entities")
    csv_file = folder / "entities.csv"
    lines = [",".join(["customer_id", *LOOKED_UP])]
    lines.append(",".join(["c-0", *(repr(v + 1) for v in stored_values("c-0").values())]))
    for e in ("c-0", "c-1", "c-2"):  # c-0 again: an update, the later values stored
        lines.append(",".join([e, *(repr(v) for v in stored_values(e).values())]))
    csv_file.write_text("\n".join(lines) + "\n")
    jsonl_file = folder / "entities.jsonl"
    jsonl_file.write_text("".join(json.dumps({"customer_id": e, **stored_values(e)}) + "\n"
                                  for e in ("c-3", "c-4")))  # fmt: skip
    for path, count, distinct in ((csv_file, 4, 3), (jsonl_file, 2, 2)):
        done = rdv_features_load(system, path)
        assert done.returncode == 0, done.stderr
        said = json.loads(done.stdout)
        assert (said["loaded"], said["entities"]) == (count, distinct), said
        assert f"features load: {count}/{count} rows (100%)" in done.stderr  # 4 rows, 3 entities
        # an entity named twice is said (it was silent, and counted twice: a helper's probe)
        twice = (f"{path}: 1 rows name an entity an earlier row named (the first: customer_id "
                 "'c-0', lines 2 and 3); the later values are stored")  # fmt: skip
        assert (twice in done.stderr) == (path == csv_file), done.stderr
    resp = admin(system, "PUT", "/entities", json=[{"customer_id": "c-5", **stored_values("c-5")}])
    assert resp.status_code == 200 and resp.json()["loaded"] == 1, resp.text
    # one feature short: found, but incomplete (and no default)
    short = dict(list(stored_values("c-0").items())[:4])
    assert admin(system, "PUT", "/entities", json=[{"customer_id": "half", **short}]).is_success
    shown = admin(system, "GET", "/entities/c-3").json()
    assert shown["features"] == pytest.approx(stored_values("c-3"))
    assert system.r.hgetall(names.entity_key(DEMO_DEPLOYMENT, "c-5"))
    return system


def test_predictions_score_the_merged_features_and_the_archive_shows_all_three(
    enriched: System, real: OnnxClassifier
) -> None:
    system = enriched
    x = DATA.x_test
    one = {"entity": "c-1", "features": caller_part(x[0])}
    batch_entities = ["c-4", "c-0", "c-5", "c-4"]
    batch = {"entities": batch_entities, "instances": [[float(x[k][DATA.names.index(n)])
             for n in CALLER] for k in range(1, 5)]}  # fmt: skip
    want = {
        "enr-one": merged_row(x[0], stored_values("c-1"))[None, :],
        "enr-batch": np.stack([merged_row(x[k], stored_values(e))
                               for k, e in zip(range(1, 5), batch_entities, strict=True)]),
    }  # fmt: skip
    sent = {"enr-one": one, "enr-batch": batch}
    for rid, body in sent.items():
        resp = system.predict(body, **{"X-Request-Id": rid})
        assert resp.status_code == 200, resp.text
        labels, proba = real.predict(want[rid])
        got = resp.json()["predictions"]
        assert [p["label"] for p in got] == labels.tolist()
        assert [p["probabilities"]["1"] for p in got] == pytest.approx(proba[:, 1].tolist(),
                                                                        abs=1e-6)  # fmt: skip

    archive = archived(system, set(sent))
    for rid, body in sent.items():
        record = archive[rid]
        assert record["raw"] == body  # the caller's request, as sent
        np.testing.assert_array_equal(np.asarray(record["features"], np.float32), want[rid])
    [looked] = archive["enr-one"]["looked_up"]
    assert looked["entity"] == "c-1" and looked["found"] is True
    assert looked["values"] == pytest.approx(stored_values("c-1"))
    assert [lu["entity"] for lu in archive["enr-batch"]["looked_up"]] == batch_entities
    assert "defaulted" not in looked


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"entity": "c-404", "features": caller_part(DATA.x_test[0])}, "'c-404' not found"),
        ({"entity": "half", "features": caller_part(DATA.x_test[0])}, "'half' has no stored"),
        ({"entities": ["c-0", "c-999"], "instances": [[0.5] * len(CALLER)] * 2}, "'c-999'"),
        ({"entity": "c 0", "features": caller_part(DATA.x_test[0])}, "invalid customer_id"),
        ({"entity": "c-0", "features": {n: 1.0 for n in DATA.names}}, "is looked up"),
        ({"features": caller_part(DATA.x_test[0])}, "looks up features by customer_id"),
    ],
)
def test_refusals_are_422_naming_the_entity_and_publish_nothing(
    enriched: System, body: dict, needle: str
) -> None:
    stream = names.input_stream(DEMO_DEPLOYMENT)
    last = enriched.r.xrevrange(stream, count=1)
    resp = enriched.predict(body)
    assert resp.status_code == 422, resp.text
    assert needle in resp.text
    assert enriched.r.xrevrange(stream, count=1) == last


def test_bad_loads_are_refused_and_write_nothing(enriched: System) -> None:
    rows = [
        {"customer_id": "new-1", LOOKED_UP[0]: 1.0},
        {"customer_id": "bad key", LOOKED_UP[0]: 1.0},
        {"customer_id": "new-2", "mean radius": 1.0},  # not a looked-up feature
        {"customer_id": "new-3", LOOKED_UP[0]: "12"},
        {"customer_id": 5, LOOKED_UP[0]: 1.0},  # said "must be 1-128 characters", as '5'
        {LOOKED_UP[0]: 1.0},  # and this, as 'None'
    ]
    resp = admin(enriched, "PUT", "/entities", json=rows)
    assert resp.status_code == 422, resp.text
    errors = resp.json()["errors"]
    assert [e["row"] for e in errors] == [1, 2, 3, 4, 5]
    said = json.dumps(errors[3:])
    assert "customer_id must be a string (an entity id), not a number" in said, said
    assert "no customer_id: each row names its entity" in said, said
    assert not enriched.r.exists(names.entity_key(DEMO_DEPLOYMENT, "new-1"))
    assert admin(enriched, "PUT", "/entities", auth=False, json=rows[:1]).status_code == 401
    # float32's largest as written is taken, as predict takes it
    edge = {"customer_id": "edge", **{f: 3.4028235e38 for f in LOOKED_UP}}
    assert admin(enriched, "PUT", "/entities", json=[edge]).status_code == 200


def test_features_load_refuses_a_file_the_gateway_would_and_sends_nothing(
    enriched: System, tmp_path: Path
) -> None:
    """Found by hand: a Latin-1 file ended in a traceback, a spreadsheet's CSV (a UTF-8
    byte-order mark) lost its key column, and a 'nan' cell was sent, so the gateway refused
    its batch after earlier batches had been written."""
    header = ",".join(["customer_id", *LOOKED_UP])
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + f"{header}\nbom-1,{','.join(['1.5'] * 5)}\n".encode())
    done = rdv_features_load(enriched, bom)
    assert done.returncode == 0 and json.loads(done.stdout)["loaded"] == 1, done.stderr
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"{header}\n".encode() + "caf\xe9,1,2,3,4,5\n".encode("latin-1"))
    nan = tmp_path / "nan.jsonl"
    first = LOOKED_UP[0]
    nan.write_text(f'{{"customer_id": "n-1", "{first}": 1.0}}\n'
                   f'{{"customer_id": "n-2", "{first}": NaN}}\n')  # fmt: skip
    keyless = tmp_path / "keyless.jsonl"  # the gateway's refusal said customer_id "None"
    keyless.write_text(f'{{"customer_id": "k-1", "{first}": 1.0}}\n{{"{first}": 2.0}}\n')
    number = tmp_path / "number.jsonl"
    number.write_text(f'{{"customer_id": 5, "{first}": 1.0}}\n')
    twice = tmp_path / "twice.csv"  # found by a helper's probe: the last value was sent
    twice.write_text(f"customer_id,{first},{first}\nt-1,1.0,4.0\n")
    underscore = tmp_path / "underscore.csv"  # float() reads 1_2 as 12
    underscore.write_text(f"customer_id,{first}\nu-1,1_2\n")
    for path, said in ((latin, "not UTF-8"), (nan, ":2: "),
                       (keyless, ":2: no 'customer_id'"), (number, ":1: 5, not text"),
                       (twice, f"column {first!r} appears more than once"),
                       (underscore, ":2: ")):  # fmt: skip
        done = rdv_features_load(enriched, path)
        assert done.returncode != 0 and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert not enriched.r.exists(names.entity_key(DEMO_DEPLOYMENT, "n-1"))


def test_the_entity_view_shows_hand_written_values_predict_refuses(enriched: System) -> None:
    """A value written beside the API that is no number made the entity view answer 500,
    where predict answers 422 (found by hand); it is shown as unusable now."""
    key = names.entity_key(DEMO_DEPLOYMENT, "hand")
    enriched.r.hset(key, mapping={LOOKED_UP[0]: "abc", LOOKED_UP[1]: "", LOOKED_UP[2]: "1e39",
                                  LOOKED_UP[3]: "2.5", LOOKED_UP[4]: "1_2"})  # fmt: skip
    resp = admin(enriched, "GET", "/entities/hand")
    assert resp.status_code == 200, resp.text
    assert resp.json()["features"] == {LOOKED_UP[3]: 2.5}
    assert resp.json()["unusable"] == {LOOKED_UP[0]: "abc", LOOKED_UP[1]: "", LOOKED_UP[2]: "1e39",
                                       LOOKED_UP[4]: "1_2"}  # read as 12 before  # fmt: skip
    only_empty = names.entity_key(DEMO_DEPLOYMENT, "empty")
    enriched.r.hset(only_empty, LOOKED_UP[0], "")  # present, as predict reads it
    assert admin(enriched, "GET", "/entities/empty").json()["unusable"] == {LOOKED_UP[0]: ""}
    # loaded for a lookup of other features: it said "is not in the feature store" (a probe)
    enriched.r.hset(names.entity_key(DEMO_DEPLOYMENT, "other"), "mean radius", "3.5")
    other = admin(enriched, "GET", "/entities/other")
    assert other.status_code == 404 and "holds none of the looked-up" in other.text, other.text
    assert "it holds ['mean radius']" in other.text
    row = {"entity": "hand", "features": caller_part(DATA.x_test[0])}
    refused = enriched.http.post(PREDICT, json=row)
    assert refused.status_code == 422 and "entity_value" in refused.text, refused.text
    assert "('abc')" in refused.text and "b'abc'" not in refused.text  # the value, not bytes


def test_defaults_fill_a_missing_entity(enriched: System, real: OnnxClassifier) -> None:
    defaults = {n: float(DATA.x_train[:, c].mean()) for n, c in zip(LOOKED_UP, COLS, strict=True)}
    resp = admin(
        enriched, "PATCH", "/enrichment", json={"lookup": {**LOOKUP, "defaults": defaults}}
    )
    assert resp.status_code == 200, resp.text
    try:
        body = {"entity": "c-new", "features": caller_part(DATA.x_test[7])}
        resp = enriched.predict(body, **{"X-Request-Id": "enr-default"})
        assert resp.status_code == 200, resp.text
        labels, proba = real.predict(merged_row(DATA.x_test[7], defaults)[None, :])
        [pred] = resp.json()["predictions"]
        assert pred["label"] == int(labels[0])
        assert pred["probabilities"]["1"] == pytest.approx(float(proba[0, 1]), abs=1e-6)
        present = {"entity": "c-1", "features": caller_part(DATA.x_test[8])}
        assert enriched.predict(present, **{"X-Request-Id": "enr-found"}).status_code == 200
        record = archived(enriched, {"enr-default", "enr-found"})["enr-default"]
        [looked] = record["looked_up"]
        assert looked["found"] is False and looked["defaulted"] == list(LOOKED_UP)
        assert looked["values"] == pytest.approx(defaults)
        # an export says which entity, whether the store had it, what a default filled, and
        # who answered (it said none of it: a helper's probe, retraining on imputed values)
        time.sleep(1.1)  # an open --to ends a second before now
        out = enriched.data_dir / "enriched.csv"
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", "archive", "export", "--deployment",
             DEMO_DEPLOYMENT, "--data-dir", str(enriched.data_dir), "--from", "0",
             "--out", str(out)], env=enriched.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        with out.open(newline="") as f:
            rows = {r["request_id"]: r for r in csv.DictReader(f)}
        filled = rows["enr-default"]
        assert (filled["entity"], filled["entity_found"]) == ("c-new", "False"), filled
        assert filled["entity_defaulted"] == ",".join(LOOKED_UP)
        assert filled["answered_by"] == "real" and filled["real_label"] == str(pred["label"])
        found = rows["enr-found"]
        assert (found["entity"], found["entity_found"], found["entity_defaulted"]) == (
            "c-1",
            "True",
            "",
        )
    finally:
        resp = admin(enriched, "PATCH", "/enrichment", json={"lookup": LOOKUP})
        assert resp.status_code == 200, resp.text
        # Later tests expect an unknown entity refused, and each gateway process follows the
        # change at its own refresh (a second). In one CI run the tritonclient test, three tests
        # on, had an unknown entity answered, as if a process still held the defaults.
        body = {"entity": "c-new", "features": caller_part(DATA.x_test[7])}
        wait_until(lambda: enriched.predict(body).status_code == 422, 10, "defaults dropped")
        time.sleep(1.2)  # the gateway's other process, if the request above met the first


def test_a_lookup_is_checked_and_may_come_with_a_new_deployment(enriched: System) -> None:
    wrong = {**LOOKUP, "defaults": {"mean radius": 1.0}}  # not a looked-up feature
    resp = admin(enriched, "PATCH", "/enrichment", json={"lookup": wrong})
    assert resp.status_code == 422 and "mean radius" in resp.json()["detail"], resp.text
    unknown = {"key": "customer_id", "features": ["no such feature"]}
    resp = admin(enriched, "PATCH", "/enrichment", json={"lookup": unknown})
    assert resp.status_code == 422 and "not in the spec" in resp.json()["detail"], resp.text
    # found by hand: a default given as text or true was taken as a number, and a key named
    # as a looked-up feature made that feature one no load could ever fill
    for default in ("1", True):
        text = {**LOOKUP, "defaults": {LOOKED_UP[0]: default}}
        assert admin(enriched, "PATCH", "/enrichment", json={"lookup": text}).status_code == 422
    same = {"key": LOOKED_UP[0], "features": list(LOOKED_UP)}
    resp = admin(enriched, "PATCH", "/enrichment", json={"lookup": same})
    assert resp.status_code == 422 and "also a looked-up feature" in resp.text, resp.text
    # a key named as a feature the caller sends: the Open Inference Protocol form then needed
    # two inputs of that name, and refused either way (a helper's probe)
    sent = {"key": "mean radius", "features": list(LOOKED_UP)}
    resp = admin(enriched, "PATCH", "/enrichment", json={"lookup": sent})
    assert resp.status_code == 422 and "a feature the caller sends" in resp.text, resp.text
    # ...and one named "input", the protocol's input of every feature (a helper's probe)
    whole = {"key": "input", "features": list(LOOKED_UP)}
    resp = admin(enriched, "PATCH", "/enrichment", json={"lookup": whole})
    assert resp.status_code == 422 and "input of every feature" in resp.text, resp.text
    body = {"name": "enr-created", "real": {"model": "breast-cancer", "version": 2},
            "lookup": {**LOOKUP, "key": "account"}}  # fmt: skip
    resp = enriched.http.post("/admin/deployments", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    assert resp.json()["feature_spec"]["lookup"]["key"] == "account"
    shown = enriched.http.get("/admin/deployments/enr-created", headers=AUTH).json()
    assert shown["feature_spec"]["lookup"]["features"] == list(LOOKED_UP)


def test_a_job_looks_features_up_as_a_predict_does(enriched: System) -> None:
    """Found by hand: a job's body was checked as if nothing were looked up, so an entity's
    body was refused and a full row (no entity) became a job that failed."""
    system = enriched
    jobs = PREDICT.replace("/predict", "/jobs")
    x = DATA.x_test
    body = {"entity": "c-2", "features": caller_part(x[6])}
    accepted = system.http.post(jobs, json=body)
    assert accepted.status_code == 202, accepted.text
    done = system.http.get(f"{jobs}/{accepted.json()['id']}", params={"wait_ms": 10_000}).json()
    assert done["status"] == "done", done
    direct = system.predict(body).json()
    assert done["result"]["predictions"] == direct["predictions"]
    full_row = {"instances": [x[6].tolist()]}  # the looked-up features sent, no entity
    refused = system.http.post(jobs, json=full_row)
    assert refused.status_code == 422 and "entity" in refused.text  # never a job


def test_tritonclient_sends_entity_ids_as_bytes_and_gets_what_predict_answers(
    enriched: System, real: OnnxClassifier
) -> None:
    """Through the Open Inference Protocol, unchanged tritonclient: the entity ids as a BYTES
    input named as the lookup's key, the caller's features as ``input``, in JSON and in the
    binary extension. Before, the deployment was advertised on /v2 but every infer was a
    422 (found by a helper's probe)."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    system = enriched
    entities = ["c-3", "c-0", "c-5"]
    caller = np.array([[row[DATA.names.index(n)] for n in CALLER] for row in DATA.x_test[7:10]],
                      dtype=np.float32)  # fmt: skip
    want = np.stack([merged_row(DATA.x_test[7 + k], stored_values(e))
                     for k, e in enumerate(entities)])  # fmt: skip
    labels, proba = real.predict(want)
    direct = system.predict({"entities": entities, "instances": caller.tolist()}).json()
    client = triton.InferenceServerClient(url=f"127.0.0.1:{system.port}", network_timeout=10.0)
    try:
        meta = client.get_model_metadata(DEMO_DEPLOYMENT)
        assert meta["inputs"] == [
            {"name": "customer_id", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, len(CALLER)]},
        ]
        for binary in (False, True):
            ids = triton.InferInput("customer_id", [len(entities)], "BYTES")
            ids.set_data_from_numpy(np.array(entities, dtype=object), binary_data=binary)
            features = triton.InferInput("input", list(caller.shape), "FP32")
            features.set_data_from_numpy(caller, binary_data=binary)
            got = client.infer(DEMO_DEPLOYMENT, [ids, features], request_id=f"oip-enr-{binary}")
            assert got.as_numpy("label").tolist() == labels.tolist()
            np.testing.assert_allclose(got.as_numpy("probabilities")[:, 1], proba[:, 1],
                                       atol=1e-6)  # fmt: skip
            assert got.as_numpy("label").tolist() == [p["label"] for p in direct["predictions"]]
        archive = archived(system, {"oip-enr-False", "oip-enr-True"})
        for record in (archive["oip-enr-False"], archive["oip-enr-True"]):  # what the models saw
            np.testing.assert_array_equal(np.asarray(record["features"], np.float32), want)
            assert [lu["entity"] for lu in record["looked_up"]] == entities
        unknown = triton.InferInput("customer_id", [1], "BYTES")
        unknown.set_data_from_numpy(np.array(["c-404"], dtype=object))
        one = triton.InferInput("input", [1, len(CALLER)], "FP32")
        one.set_data_from_numpy(caller[:1])
        with pytest.raises(InferenceServerException, match=r"inputs\[0\]\.data\[0\].*'c-404'"):
            client.infer(DEMO_DEPLOYMENT, [unknown, one])
        with pytest.raises(InferenceServerException, match="missing input 'customer_id'"):
            client.infer(DEMO_DEPLOYMENT, [one])
        # a looked-up feature sent: "unknown input", though the spec names it (a probe)
        looked = triton.InferInput(LOOKED_UP[0], [1], "FP32")
        looked.set_data_from_numpy(np.ones(1, np.float32))
        ids = triton.InferInput("customer_id", [1], "BYTES")
        ids.set_data_from_numpy(np.array(["c-3"], dtype=object))
        with pytest.raises(InferenceServerException, match=f"'{LOOKED_UP[0]}' is looked up by"):
            client.infer(DEMO_DEPLOYMENT, [ids, one, looked])
    finally:
        client.close()


def test_the_typed_client_declares_loads_and_reads_entities(
    enriched: System, real: OnnxClassifier
) -> None:
    with Client(str(enriched.http.base_url), admin_token=TOKEN) as rdv:
        with pytest.raises(RdvError) as same:  # read as the lookup in force: no change
            rdv.set_enrichment(DEMO_DEPLOYMENT, LOOKUP, reason="the client")
        assert same.value.status == 409 and "already has that lookup" in str(same.value)
        with pytest.raises(RdvError) as wrong:
            rdv.set_enrichment(DEMO_DEPLOYMENT, {**LOOKUP, "features": ["no such feature"]})
        assert wrong.value.status == 422 and "not in the spec" in str(wrong.value)
        stored = stored_values("c-3")
        loaded = rdv.load_entities(DEMO_DEPLOYMENT, [{"customer_id": "c-client", **stored}])
        assert loaded["loaded"] == 1, loaded
        assert rdv.entity(DEMO_DEPLOYMENT, "c-client")["features"] == pytest.approx(stored)
        for key in ("acct/17", "..", "a/../b", "/x/"):  # any key predict takes is readable
            assert rdv.load_entities(DEMO_DEPLOYMENT, [{"customer_id": key, **stored}])["loaded"]
            shown = rdv.entity(DEMO_DEPLOYMENT, key)
            assert shown["features"] == pytest.approx(stored), (key, shown)
            assert rdv.delete_entity(DEMO_DEPLOYMENT, key)["deleted"] is True
            with pytest.raises(RdvError) as gone:
                rdv.entity(DEMO_DEPLOYMENT, key)
            assert gone.value.status == 404
        with pytest.raises(RdvError) as never:  # nothing to delete: said so
            rdv.delete_entity(DEMO_DEPLOYMENT, "never-loaded")
        assert never.value.status == 404 and "never-loaded" in str(never.value)
        row = DATA.x_test[9]
        answer = rdv.predict(DEMO_DEPLOYMENT, features=caller_part(row), entity="c-client")
        labels, _ = real.predict(merged_row(row, stored)[None, :])
        assert answer.label == int(labels[0])
