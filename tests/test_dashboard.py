"""The dashboard page in headless Chromium: served by a small local app with a fixed drift
report (the rendering, alert badges and empty states, deterministically), then by a real
running gateway whose drift monitor has judged real traffic.

Longer than ~400 lines on purpose: every test shares the Chromium harness (launch, console
capture, the local page server); split, each part would carry its own copy."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.observability.dashboard import dashboard_router
from models.train import DEMO_DEPLOYMENT, demo_data
from processes import PREDICT, System, launch_system, wait_until
from rendezvous.bus.server import free_port
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration  # headless Chromium and a running gateway

CHARTS = ("divergence", "drift", "scores", "features")
SHAPES = ("path", "rect", "circle", "line")
T0_MS = 1_763_900_000_000.0
STATIC = Path(__file__).parents[1] / "gateway" / "observability" / "static"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed: no chromium, chromium-browser or google-chrome on PATH")


def dump_dom(url: str, profile: Path) -> str:
    """The DOM once the page's scripts ran; virtual time lets the fetch and a redraw finish.
    The console must stay silent: a JS exception or a CSP violation would be logged there."""
    out = subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--window-size=1280,1000", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert out.returncode == 0 and "</html>" in out.stdout, out.stderr[-3000:]
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    return out.stdout


@dataclass
class Chart:
    points: int | None
    shapes: Counter[str] = field(default_factory=Counter)
    series: set[str] = field(default_factory=set)
    thresholds: set[str] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    unjudged: int = 0
    """Points drawn as not judged (hollow)."""


class Dom(HTMLParser):
    """What a reader sees: each chart's drawn shapes, the alert badges, the body's status."""

    SEEN: tuple[str, ...] = CHARTS
    """The charts looked at (the live-accuracy section has tests of its own)."""

    def __init__(self, text: str):
        super().__init__()
        self.charts: dict[str, Chart] = {}
        self.alerts: dict[str, str] = {}
        self.status = ""
        self._chart: Chart | None = None
        self._alert: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.status = a.get("data-status") or ""
        elif tag == "svg" and a.get("data-chart") in self.SEEN:
            points = a.get("data-points")
            self._chart = self.charts[a["data-chart"] or ""] = Chart(
                int(points) if points else None
            )
        elif self._chart is not None:
            self._chart.shapes[tag] += 1
            if a.get("data-series"):
                self._chart.series.add(a["data-series"] or "")
            if a.get("data-threshold"):
                self._chart.thresholds.add(a["data-threshold"] or "")
            self._chart.unjudged += a.get("data-judged") == "false"
        elif a.get("data-alert"):
            self._alert = a["data-alert"]
            self.alerts[self._alert or ""] = a.get("class") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        elif tag in ("span", "a"):
            self._alert = None

    def handle_data(self, data: str) -> None:
        if self._chart is not None and data.strip():
            self._chart.texts.append(data.strip())
        if self._alert is not None:
            self.alerts[self._alert] += " | " + data


# -- a fixed report served by a small local app ---------------------------------------------


def fixture_report(points: int = 40) -> dict[str, Any]:
    """A report in the shape of ``/v1/deployments/{d}/drift``, with one active alert and a gap
    (a null score_psi) in the history."""
    edges = [round(i / 10, 1) for i in range(11)]
    real = [0.3, 0.08, 0.04, 0.03, 0.02, 0.02, 0.03, 0.05, 0.1, 0.33]
    history = [
        {"ts_ms": T0_MS - (points - i) * 5000, "requests": 200 + 20 * i,
         "divergence_mean": 0.02 + 0.001 * i, "divergence_p90": 0.06 + 0.001 * i,
         "disagreement_rate": 0.01, "score_psi": None if i == 7 else 0.05 + 0.002 * i,
         "score_js": 0.04, "feature_psi": 0.1 + 0.006 * i,
         "status": "insufficient_data" if i < 3 else "ok"}
        for i in range(points)
    ]  # fmt: skip
    top = [("worst area", 0.31), ("mean area", 0.27), ("area error", 0.2),
           ("mean radius", 0.12), ("worst radius", 0.05)]  # fmt: skip
    return {
        "deployment": "breast-cancer",
        "evaluated_at_ms": T0_MS,
        "window": {"requests": 1000, "seconds": 600.0, "interval_s": 5.0},
        "thresholds": {"divergence_mean": 0.12, "disagreement_rate": 0.1, "score_psi": 0.3,
                       "score_js": 0.22, "feature_psi": 0.25, "min_requests": 200},
        "current": {
            "status": "ok", "requests": 812, "rows": 812, "from_ms": T0_MS - 600_000,
            "to_ms": T0_MS, "real_model": "breast-cancer:2", "canary_model": "breast-cancer:1",
            "divergence": {"mean": 0.059, "p50": 0.02, "p90": 0.099, "p99": 0.2,
                           "disagreement_rate": 0.01, "compared_rows": 812},
            "score": {"psi": 0.128, "js_distance": 0.04, "reference_source": "training",
                      "edges": edges, "real": real, "canary": real[::-1], "reference": [0.1] * 10},
            "features": {"psi": dict(top), "top": [{"feature": f, "psi": v} for f, v in top],
                         "max_psi": 0.31},
            "values": {"divergence_mean": 0.059, "disagreement_rate": 0.01, "score_psi": 0.128,
                       "score_js": 0.04, "feature_psi": 0.31},
        },
        "alerts": [{"kind": "feature_psi", "value": 0.31, "threshold": 0.25,
                    "since_ms": T0_MS - 60_000},
                   {"kind": "feature_range", "feature": "worst area", "value": 0.4,
                    "threshold": 0.1, "since_ms": T0_MS - 30_000},
                   {"kind": "prediction_prior", "value": 0.023, "threshold": 0.62,
                    "since_ms": T0_MS - 30_000}],
        "events": [
            {"type": "raised", "kind": "feature_psi", "value": 0.26, "threshold": 0.25,
             "ts_ms": T0_MS - 60_000},
            {"type": "cleared", "kind": "score_psi", "value": 0.2, "threshold": 0.3,
             "ts_ms": T0_MS - 300_000},
        ],
        "history": history,
    }  # fmt: skip


def not_evaluated_report() -> dict[str, Any]:
    doc = fixture_report()
    roles = {"real": "breast-cancer:7", "canary": "breast-cancer:6"}
    return {**doc, "evaluated_at_ms": None, "current": None, "alerts": [], "events": [],
            "history": [], "roles": roles}  # fmt: skip


def early_report() -> dict[str, Any]:
    """Evaluated, but below min_requests: figures missing or null where the window cannot say."""
    doc = fixture_report(points=2)
    cur = doc["current"]
    cur.update(status="insufficient_data", requests=40, rows=40, canary_model=None)
    cur["score"].update(psi=None, js_distance=None, canary=None, reference=None)
    cur["features"] = {"psi": {}, "top": [], "max_psi": None}
    cur["values"] = dict.fromkeys(cur["values"])
    for point in doc["history"]:
        point.update(score_psi=None, score_js=None, feature_psi=None)
        del point["divergence_p90"]
    return {**doc, "alerts": [], "events": []}


def canaryless_report() -> dict[str, Any]:
    """Judged, but nothing to compare real with: a deployment without a canary."""
    doc = {**fixture_report(), "roles": {"real": "breast-cancer:2"}}
    doc["current"].update(canary_model=None)
    doc["current"]["features"]["top"][0]["feature"] = "x" * 200  # a very long name
    doc["current"]["values"].update(divergence_mean=None, disagreement_rate=None)
    for point in doc["history"]:
        point.update(divergence_mean=None, divergence_p90=None, disagreement_rate=None)
    return {**doc, "alerts": [], "events": []}


def multiclass_report() -> dict[str, Any]:
    """A model of three classes: its history holds the class mix's PSI and JS distance."""
    doc = {**fixture_report(), "deployment": "iris"}
    doc["thresholds"].update(class_psi=0.2, class_js=0.2)
    doc["current"]["classes"] = {
        "psi": 0.02, "js_distance": 0.01, "reference_source": "training",
        "labels": ["setosa", "versicolor", "virginica"], "real": [0.3, 0.4, 0.3],
        "reference": [0.33, 0.34, 0.33],
    }  # fmt: skip
    for i, point in enumerate(doc["history"]):
        point.update(class_psi=0.01 * i, class_js=0.005 * i)
    return {**doc, "alerts": [], "events": []}


REPORTS = {"breast-cancer": fixture_report, "fresh": not_evaluated_report, "early": early_report,
           "canaryless": canaryless_report, "iris": multiclass_report}  # fmt: skip
SERVED: list[tuple[str, int]] = []  # (path, status) of each request the fixture server answered


@pytest.fixture(scope="module")
def fixture_server() -> Iterator[str]:
    """The dashboard router next to a stand-in drift endpoint, served by uvicorn in a thread
    on a free port; asserted to shut down cleanly."""
    app = FastAPI()
    app.include_router(dashboard_router())
    app.state.deployments = SimpleNamespace(deployments=REPORTS)  # the cache's known names

    @app.middleware("http")
    async def record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Any:
        response = await call_next(request)
        SERVED.append((request.url.path, response.status_code))
        return response

    @app.get("/v1/deployments/{deployment}/drift")
    async def drift(deployment: str) -> JSONResponse:
        if deployment not in REPORTS:
            detail = f"deployment {deployment!r} does not exist"
            return JSONResponse({"detail": detail}, status_code=404)
        return JSONResponse(REPORTS[deployment]())

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", ws="none",
                       http="h11", log_level="warning")
    )  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fixture server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive(), "fixture server did not shut down"


def test_the_page_draws_a_report_with_its_alert(fixture_server: str, tmp_path: Path) -> None:
    chromium()
    SERVED.clear()
    text = dump_dom(f"{fixture_server}/dashboard/breast-cancer", tmp_path / "profile")
    # The browser fetched the page's stylesheet and script (and the console, checked by
    # dump_dom, holds no refusal of either); the drawing below proves the script ran.
    for path in (
        "/dashboard/breast-cancer",
        "/dashboard/static/dashboard.css",
        "/dashboard/static/dashboard.js",
        "/v1/deployments/breast-cancer/drift",
    ):
        assert (path, 200) in SERVED, (path, SERVED)
    dom = Dom(text)
    assert dom.status == "ok"
    assert set(dom.charts) == set(CHARTS)
    for name, chart in dom.charts.items():
        assert chart.points and chart.points > 0, (name, chart)
        assert sum(chart.shapes[s] for s in SHAPES) > chart.points, (name, chart)
        assert not any("waiting for data" in t for t in chart.texts), (name, chart.texts)
    div, drift = dom.charts["divergence"], dom.charts["drift"]
    assert div.points == 3 * 40
    assert div.series == {"divergence_mean", "divergence_p90", "disagreement_rate"}
    assert div.thresholds == {"divergence_mean", "disagreement_rate"}
    assert drift.points == 3 * 40 - 1  # the null breaks the line, it is not drawn as 0
    assert drift.series == {"score_psi", "score_js", "feature_psi"}
    assert {"score_psi", "score_js", "feature_psi"} == drift.thresholds
    # found by hand: the first points, on too few requests, looked as judged as the rest
    assert div.unjudged == 3 * 3 and drift.unjudged == 3 * 3
    assert "not judged (too few requests)" in text and "(not judged: 220 requests)" in text
    scores = dom.charts["scores"]
    assert scores.points == 30 and scores.shapes["rect"] == 30
    assert scores.series == {"real", "canary", "reference"}
    features = dom.charts["features"]
    assert features.points == 5 and features.shapes["rect"] == 5
    assert features.thresholds == {"feature_psi"} and "worst area" in features.texts
    assert list(dom.alerts) == ["feature_psi", "feature_range", "prediction_prior"]
    badge = dom.alerts["feature_psi"]
    assert "alert" in badge and "0.310 > 0.250" in badge and "since" in badge
    # found by hand: a feature's alert did not name it, a share under training's read ">"
    assert "of worst area 0.400 > 0.100" in dom.alerts["feature_range"]
    assert 'href="?feature=worst%20area"' in text
    assert "0.023 < 0.620" in dom.alerts["prediction_prior"]
    for shown in (
        "breast-cancer:2",
        "breast-cancer:1",
        "812 requests (up to 1000, 600 s)",
        "<title>Drift · breast-cancer</title>",  # the name, read by the script from the URL
        '<span id="dep">breast-cancer</span>',
        '<td class="raised">raised</td>',
        '<td class="cleared">cleared</td>',
    ):
        assert shown in text, shown


def test_the_page_charts_a_multiclass_models_class_drift(
    fixture_server: str, tmp_path: Path
) -> None:
    """The class mix's PSI and JS distance were alert tiles only: a multiclass model's drift
    chart now draws them with their thresholds (a binary model's chart stays as it was, above)."""
    chromium()
    dom = Dom(dump_dom(f"{fixture_server}/dashboard/iris", tmp_path / "profile"))
    drift = dom.charts["drift"]
    # its score is the top class probability: the axis said "positive class" (a probe)
    assert "top class probability (share of requests)" in dom.charts["scores"].texts
    assert drift.series == {"score_psi", "score_js", "feature_psi", "class_psi", "class_js"}
    assert drift.thresholds == {"score_psi", "score_js", "feature_psi", "class_psi", "class_js"}
    assert drift.points == 5 * 40 - 1


def test_the_page_waits_for_data_and_shows_the_endpoints_error(
    fixture_server: str, tmp_path: Path
) -> None:
    chromium()
    text = dump_dom(f"{fixture_server}/dashboard/fresh", tmp_path / "fresh")
    dom = Dom(text)
    assert dom.status == "ok"
    # found by hand: an idle window's header showed a dash for real and canary; who holds them now
    assert "<dd>breast-cancer:7</dd>" in text and "<dd>breast-cancer:6</dd>" in text
    assert set(dom.charts) == set(CHARTS)
    for name, chart in dom.charts.items():
        assert chart.points is None, (name, chart)
        assert "waiting for data: 0 of 200 requests" in chart.texts, (name, chart.texts)
    assert not dom.alerts

    dom = Dom(dump_dom(f"{fixture_server}/dashboard/early", tmp_path / "early"))
    waiting = "waiting for data: 40 of 200 requests"
    assert dom.charts["divergence"].points == 2 * 2  # mean and disagreement; no p90 given
    assert f"{waiting} (not judged yet)" in dom.charts["divergence"].texts
    assert dom.charts["drift"].points is None and waiting in dom.charts["drift"].texts
    assert dom.charts["scores"].points == 10 and dom.charts["scores"].series == {"real"}
    assert dom.charts["features"].points is None and waiting in dom.charts["features"].texts

    # found by hand: without a canary the divergence chart said "waiting for data: 1012 of 200"
    text = dump_dom(f"{fixture_server}/dashboard/canaryless", tmp_path / "canaryless")
    dom = Dom(text)
    assert "<dt>canary</dt><dd>none</dd>" in text  # the deployment has none
    divergence = dom.charts["divergence"]
    assert divergence.points is None, divergence
    assert "no divergence: no canary scored the window's requests" in divergence.texts
    assert dom.charts["drift"].points
    # a name longer than the chart's margin is cut, whole in its tooltip (it overflowed the card)
    cut = [t for t in dom.charts["features"].texts if t.startswith("xxx") and t.endswith("\u2026")]
    assert cut and len(cut[0]) < 60, dom.charts["features"].texts

    assert httpx.get(f"{fixture_server}/dashboard/nope").status_code == 404  # it was 200
    text = dump_dom(f"{fixture_server}/dashboard/nope", tmp_path / "nope")
    dom = Dom(text)
    assert dom.status == "error"
    assert "cannot load the drift report: HTTP 404: deployment 'nope' does not exist" in text
    assert '<span id="dep">nope</span>' in text and "<title>Drift · nope</title>" in text
    assert all(chart.points is None for chart in dom.charts.values())


def test_the_page_is_its_package_files_served_as_they_are(fixture_server: str) -> None:
    resp = httpx.get(f"{fixture_server}/dashboard/breast-cancer")
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.content == (STATIC / "dashboard.html").read_bytes()
    assert resp.headers["x-content-type-options"] == "nosniff"
    csp = resp.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'"):  # fmt: skip
        assert directive in csp, (directive, csp)
    assert "unsafe" not in csp and "nonce" not in csp
    # No inline script or style for the policy to allow; only the package's files, by URL.
    assert "<style" not in resp.text and "style=" not in resp.text
    assert re.findall(r"<script[^>]*>", resp.text) == [
        '<script src="/dashboard/static/dashboard.js" defer>',
        '<script src="/dashboard/static/drift_features.js" defer>',
        '<script src="/dashboard/static/accuracy.js" defer>',
    ]
    assert '<link rel="stylesheet" href="/dashboard/static/dashboard.css">' in resp.text
    # Nothing from elsewhere: the only absolute URL is the SVG namespace.
    assets = ("dashboard.css", "dashboard.js", "drift_features.js", "accuracy.js")
    texts = resp.text + "".join((STATIC / n).read_text() for n in assets)
    assert set(re.findall(r"https?://[^\s\"']+", texts)) == {"http://www.w3.org/2000/svg"}

    bad = httpx.get(f"{fixture_server}/dashboard/NOT%20valid")
    assert bad.status_code == 422 and "invalid deployment" in bad.json()["detail"]


def test_the_stylesheet_and_script_are_served_with_their_types(fixture_server: str) -> None:
    for name, media_type in (
        ("dashboard.css", "text/css; charset=utf-8"),
        ("dashboard.js", "application/javascript; charset=utf-8"),
        ("drift_features.js", "application/javascript; charset=utf-8"),
    ):
        resp = httpx.get(f"{fixture_server}/dashboard/static/{name}")
        assert resp.status_code == 200, name
        assert resp.headers["content-type"] == media_type
        assert resp.content == (STATIC / name).read_bytes()
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["cache-control"] == "no-cache"
        etag = resp.headers["etag"]
        again = httpx.get(resp.url, headers={"if-none-match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        stale = httpx.get(resp.url, headers={"if-none-match": '"other"'})
        assert stale.status_code == 200 and stale.content == resp.content


def test_only_the_two_assets_are_served_by_name(fixture_server: str) -> None:
    with httpx.Client(base_url=fixture_server) as client:
        for path in (
            "/dashboard/static/nope.js",
            "/dashboard/static/dashboard.html",  # the page has its own route and headers
            "/dashboard/static/DASHBOARD.JS",
            "/dashboard/static/__init__.py",
            "/dashboard/static/dashboard.py",
            "/dashboard/static/..%2Fdashboard.py",
            "/dashboard/static/%2e%2e%2f%2e%2e%2fmetrics.py",
            "/dashboard/static/static%2Fdashboard.js",
            "/dashboard/static/a/dashboard.js",
        ):
            resp = client.get(path)
            assert resp.status_code == 404, (path, resp.status_code, resp.text[:200])
            assert b"use strict" not in resp.content and b"import" not in resp.content, path
    # Dots left as they are, sent over a bare socket: httpx would resolve them first.
    host, port = fixture_server.removeprefix("http://").split(":")
    for target in ("/dashboard/static/../dashboard.py", "/dashboard/static/../static/dashboard.js"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.1 404 "), (target, answer[:300])
        assert b"import" not in answer and b"use strict" not in answer, target


# -- a real gateway, workers and drift monitor ----------------------------------------------

DRIFT = f"/v1/deployments/{DEMO_DEPLOYMENT}/drift"


@pytest.fixture(scope="module")
def system(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    # A generous timeout: these tests need every request answered, and a shared CI host
    # can stall both workers for longer than a tight one.
    schedule = Schedule(real_deadline_ms=50, timeout_ms=5000, fallbacks=("canary",), grace_ms=100)
    env = {
        "RDV_DRIFT_INTERVAL_S": "0.5",
        "RDV_DRIFT_MIN_REQUESTS": "50",
        # Held-out data never reaches the default threshold: a tiny one makes the largest
        # feature PSI raise an alert, so the badge is checked on the real path too.
        "RDV_DRIFT_THRESHOLDS": '{"feature_psi": 0.001}',
    }
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, schedule, **env) as sys:
        sys.start_worker("real")
        sys.start_worker("canary")
        yield sys


def test_the_page_draws_the_drift_of_a_running_gateway(system: System, tmp_path: Path) -> None:
    chromium()
    data = demo_data()
    rows = data.x_test[np.random.default_rng(0).integers(0, len(data.x_test), 300)]
    for row in rows:
        body = {"features": dict(zip(data.names, map(float, row), strict=True))}
        assert system.http.post(PREDICT, json=body).status_code == 200

    def judged() -> dict[str, Any] | None:
        doc: dict[str, Any] = system.http.get(DRIFT).json()
        cur = doc["current"]
        ready = cur and cur["status"] == "ok" and cur["requests"] >= 250
        return doc if ready and len(doc["history"]) >= 2 and doc["alerts"] else None

    doc = wait_until(judged, 30, "drift judged with history and an alert", interval_s=0.2)
    text = dump_dom(f"{system.http.base_url}/dashboard/{DEMO_DEPLOYMENT}", tmp_path / "profile")
    dom = Dom(text)
    assert dom.status == "ok", text[:3000]
    assert set(dom.charts) == set(CHARTS)
    for name, chart in dom.charts.items():
        assert chart.points and chart.points > 0, (name, chart)
        assert sum(chart.shapes[s] for s in SHAPES) > chart.points, (name, chart)
    assert {"divergence_mean", "disagreement_rate"} <= dom.charts["divergence"].series
    assert {"score_psi", "score_js", "feature_psi"} <= dom.charts["drift"].series
    score = doc["current"]["score"]
    shown = [k for k in ("real", "canary", "reference") if score[k]]
    assert shown == ["real", "canary", "reference"], score  # the demo models carry a reference
    assert dom.charts["scores"].points == 10 * len(shown)
    assert dom.charts["features"].points == len(doc["current"]["features"]["top"]) == 5
    assert "feature_psi" in dom.alerts and "alert" in dom.alerts["feature_psi"]
    assert doc["current"]["real_model"] in text
    assert not [t for c in dom.charts.values() for t in c.texts if "waiting for data" in t]
