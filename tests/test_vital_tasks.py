"""A gateway process whose vital background task ends does not go on half-alive: it says so
and stops, gracefully, so that its supervisor starts a fresh one."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from admin_support import AppClient

from gateway.cli.supervisor import detached_from_terminal
from gateway.settings import Settings
from gateway.transport.app import create_app
from gateway.transport.vital_tasks import VitalTasks
from processes import rdv_env, wait_until
from rendezvous.bus.server import free_port


async def test_the_first_task_to_end_is_reported_once_and_ends_at_shutdown_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deaths: list[str] = []
    vital = VitalTasks(deaths.append)

    async def fails() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("a bug the loop did not foresee")

    async def returns() -> None:
        await asyncio.sleep(0)

    async def runs() -> None:
        await asyncio.sleep(3600)

    failing, returning, running = (asyncio.create_task(c()) for c in (fails, returns, runs))
    vital.watch("the failing loop", failing)
    vital.watch("the returning loop", returning)
    vital.watch("the running loop", running)
    with caplog.at_level(logging.CRITICAL, logger="gateway.transport.vital_tasks"):
        await asyncio.wait({failing, returning})
        await asyncio.sleep(0)  # done callbacks run in the next turn

    assert deaths == ["the failing loop"]  # the process is told once
    assert vital.dead == ["the failing loop", "the returning loop"]  # both are said
    failed = next(r for r in caplog.records if "the failing loop" in r.getMessage())
    assert "failed" in failed.getMessage() and failed.exc_info is not None
    assert "a bug the loop did not foresee" in caplog.text
    assert "the returning loop returned" in caplog.text

    vital.stopping()
    running.cancel()
    await asyncio.wait({running})
    await asyncio.sleep(0)
    assert vital.dead == ["the failing loop", "the returning loop"]


async def test_a_task_cancelled_while_serving_counts_as_ended() -> None:
    deaths: list[str] = []
    vital = VitalTasks(deaths.append)
    task = asyncio.create_task(asyncio.sleep(3600))
    vital.watch("the reply reader", task)
    task.cancel()
    await asyncio.wait({task})
    await asyncio.sleep(0)
    assert deaths == ["the reply reader"]


def test_the_gateway_watches_its_reply_reader_and_background_loops(
    redis_url: str, data_dir: Path
) -> None:
    deaths: list[str] = []
    settings = Settings(redis_url=redis_url, data_dir=data_dir)
    client = AppClient(create_app(settings, on_vital_death=deaths.append))
    try:
        assert client.get("/healthz").status_code == 200
        app = client.app
        reader = app.state.rendezvous.reader_task
        assert reader is not None and not reader.done()
        reader.get_loop().call_soon_threadsafe(reader.cancel)
        wait_until(lambda: deaths, 10, "the reply reader's end reported")
        assert deaths == ["the reply reader"]
    finally:
        client.close()
    assert app.state.vital_tasks.dead == ["the reply reader"]  # shutdown's ends are not deaths


BROKEN_GATEWAY = textwrap.dedent(
    """
    import asyncio

    from gateway.cli.main import main
    from gateway.observability.live_accuracy import LiveAccuracy

    async def broken(self):
        await asyncio.sleep(1.5)
        raise RuntimeError("a bug the loop did not foresee")

    LiveAccuracy.run = broken
    main(["gateway"])
    """
)


@pytest.mark.timeout(60)
def test_a_gateway_process_whose_loop_dies_stops_gracefully_and_not_with_status_0(
    redis_url: str, data_dir: Path
) -> None:
    """A real ``rdv gateway`` process, one of its loops replaced by one that fails: it must
    exit by itself, after uvicorn's graceful shutdown, with a status ``rdv serve``
    restarts."""
    port = free_port()
    log_path = data_dir / "gateway.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", BROKEN_GATEWAY],
            env=rdv_env(redis_url, data_dir, port, RDV_GATEWAY_PROCESSES="1"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **detached_from_terminal(),
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                wait_until(lambda: http.get("/healthz").status_code == 200, 30, "/healthz")
            started = time.monotonic()
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text(errors="replace")
    assert code == -signal.SIGTERM, (code, text[-3000:])
    assert time.monotonic() - started < 20
    assert "live accuracy failed while the gateway was serving" in text, text[-3000:]
    assert "RuntimeError: a bug the loop did not foresee" in text
    assert "Application shutdown complete" in text  # graceful: the lifespan's close ran
