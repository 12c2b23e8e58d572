"""The dashboard's live-accuracy section in headless Chromium (the harness of
``test_dashboard``): a fixed drift report with an ``accuracy`` section drawn as one line per role
and a table of the current figures; a report without labels shows the empty state."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from test_dashboard import T0_MS, Dom, chromium, dump_dom, fixture_report

from gateway.observability.dashboard import dashboard_router
from rendezvous.bus.server import free_port

pytestmark = pytest.mark.integration  # headless Chromium


class AccuracyDom(Dom):
    SEEN = ("accuracy",)


def _model(role: str, model: str, acc: float, current: bool = True) -> dict[str, Any]:
    return {"role": role, "model": model, "current": current, "labelled": 300, "judged": 2,
            "rows": 300, "accuracy": acc, "log_loss": 0.12, "brier": 0.03, "ece": 0.02,
            "precision": {}, "recall": {}, "calibration": []}  # fmt: skip


def labelled_report() -> dict[str, Any]:
    history = [
        {"ts_ms": T0_MS - (20 - i) * 5000,
         "roles": {"real": {"model": "breast-cancer:2", "accuracy": 0.95 + 0.001 * i,
                            "labelled": 10 * i},
                   "canary": {"model": "breast-cancer:1", "accuracy": 0.9, "labelled": 10 * i}}}
        for i in range(20)
    ]  # fmt: skip
    current = {"models": [_model("canary", "breast-cancer:1", 0.9),
                          _model("real", "breast-cancer:1", 0.91, current=False),
                          _model("real", "breast-cancer:2", 0.97)]}  # fmt: skip
    return {**fixture_report(), "accuracy": {"current": current, "history": history}}


REPORTS = {
    "labelled": labelled_report,
    "unlabelled": lambda: {**fixture_report(), "accuracy": {"current": None, "history": []}},
}


FLAKY: list[int] = []


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = FastAPI()
    app.include_router(dashboard_router())

    @app.get("/v1/deployments/{deployment}/drift")
    async def drift(deployment: str) -> JSONResponse:
        if deployment == "flaky":  # the page's two first reads answered, then Redis gone
            FLAKY.append(1)
            if len(FLAKY) > 2:
                detail = "Redis is unavailable: ConnectionError"
                return JSONResponse({"detail": detail}, status_code=503)
            return JSONResponse(labelled_report())
        return JSONResponse(REPORTS[deployment]())

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                        ws="none", http="h11", log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def test_the_accuracy_of_each_role_is_drawn_over_time(server: str, tmp_path: Path) -> None:
    chromium()
    text = dump_dom(f"{server}/dashboard/labelled", tmp_path / "labelled")
    chart = AccuracyDom(text).charts["accuracy"]
    assert chart.points == 2 * 20
    assert chart.series == {"acc:real", "acc:canary"}
    for shown in ("breast-cancer:1 (earlier)", "<td>97%</td>", "<td>90%</td>", "<td>302</td>"):
        assert shown in text, shown


def test_no_labels_yet_shows_the_empty_state(server: str, tmp_path: Path) -> None:
    chromium()
    text = dump_dom(f"{server}/dashboard/unlabelled", tmp_path / "unlabelled")
    chart = AccuracyDom(text).charts["accuracy"]
    assert chart.points is None
    assert any("no labelled request yet" in t for t in chart.texts)
    assert "no labelled request yet" in text


def test_a_failed_refresh_keeps_the_last_figures_and_says_they_are_not_fresh(
    server: str, tmp_path: Path
) -> None:
    """On a 503 (Redis down) the accuracy section was redrawn as "no labelled request yet",
    telling the operator to send labels, and the header stayed green, "evaluated 14 s ago" no
    longer counting (a helper's probe)."""
    chromium()
    text = dump_dom(f"{server}/dashboard/flaky", tmp_path / "flaky")
    assert len(FLAKY) > 2  # refreshed past the first reads
    chart = AccuracyDom(text).charts["accuracy"]
    assert chart.points == 2 * 20 and "no labelled request yet" not in text
    assert "<td>97%</td>" in text
    assert "cannot load the drift report: HTTP 503" in text
    assert 'class="pill wait">not updating<' in text and "last evaluated" in text
