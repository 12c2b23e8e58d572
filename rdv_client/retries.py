"""When a call is sent again, and how long the client waits first: the policy both clients
share (each sleeps its own way).

What is sent again, and why it is safe:

- **429** (the gateway process holds ``RDV_MAX_IN_FLIGHT`` requests): refused from the
  request's head, before its body is read, so nothing of it was taken: any call.
- **503** (Redis unavailable, failing over or backlogged, the gateway shutting down, ``rdv
  serve`` with no gateway running): a predict or a submit (the gateway never took its request
  id, or freed it when Redis lost the input), a call that is repeatable (below), and an admin
  write that carries ``expect_revision`` (if the first did land, the repeat is refused with
  409, never applied twice). Not sent again: a 503 whose detail asks for a new
  ``X-Request-Id`` (the input may still be scored under the id, which stays taken: the same id
  would get 409), and the other admin writes and ``cancel``: an admin write's 503 may come from
  a Redis command that timed out after it ran, and a rollback sent twice undoes itself.
- **The request never reached the gateway whole** (``ConnectError``, ``ConnectTimeout``,
  ``PoolTimeout``, ``WriteError``, ``WriteTimeout``: nothing sent, or a request cut before its
  end, which no server acts on): any call.
- **The request may have been taken** (``ReadTimeout``, ``ReadError``,
  ``RemoteProtocolError``: the gateway went silent or dropped the connection after the whole
  request was sent): only a repeatable call: a read (GET, and so long polls), a PUT (it sets a
  value: entities, drift thresholds) and ``feedback`` (a label replaces the request's last one;
  ``relabelled`` then counts it). Never a predict (a second one is scored again, or gets 409
  under the caller's id: the answer is lost either way), a submit, a cancel or an admin write:
  ``GatewayUnreachable`` says so, and its docstring says what to do.
- **Never**: any other 4xx (the same request is refused again); 500 (a fault of the gateway,
  with nothing said about what it did); 502 (every model failed on this input: it would fail
  again); 504 (the models did not answer in time: a predict sent again doubles their load when
  they are slowest, so the caller decides).

The wait: what ``Retry-After`` says (seconds or an HTTP date), with up to a fifth more at random
so that callers refused together do not come back together; without it, an exponential backoff
(0.5 s doubling to 8 s, less up to a quarter at random). All waits of one call add up to at most
``max_retry_wait_s``: a ``Retry-After`` that does not fit ends the tries at once (the error's
``retry_after`` says it), a backoff is cut to what is left.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from rdv_client.calls import Call, answer_of, retry_after_s, unreachable, unsendable

T = TypeVar("T")

RETRIED_STATUSES = frozenset({429, 503})
NOT_SENT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
)
"""Failures before the whole request was sent: the gateway took nothing."""
MAYBE_TAKEN: tuple[type[httpx.TransportError], ...] = (
    httpx.ReadTimeout,
    httpx.ReadError,
    httpx.RemoteProtocolError,
)
"""Failures after the whole request was sent: the gateway may have acted on it."""
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
RETRY_AFTER_JITTER = 0.2
"""Up to this share of ``Retry-After`` added at random."""
NEW_ID_ASKED = b"new X-Request-Id"
"""In a 503's detail when the request id stays taken, from gateways older than the answer's
``request_id_taken`` (``gateway/dataplane/no_answer.py``)."""


def _request_id_taken(response: httpx.Response) -> bool:
    """The 503 says the call's request id stays taken: sending it again is a 409."""
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and (doc.get("request_id_taken") is True or doc.get("may_exist")):
        return True  # may_exist: a submit that may have made its job (its body names it)
    return NEW_ID_ASKED in response.content


def repeatable(call: Call[Any]) -> bool:
    """Sending it twice does no more than sending it once."""
    return call.method in ("GET", "HEAD", "PUT") or call.feedback


def _expects_revision(call: Call[Any]) -> bool:
    if (call.params or {}).get("expect_revision") is not None:
        return True
    return isinstance(call.json, Mapping) and call.json.get("expect_revision") is not None


@dataclass(frozen=True)
class Retrying:
    """A client's policy (the module's docstring): ``retries`` tries after the first (0: none),
    waiting ``max_retry_wait_s`` at most in all between the tries of one call."""

    retries: int = 2
    max_retry_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 0 or not self.max_retry_wait_s >= 0:
            raise ValueError("retries and max_retry_wait_s cannot be negative")

    def tries(self, call: Call[T]) -> Tries[T]:
        return Tries(self, call)


class Tries(Generic[T]):
    """One call's tries. After each, the wait before the next one, or the end: its answer,
    or the error the client raises without retries (with the number of tries in it)."""

    def __init__(self, policy: Retrying, call: Call[T]):
        self.policy = policy
        self.call = call
        self.count = 0
        self.waited_s = 0.0

    def after_failure(self, exc: httpx.TransportError) -> float:
        """The wait before sending again; raises ``GatewayUnreachable`` (``ValueError`` for a
        request httpx cannot send) when it is not sent again."""
        self.count += 1
        if isinstance(exc, httpx.LocalProtocolError):
            raise unsendable(self.call, exc) from exc
        safe = isinstance(exc, NOT_SENT) or (isinstance(exc, MAYBE_TAKEN) and repeatable(self.call))
        wait_s = self._wait_s(None) if safe else None
        if wait_s is None:
            raise unreachable(self.call, exc, self.count) from exc
        return wait_s

    def after_answer(self, response: httpx.Response) -> float | None:
        """The wait before sending again, or None: ``answer`` gives the call's end."""
        self.count += 1
        if not self._again(response):
            return None
        return self._wait_s(retry_after_s(response.headers.get("retry-after")))

    def answer(self, response: httpx.Response) -> T:
        return answer_of(self.call, response, self.count)

    def _again(self, response: httpx.Response) -> bool:
        status = response.status_code
        if status not in RETRIED_STATUSES:
            return False
        if status == 429:
            return True
        call = self.call
        if call.taken_once and _request_id_taken(response):
            return False
        return call.taken_once or repeatable(call) or _expects_revision(call)

    def _wait_s(self, retry_after: float | None) -> float | None:
        if self.count > self.policy.retries:
            return None
        left_s = self.policy.max_retry_wait_s - self.waited_s
        if retry_after is not None:
            if retry_after > left_s:
                return None  # the gateway said not before then: no use asking sooner
            wait_s = min(retry_after * (1 + RETRY_AFTER_JITTER * random.random()), left_s)
        else:
            backoff_s = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self.count - 1))
            wait_s = min(backoff_s * (1 - 0.25 * random.random()), left_s)
            if wait_s <= 0:
                return None
        self.waited_s += wait_s
        return wait_s
