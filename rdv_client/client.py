"""The sync and the async client: each sends the calls of ``rdv_client.calls`` with its own
httpx client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, SupportsFloat, TypeVar

import httpx

from rdv_client.admin import AdminCalls
from rdv_client.calls import (
    Call,
    Calls,
    Labels,
    Rows,
    Waiting,
    body_of,
    checked_actor,
    feedback_body,
    request_of,
)
from rdv_client.retries import Retrying
from rdv_client.types import GatewayUnreachable, Job, Prediction, RdvError

T = TypeVar("T")


class Client(AdminCalls[dict[str, Any]]):
    """Synchronous. ``admin_token`` only for the admin calls, ``feedback_token`` for
    ``feedback`` on a gateway that asks for one; ``transport`` for tests. ``retries``: how
    many times a call is sent again where that is safe (a 429, a 503, a gateway not reached:
    ``rdv_client.retries`` says which calls on which failure; 0: never), waiting what
    ``Retry-After`` says or backing off, ``max_retry_wait_s`` at most in all per call."""

    def __init__(self, base_url: str, *, admin_token: str | None = None,
                 feedback_token: str | None = None, actor: str | None = None,
                 timeout: float = 10.0, retries: int = 2, max_retry_wait_s: float = 10.0,
                 transport: httpx.BaseTransport | None = None):  # fmt: skip
        self.retrying = Retrying(retries, max_retry_wait_s)
        self.admin_token = admin_token
        self.feedback_token = feedback_token
        self.actor = checked_actor(actor)
        """Who the admin calls' changes are recorded as in the history (``X-Actor``; the
        gateway says ``admin`` without it)."""
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def _send(self, call: Call[T]) -> T:
        tokens = (self.admin_token, self.feedback_token)
        request = request_of(call, tokens, self.http.timeout, self.actor)
        tries = self.retrying.tries(call)
        while True:
            try:
                response = self.http.request(**request)
            except httpx.TransportError as exc:
                time.sleep(tries.after_failure(exc))  # raises when not sent again
                continue
            if (wait_s := tries.after_answer(response)) is None:
                return tries.answer(response)
            time.sleep(wait_s)

    def _admin(self, method: str, path: str, json: Any = None,
               params: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        return self._send(Calls.admin(method, path, json, params))

    def predict(self, deployment: str, *, features: Mapping[str, SupportsFloat] | None = None,
                instances: Rows | None = None,
                entity: str | None = None, entities: Sequence[str] | None = None,
                request_id: str | None = None) -> Prediction:  # fmt: skip
        return self._send(
            Calls.predict(deployment, body_of(features, instances, entity, entities), request_id)
        )

    def submit(self, deployment: str, *, features: Mapping[str, SupportsFloat] | None = None,
               instances: Rows | None = None,
               entity: str | None = None, entities: Sequence[str] | None = None,
               request_id: str | None = None) -> Job:  # fmt: skip
        return self._send(
            Calls.submit(deployment, body_of(features, instances, entity, entities), request_id)
        )

    def result(self, deployment: str, job_id: str, *, wait_ms: int | None = None) -> Job:
        return self._send(Calls.result(deployment, job_id, wait_ms))

    def wait(self, deployment: str, job: Job | str, *, timeout_s: float = 60.0,
             poll_ms: int = 10_000) -> Job:  # fmt: skip
        """The job once it ended (done or failed: look at ``status``), by long polls;
        TimeoutError if it is still pending after ``timeout_s``. A poll refused for a moment
        (429, 503) or that reached no gateway is tried again within ``timeout_s``."""
        waiting = Waiting(job, timeout_s, poll_ms)
        current: Job | None = None
        while (wait_ms := waiting.next_wait_ms(current)) is not None:
            try:
                current = self.result(deployment, waiting.job_id, wait_ms=wait_ms)
            except (RdvError, GatewayUnreachable) as exc:
                if (pause_s := waiting.pause_after(exc)) is None:
                    raise
                time.sleep(pause_s)
        assert current is not None
        return current

    def cancel(self, deployment: str, job_id: str) -> Job:
        """The job, now failed with ``error.cancelled``; 409 (RdvError) once it ended."""
        return self._send(Calls.cancel(deployment, job_id))

    def feedback(self, deployment: str, items: Sequence[Mapping[str, Any]] | None = None, *,
                 request_id: str | None = None, label: Labels | None = None,
                 correct: bool | None = None,
                 weight: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Labels for answered requests: ``{"accepted": n, "relabelled": k}``. A label is a
        class, or its name among the real model's ``class_names``."""
        body = feedback_body(items, request_id, label, correct, weight)
        return self._send(Calls.feedback(deployment, body))

    def drift(self, deployment: str) -> dict[str, Any]:
        """The latest drift evaluation (statistics, thresholds, alerts, history) and the live
        accuracy."""
        return self._send(Calls.drift(deployment, None, features=False))

    def drift_features(self, deployment: str, feature: str | None = None) -> dict[str, Any]:
        """One feature (default: the one drifting most) in the latest window against
        training."""
        return self._send(Calls.drift(deployment, feature, features=True))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(AdminCalls[Awaitable[dict[str, Any]]]):
    """The same calls for asyncio: each, the admin ones included, is awaited; the same
    retries (``Client``)."""

    def __init__(self, base_url: str, *, admin_token: str | None = None,
                 feedback_token: str | None = None, actor: str | None = None,
                 timeout: float = 10.0, retries: int = 2, max_retry_wait_s: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None):  # fmt: skip
        self.retrying = Retrying(retries, max_retry_wait_s)
        self.admin_token = admin_token
        self.feedback_token = feedback_token
        self.actor = checked_actor(actor)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    async def _send(self, call: Call[T]) -> T:
        tokens = (self.admin_token, self.feedback_token)
        request = request_of(call, tokens, self.http.timeout, self.actor)
        tries = self.retrying.tries(call)
        while True:
            try:
                response = await self.http.request(**request)
            except httpx.TransportError as exc:
                await asyncio.sleep(tries.after_failure(exc))  # raises when not sent again
                continue
            if (wait_s := tries.after_answer(response)) is None:
                return tries.answer(response)
            await asyncio.sleep(wait_s)

    def _admin(self, method: str, path: str, json: Any = None,
               params: Mapping[str, Any] | None = None) -> Awaitable[dict[str, Any]]:  # fmt: skip
        return self._send(Calls.admin(method, path, json, params))  # the caller awaits it

    async def predict(self, deployment: str, *, features: Mapping[str, SupportsFloat] | None = None,
                      instances: Rows | None = None,
                      entity: str | None = None, entities: Sequence[str] | None = None,
                      request_id: str | None = None) -> Prediction:  # fmt: skip
        return await self._send(
            Calls.predict(deployment, body_of(features, instances, entity, entities), request_id)
        )

    async def submit(self, deployment: str, *, features: Mapping[str, SupportsFloat] | None = None,
                     instances: Rows | None = None,
                     entity: str | None = None, entities: Sequence[str] | None = None,
                     request_id: str | None = None) -> Job:  # fmt: skip
        return await self._send(
            Calls.submit(deployment, body_of(features, instances, entity, entities), request_id)
        )

    async def result(self, deployment: str, job_id: str, *, wait_ms: int | None = None) -> Job:
        return await self._send(Calls.result(deployment, job_id, wait_ms))

    async def wait(self, deployment: str, job: Job | str, *, timeout_s: float = 60.0,
                   poll_ms: int = 10_000) -> Job:  # fmt: skip
        """The job once it ended, by long polls; TimeoutError if still pending after
        ``timeout_s``."""
        waiting = Waiting(job, timeout_s, poll_ms)
        current: Job | None = None
        while (wait_ms := waiting.next_wait_ms(current)) is not None:
            try:
                current = await self.result(deployment, waiting.job_id, wait_ms=wait_ms)
            except (RdvError, GatewayUnreachable) as exc:
                if (pause_s := waiting.pause_after(exc)) is None:
                    raise
                await asyncio.sleep(pause_s)
        assert current is not None
        return current

    async def cancel(self, deployment: str, job_id: str) -> Job:
        """The job, now failed with ``error.cancelled``; 409 (RdvError) once it ended."""
        return await self._send(Calls.cancel(deployment, job_id))

    async def feedback(self, deployment: str, items: Sequence[Mapping[str, Any]] | None = None,
                       *, request_id: str | None = None,
                       label: Labels | None = None, correct: bool | None = None,
                       weight: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Labels for answered requests: ``{"accepted": n, "relabelled": k}``."""
        body = feedback_body(items, request_id, label, correct, weight)
        return await self._send(Calls.feedback(deployment, body))

    async def drift(self, deployment: str) -> dict[str, Any]:
        return await self._send(Calls.drift(deployment, None, features=False))

    async def drift_features(self, deployment: str, feature: str | None = None) -> dict[str, Any]:
        return await self._send(Calls.drift(deployment, feature, features=True))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
