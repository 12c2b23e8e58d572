"""The typed client's retries (``rdv_client.retries``): against a scripted gateway
(``httpx.MockTransport``) for the policy's details, and against a real gateway whose Redis
stops answering for a moment."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from models.train import DEMO_DEPLOYMENT, demo_data
from processes import PREDICT, System, launch_system
from rdv_client import AsyncClient, Client, GatewayUnreachable, JobExists, RdvError
from rendezvous.bus.server import EmbeddedRedis
from rendezvous.schedule import Schedule

ANSWER = {"request_id": "r-1", "model": {"name": "m", "version": 1, "role": "real"},
          "predictions": [{"label": 0, "probabilities": {"0": 1.0}}]}  # fmt: skip
JOB = {"id": "1-a", "status": "pending", "location": "/v1/deployments/d/jobs/1-a"}
ROW = [[1.0]]

Step = httpx.Response | Exception


class Scripted:
    """A gateway that answers each request with the next step (the last one repeats) and
    keeps what it was sent."""

    def __init__(self, *steps: Step):
        self.steps = list(steps)
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        step = self.steps[min(len(self.sent), len(self.steps)) - 1]
        if isinstance(step, Exception):
            raise step
        return step

    def client(self, **options: Any) -> Client:
        return Client("http://gw", transport=httpx.MockTransport(self), **options)

    def async_client(self, **options: Any) -> AsyncClient:
        return AsyncClient("http://gw", transport=httpx.MockTransport(self), **options)


def refusal(status: int, retry_after: str | None = "0", detail: str = "no") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"detail": detail}, headers=headers)


def ok(doc: dict[str, Any] = ANSWER, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=doc)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    return call(), time.monotonic() - t0


@pytest.mark.pure
def test_429_and_503_are_sent_again_after_retry_after_in_seconds_or_as_a_date() -> None:
    gateway = Scripted(refusal(429, "0.2"), refusal(503, "0.2"), ok())
    with gateway.client() as rdv:
        answer, took_s = timed(lambda: rdv.predict("d", instances=ROW, request_id="r-1"))
    assert answer.request_id == "r-1" and len(gateway.sent) == 3
    assert 0.4 <= took_s < 1.0  # 0.2 s each, and up to a fifth more
    assert {r.headers["x-request-id"] for r in gateway.sent} == {"r-1"}  # the same id again
    soon = formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
    gateway = Scripted(refusal(503, soon), ok())
    with gateway.client() as rdv:
        _, took_s = timed(lambda: rdv.predict("d", instances=ROW))
    assert len(gateway.sent) == 2 and 0.9 <= took_s < 3.0
    later = formatdate(time.time() + 60, usegmt=True)  # past the 10 s cap: not waited for
    gateway = Scripted(refusal(503, later), ok())
    with gateway.client() as rdv, pytest.raises(RdvError) as refused:
        rdv.predict("d", instances=ROW)
    assert len(gateway.sent) == 1 and refused.value.status == 503
    assert 55 <= (refused.value.retry_after or 0) <= 61


@pytest.mark.pure
def test_the_waits_of_a_call_are_capped_and_the_last_refusal_says_how_many_tries() -> None:
    gateway = Scripted(refusal(429))  # 2 retries by default
    with gateway.client() as rdv, pytest.raises(RdvError, match=r"^429: no \(after 3 tries\)$"):
        rdv.result("d", "1-a")
    gateway = Scripted(refusal(503, "0.3", "Redis is unavailable"))
    with (
        gateway.client(retries=10, max_retry_wait_s=1.0) as rdv,
        pytest.raises(RdvError) as refused,
    ):
        rdv.predict("d", instances=ROW)
    tries = len(gateway.sent)
    assert tries in (3, 4), tries  # waits of 0.3-0.36 s while they fit in 1 s
    assert refused.value.tries == tries and refused.value.status == 503
    assert str(refused.value) == f"503: Redis is unavailable (after {tries} tries)"
    again = pickle.loads(pickle.dumps(refused.value))
    assert str(again) == str(refused.value) and again.tries == tries
    gateway = Scripted(refusal(503), ok())
    with gateway.client(retries=0) as rdv, pytest.raises(RdvError) as once:
        rdv.predict("d", instances=ROW)
    assert len(gateway.sent) == 1 and str(once.value) == "503: no" and once.value.tries == 1
    with pytest.raises(ValueError, match="negative"):
        Client("http://gw", retries=-1)


@pytest.mark.pure
def test_only_429_and_503_are_answered_by_a_retry() -> None:
    """A 4xx is refused again; 500 says nothing of what was done; 502 (every model failed on
    the input) would fail again; 504 (no model answered in time) is not doubled."""
    for status in (400, 401, 404, 409, 413, 422, 500, 502, 503, 504, 429):
        gateway = Scripted(refusal(status), ok())
        with gateway.client() as rdv:
            if status in (429, 503):
                assert rdv.predict("d", instances=ROW).request_id == "r-1"
                assert len(gateway.sent) == 2
                continue
            with pytest.raises(RdvError) as refused:
                rdv.predict("d", instances=ROW)
        assert refused.value.status == status and len(gateway.sent) == 1, status
    taken = {"detail": "taken", "id": "1-a", "location": JOB["location"]}
    gateway = Scripted(refusal(503), ok(taken, 409))  # the first try was taken after all
    with gateway.client() as rdv, pytest.raises(JobExists) as exists:
        rdv.submit("d", instances=ROW, request_id="r-1")
    assert exists.value.job_id == "1-a" and exists.value.tries == 2


@pytest.mark.pure
def test_what_may_have_been_taken_is_sent_again_only_where_a_repeat_is_harmless() -> None:
    """A read timeout after the whole request was sent: a predict may have been scored, a
    submit or an admin write taken, so only reads, PUTs and feedback are sent again. A
    request that never left (a refused connection) is sent again whatever it is."""
    gateway = Scripted(httpx.ConnectError("refused"), ok())
    with gateway.client() as rdv:
        assert rdv.predict("d", instances=ROW).request_id == "r-1"
    assert len(gateway.sent) == 2
    silent = httpx.ReadTimeout("no answer")
    for call in (
        lambda rdv: rdv.predict("d", instances=ROW, request_id="r-1"),
        lambda rdv: rdv.submit("d", instances=ROW),
        lambda rdv: rdv.cancel("d", "1-a"),
        lambda rdv: rdv.rollback("d"),
    ):
        gateway = Scripted(silent, ok(JOB))
        with gateway.client(admin_token="t") as rdv, pytest.raises(GatewayUnreachable):
            call(rdv)
        assert len(gateway.sent) == 1
    for call in (
        lambda rdv: rdv.result("d", "1-a", wait_ms=100),
        lambda rdv: rdv.feedback("d", request_id="r-1", label=1),
        lambda rdv: rdv.set_drift_thresholds("d", min_requests=5),
        lambda rdv: rdv.deployment("d"),
    ):
        for failure in (silent, httpx.RemoteProtocolError("dropped")):
            gateway = Scripted(failure, ok(JOB))
            with gateway.client(admin_token="t", max_retry_wait_s=0.05) as rdv:
                call(rdv)
            assert len(gateway.sent) == 2
    for never_sent in (httpx.ConnectTimeout("slow"), httpx.PoolTimeout("pool")):
        gateway = Scripted(never_sent, ok())
        with gateway.client(max_retry_wait_s=0.05) as rdv:
            assert rdv.predict("d", instances=ROW).request_id == "r-1"
        assert len(gateway.sent) == 2
    gateway = Scripted(httpx.ConnectError("refused"))
    with (
        gateway.client(max_retry_wait_s=0.2) as rdv,
        pytest.raises(GatewayUnreachable, match=r"not reached: .* \(after 2 tries\)"),
    ):
        rdv.predict("d", instances=ROW)


@pytest.mark.pure
def test_a_503_is_sent_again_only_where_the_gateway_took_nothing() -> None:
    """A 503 whose detail asks for a new X-Request-Id kept the id taken (the same id gets
    409); an admin write's 503 may follow a Redis command that ran (a rollback sent twice
    undoes itself), unless it expects a revision (a repeat that finds it changed gets 409)."""
    kept = "Redis failed ...; its input may still be scored under that id, which stays " \
           "taken: retry it with a new X-Request-Id"  # fmt: skip
    gateway = Scripted(refusal(503, "0", kept), ok())
    with gateway.client() as rdv, pytest.raises(RdvError, match="new X-Request-Id"):
        rdv.predict("d", instances=ROW, request_id="r-1")
    assert len(gateway.sent) == 1
    # The answer's own field says so, whatever the wording of its detail.
    doc = {"detail": "gone", "request_id": "r-1", "request_id_taken": True}
    taken = httpx.Response(503, json=doc, headers={"Retry-After": "0"})
    gateway = Scripted(taken, ok())
    with gateway.client() as rdv, pytest.raises(RdvError, match="gone"):
        rdv.predict("d", instances=ROW, request_id="r-1")
    assert len(gateway.sent) == 1
    # A submit whose job may exist (Redis failed under its accept): not sent again blindly,
    # which made a second job while the first ran unknown (a helper's probe); its body names it.
    doc = {"detail": "maybe", "id": "1-a", "location": "/v1/deployments/d/jobs/1-a",
           "may_exist": True}  # fmt: skip
    maybe = httpx.Response(503, json=doc, headers={"Retry-After": "0"})
    gateway = Scripted(maybe, ok(JOB, 202))
    with gateway.client() as rdv, pytest.raises(RdvError, match="maybe") as caught:
        rdv.submit("d", instances=ROW)
    assert len(gateway.sent) == 1 and caught.value.body["id"] == "1-a"
    for call, retried in (
        (lambda rdv: rdv.rollback("d"), False),
        (lambda rdv: rdv.promote("d", 3), False),
        (lambda rdv: rdv.promote("d", 3, expect_revision=7), True),
        (lambda rdv: rdv.remove_challenger("d", "c", expect_revision=7), True),
        (lambda rdv: rdv.load_entities("d", [{"id": "e"}]), True),
    ):
        gateway = Scripted(refusal(503), ok({"revision": 8}))
        with gateway.client(admin_token="t") as rdv:
            if retried:
                assert call(rdv) == {"revision": 8}
            else:
                with pytest.raises(RdvError):
                    call(rdv)
        assert len(gateway.sent) == (2 if retried else 1)


@pytest.mark.pure
def test_the_async_client_retries_alike() -> None:
    async def main() -> None:
        gateway = Scripted(refusal(429, "0.1"), refusal(503, "0.1"), ok())
        async with gateway.async_client() as rdv:
            assert (await rdv.predict("d", instances=ROW)).request_id == "r-1"
        assert len(gateway.sent) == 3
        gateway = Scripted(refusal(503, "0"))
        async with gateway.async_client(retries=1) as rdv:
            with pytest.raises(RdvError, match=r"after 2 tries"):
                await rdv.predict("d", instances=ROW)
        for step, error in ((refusal(504), RdvError),
                            (httpx.ReadTimeout("no answer"), GatewayUnreachable)):  # fmt: skip
            gateway = Scripted(step, ok())
            async with gateway.async_client() as rdv:
                with pytest.raises(error):
                    await rdv.predict("d", instances=ROW)
            assert len(gateway.sent) == 1
        gateway = Scripted(httpx.ReadTimeout("no answer"), ok(JOB))
        async with gateway.async_client() as rdv:
            assert (await rdv.result("d", "1-a", wait_ms=50)).id == "1-a"

    asyncio.run(main())


SCHEDULE = Schedule(real_deadline_ms=200, timeout_ms=1500, fallbacks=("canary",), grace_ms=100)


@pytest.fixture(scope="module")
def paused_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis of this module's own: its tests pause it (the session's is shared)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("retry-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def system(
    paused_redis: EmbeddedRedis, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with launch_system(paused_redis.url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_REDIS_TIMEOUT_S="0.3") as sys:  # fmt: skip
        sys.start_worker("real")
        sys.start_worker("canary")
        yield sys


def pause(redis_url: str, seconds: float) -> None:
    """Redis answers nothing for ``seconds`` (every client's commands wait)."""
    with redis.Redis.from_url(redis_url) as client:
        client.execute_command("CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")


@pytest.mark.integration
def test_a_predict_rides_out_a_redis_that_stops_answering(
    system: System, paused_redis: EmbeddedRedis
) -> None:
    """Redis paused 1.2 s: the gateway answers 503 with Retry-After (1 s) within its Redis
    timeout (0.3 s); the client sends the predict again after it, under the same request id
    (the gateway never took it), and is answered once Redis is back. Without retries the
    caller meets the 503, as before; the async client rides out the rest of that pause."""
    row = [demo_data().x_test[0].tolist()]
    base = f"http://127.0.0.1:{system.port}"
    with Client(base) as rdv:
        rdv.predict(DEMO_DEPLOYMENT, instances=row)  # warm: the workers answer
        pause(paused_redis.url, 1.2)
        answer, took_s = timed(
            lambda: rdv.predict(DEMO_DEPLOYMENT, instances=row, request_id="sync-1")
        )
    assert answer.request_id == "sync-1" and 1.0 <= took_s < 4.0, took_s
    print(f"paused Redis: answered after {took_s:.2f} s")
    with Client(base, retries=0) as once:
        pause(paused_redis.url, 1.2)
        with pytest.raises(RdvError) as refused:
            once.predict(DEMO_DEPLOYMENT, instances=row)
        assert refused.value.status == 503 and refused.value.retry_after == 1.0

    async def main() -> str:
        async with AsyncClient(base) as rdv:  # Redis paused for about 0.9 s more
            answer = await rdv.predict(DEMO_DEPLOYMENT, instances=row, request_id="async-1")
            return answer.request_id

    request_id, took_s = timed(lambda: asyncio.run(main()))
    assert request_id == "async-1" and 0.9 <= took_s < 4.0, took_s  # a 503, then answered


@pytest.mark.integration
def test_a_wait_rides_out_a_redis_that_stops_answering_within_its_timeout(
    system: System, paused_redis: EmbeddedRedis
) -> None:
    """A wait's polls met the 503s of a failover (Redis away 2-3 s) and the wait raised them
    once one poll's retries ran out, with most of ``timeout_s`` left and the job about to be
    done (a helper's cluster probe). A wait now polls again within its own ``timeout_s``;
    ``retries=0`` here, so that no poll's own retries hide the pause."""
    row = [demo_data().x_test[0].tolist()]
    base = f"http://127.0.0.1:{system.port}"
    with Client(base, retries=0) as rdv:
        job = rdv.submit(DEMO_DEPLOYMENT, instances=row)
        pause(paused_redis.url, 2.0)
        done, took_s = timed(lambda: rdv.wait(DEMO_DEPLOYMENT, job, timeout_s=20))
    assert done.status == "done" and done.result is not None and took_s >= 1.0, (done, took_s)

    async def main() -> str:
        async with AsyncClient(base, retries=0) as rdv:
            job = await rdv.submit(DEMO_DEPLOYMENT, instances=row)
            pause(paused_redis.url, 2.0)
            return (await rdv.wait(DEMO_DEPLOYMENT, job, timeout_s=20)).status

    assert asyncio.run(main()) == "done"
    with Client(base, retries=0) as rdv:  # the wait's budget still ends it
        job = rdv.submit(DEMO_DEPLOYMENT, instances=row)
        pause(paused_redis.url, 1.0)
        with pytest.raises(RdvError) as refused:
            rdv.wait(DEMO_DEPLOYMENT, job, timeout_s=0.5)
        assert refused.value.status == 503
    time.sleep(1.0)  # the pause over, for the next test


@pytest.mark.integration
def test_a_predict_no_replica_acknowledged_keeps_its_id_and_says_so(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """RDV_WAIT_REPLICAS: a predict whose input no replica acknowledged in time (here a Redis
    with none) is a 503, but its input is in the stream, scored and archived under its id,
    which stays taken. The 503 did not say so: the client sent the same id again and met a 409
    (a helper's cluster probe, in the ten seconds after a manual failover). It now says so, as
    every 503 that keeps an id does, and the client does not send that id again."""
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, SCHEDULE,
                       RDV_WAIT_REPLICAS="1") as system:  # fmt: skip
        system.start_worker("real")
        row = [demo_data().x_test[0].tolist()]
        refused = system.http.post(PREDICT, json={"instances": row},
                                   headers={"X-Request-Id": "unreplicated-1"})  # fmt: skip
        assert refused.status_code == 503, refused.text
        doc = refused.json()
        assert doc["request_id_taken"] is True and doc["request_id"] == "unreplicated-1", doc
        assert "not acknowledged by 1 replica" in doc["detail"]
        assert "new X-Request-Id" in doc["detail"] and refused.headers["retry-after"]
        again = system.http.post(PREDICT, json={"instances": row},
                                 headers={"X-Request-Id": "unreplicated-1"})  # fmt: skip
        assert again.status_code == 409, again.text  # taken, as the 503 said
        rdv = Client(f"http://127.0.0.1:{system.port}", retries=2)
        with rdv, pytest.raises(RdvError) as met:
            rdv.predict(DEMO_DEPLOYMENT, instances=row, request_id="unreplicated-2")
        assert met.value.status == 503 and met.value.tries == 1, met.value
        # an id the gateway made up is not the caller's to resend: a plain 503
        anonymous = system.http.post(PREDICT, json={"instances": row})
        assert anonymous.status_code == 503 and "request_id_taken" not in anonymous.json()


def test_a_wait_polls_within_the_gateways_longest_long_poll() -> None:
    """``wait`` polled 10 s at a time, and a gateway whose ``RDV_JOB_MAX_WAIT_MS`` is lower
    refused every poll with 422, even for a job already done (a helper's probe). The 422 names
    its bound (``ctx.le``), and the wait polls within it."""
    bound = {"detail": [{"type": "less_than_equal", "loc": ["query", "wait_ms"],
                         "msg": "Input should be less than or equal to 5000",
                         "input": "10000", "ctx": {"le": 5000}}]}  # fmt: skip
    done = {**JOB, "status": "done", "result": ANSWER}
    gateway = Scripted(httpx.Response(422, json=bound), ok(done))
    with gateway.client() as rdv:
        assert rdv.wait("d", "1-a", timeout_s=30).status == "done"
    assert [r.url.params["wait_ms"] for r in gateway.sent] == ["10000", "5000"]
    other = {"detail": [{"type": "int_parsing", "loc": ["query", "wait_ms"], "msg": "no"}]}
    gateway = Scripted(httpx.Response(422, json=other), ok(done))
    with gateway.client() as rdv, pytest.raises(RdvError):
        rdv.wait("d", "1-a", timeout_s=30)  # any other 422 is raised
