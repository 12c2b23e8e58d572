"""The calls, built once (``Call``: method, path, body, what to make of the answer) and sent by
a sync or an async httpx client, so both clients say the same thing."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Generic, SupportsFloat, SupportsIndex, TypeAlias, TypeVar

import httpx

from rdv_client.admin import segment
from rdv_client.types import GatewayUnreachable, Job, JobExists, Prediction, RdvError

T = TypeVar("T")
Rows: TypeAlias = Sequence[Sequence[SupportsFloat]] | Sequence[SupportsFloat] | Any
"""A predict's rows: a 2-D numpy array, a pandas DataFrame (in its column order), a sequence of
rows of numbers, or one row (numpy's arrays are not ``Sequence`` to a type checker)."""


Labels: TypeAlias = int | str | SupportsIndex | Sequence[int | str | SupportsIndex]
"""A feedback label: a class (or its name among the real model's ``class_names``), or one per
row of a request of several rows. ``SupportsIndex``: numpy's integers, made plain when sent."""


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    admin: bool = False
    feedback: bool = False
    """Sent with the client's feedback token, when it has one (``RDV_FEEDBACK_TOKEN``)."""
    wait_s: float = 0.0
    """How long the server may hold the answer on purpose (a long poll): added to the
    client's timeout, which would otherwise cut a wait longer than itself."""
    taken_once: bool = False
    """A predict or a submit: the gateway takes it once per request id, and its 503 means it
    took nothing (it never took the id, or freed it), unless the detail asks for a new id
    (``rdv_client.retries``)."""


def body_of(
    features: Mapping[str, SupportsFloat] | None,
    instances: Rows | None,
    entity: str | None = None,
    entities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The predict body. With a deployment that looks features up, ``entity`` names the one
    row's entity (its other features in ``features``, or none) and ``entities`` one per row of
    ``instances``."""
    body: dict[str, Any] = {}
    if entity is not None:
        body["entity"] = entity
    if entities is not None:
        body["entities"] = list(entities)
    if features is not None and instances is not None:
        raise ValueError("give features (one row, by name) or instances (rows), not both")
    if features is None and instances is None and not body:
        raise ValueError("give exactly one of features (one row, by name) or instances (rows)")
    if features is not None:
        try:
            body["features"] = {name: _number(value) for name, value in features.items()}
        except NotFinite:
            where = next(n for n, v in features.items() if _not_finite(v))
            raise NotFinite(
                f"features[{where!r}]: {float(features[where])!r} {NOT_FINITE}"
            ) from None
    if instances is not None:
        body["instances"] = _rows(instances)
    return body


class NotFinite(ValueError):
    """A NaN or an infinity, which JSON cannot carry: refused before anything is sent, naming
    where it was (httpx's encoder said only "Out of range float values are not JSON
    compliant"; a helper's probe)."""


NOT_FINITE = "is not a finite number: JSON has no NaN or infinity (the gateway refuses one, 422)"


def _not_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not math.isfinite(value)


def _number(value: Any) -> Any:
    """A number as JSON has it (numpy's scalars are not JSON); anything else as given, for
    the gateway to name. A bool stays one (it was sent as 1.0, so ``correct=True``,
    ``force=True`` and ``pin_canary`` were refused, and a bool feature taken for a number;
    found by a helper's probe). ``NotFinite`` for a NaN or an infinity."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's too
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if number - number != 0.0:  # NaN or an infinity, in one subtraction a value
            raise NotFinite(f"{number!r} {NOT_FINITE}")
        return number
    return value


def _rows(instances: Any) -> list[list[Any]]:
    """Rows as lists of numbers: a 2-D array or sequence of rows, a pandas DataFrame (its
    rows, in its column order: the deployment's order is the caller's to give), or one row
    (a 1-D array or list of numbers), which was a TypeError."""
    if hasattr(instances, "to_numpy") and hasattr(instances, "columns"):  # a DataFrame
        instances = instances.to_numpy()
    one_row = (
        instances.ndim == 1
        if hasattr(instances, "ndim")
        else isinstance(instances, Sequence) and bool(instances) and not _is_row(instances[0])
    )
    rows = [instances] if one_row else instances
    try:
        return [[_number(v) for v in row] for row in rows]
    except NotFinite:  # where: looked for only now, off the common path
        i, j, value = next((i, j, v) for i, row in enumerate(rows)
                           for j, v in enumerate(row) if _not_finite(v))  # fmt: skip
        at = f"instances[{j}]" if one_row else f"instances[{i}][{j}]"
        raise NotFinite(f"{at}: {float(value)!r} {NOT_FINITE}") from None


def _is_row(value: Any) -> bool:
    return hasattr(value, "__iter__") and not isinstance(value, str | bytes)


def plain(doc: Any) -> Any:
    """``doc`` with numpy's scalars and arrays made JSON's numbers and lists (httpx's encoder
    refuses them), at any depth: an admin body's version, a feedback label."""
    if isinstance(doc, Mapping):
        return {key: plain(value) for key, value in doc.items()}
    if isinstance(doc, list | tuple):
        return [plain(value) for value in doc]
    if hasattr(doc, "tolist") and not isinstance(doc, str | bytes):  # a numpy array or scalar
        return plain(doc.tolist())
    return _number(doc)


def feedback_body(
    items: Sequence[Mapping[str, Any]] | None,
    request_id: str | None,
    label: Labels | None,
    correct: bool | None,
    weight: float | None,
) -> Any:
    """Many ``items`` (each ``{"request_id", "label" | "correct"[, "weight"]}``), or one
    item's fields: the gateway checks them all (an array is all or nothing)."""
    if items is not None:
        if request_id is not None:
            raise ValueError("give items, or one item's fields, not both")
        return [dict(item) for item in items]
    if request_id is None:
        raise ValueError("give items, or request_id with label or correct")
    item: dict[str, Any] = {"request_id": request_id}
    if label is not None:
        if isinstance(label, str) or not isinstance(label, Sequence):
            item["label"] = label  # one class (numpy's too: made plain when sent), or a name
        else:
            item["label"] = list(label)
    if correct is not None:
        item["correct"] = correct
    if weight is not None:
        item["weight"] = weight
    return item


def _rid(request_id: str | None) -> dict[str, str] | None:
    """The header. An id that HTTP cannot carry is refused here (the gateway says what else
    is wrong with one): httpx raised a transport error for it, which reads as a gateway out
    of reach, safe to retry."""
    if request_id is None:
        return None
    if not (request_id.isascii() and request_id.isprintable() and request_id == request_id.strip()):
        raise ValueError(
            f"request_id {request_id[:40]!r} cannot be an HTTP header: printable ASCII "
            "characters, no space at either end"
        )
    return {"X-Request-Id": request_id}


def checked_actor(actor: str | None) -> str | None:
    """An actor the gateway takes: printable ASCII (httpx raised UnicodeEncodeError at every
    admin call for "José"; found by a review)."""
    if actor is not None and not (actor and actor.isascii() and actor.isprintable()):
        raise ValueError(f"actor {actor[:40]!r} must be printable ASCII (it is an HTTP header)")
    return actor


def _doc(doc: Any) -> dict[str, Any]:
    """An admin or feedback answer: a JSON object."""
    if not isinstance(doc, dict):
        raise RdvError(200, f"the gateway answered {type(doc).__name__}, not a JSON object")
    return doc


class Calls:
    """Every call the gateway answers, as a description."""

    @staticmethod
    def predict(deployment: str, body: dict[str, Any],
                request_id: str | None) -> Call[Prediction]:  # fmt: skip
        return Call("POST", f"/v1/deployments/{segment(deployment)}/predict", Prediction.from_json,
                     json=body, headers=_rid(request_id), taken_once=True)  # fmt: skip

    @staticmethod
    def submit(deployment: str, body: dict[str, Any],
               request_id: str | None) -> Call[Job]:  # fmt: skip
        return Call("POST", f"/v1/deployments/{segment(deployment)}/jobs", Job.from_json,
                     json=body, headers=_rid(request_id), taken_once=True)  # fmt: skip

    @staticmethod
    def result(deployment: str, job_id: str, wait_ms: int | None) -> Call[Job]:
        params = {"wait_ms": wait_ms} if wait_ms is not None else None
        return Call("GET", f"/v1/deployments/{segment(deployment)}/jobs/{segment(job_id)}",
                     Job.from_json, params=params,
                     wait_s=max(wait_ms or 0, 0) / 1000)  # fmt: skip

    @staticmethod
    def cancel(deployment: str, job_id: str) -> Call[Job]:
        return Call("DELETE", f"/v1/deployments/{segment(deployment)}/jobs/{segment(job_id)}",
                     Job.from_json)  # fmt: skip

    @staticmethod
    def feedback(deployment: str, body: Any) -> Call[dict[str, Any]]:
        return Call("POST", f"/v1/deployments/{segment(deployment)}/feedback", _doc, json=body,
                     feedback=True)  # fmt: skip

    @staticmethod
    def drift(deployment: str, feature: str | None, features: bool) -> Call[dict[str, Any]]:
        path = f"/v1/deployments/{segment(deployment)}/drift" + ("/features" if features else "")
        return Call("GET", path, _doc, params={"feature": feature} if feature else None)

    @staticmethod
    def admin(method: str, path: str, json: Any = None,
              params: Mapping[str, Any] | None = None) -> Call[dict[str, Any]]:  # fmt: skip
        return Call(method, f"/admin{path}", _doc, json=json, params=params, admin=True)


def request_of(
    call: Call[Any],
    tokens: tuple[str | None, str | None],
    timeout: httpx.Timeout,
    actor: str | None = None,
) -> dict[str, Any]:
    """``tokens``: the client's admin and feedback tokens; ``actor``: who the admin calls'
    changes are recorded as (``X-Actor``)."""
    admin_token, feedback_token = tokens
    headers = dict(call.headers or {})
    if call.admin:
        if not admin_token:
            raise ValueError("an admin call needs the client's admin_token (RDV_ADMIN_TOKEN)")
        headers["Authorization"] = f"Bearer {admin_token}"
        if actor:
            headers["X-Actor"] = actor
    elif call.feedback and feedback_token:
        headers["Authorization"] = f"Bearer {feedback_token}"
    request = {"method": call.method, "url": call.path, "json": plain(call.json),
               "params": call.params, "headers": headers}  # fmt: skip
    if call.wait_s and timeout.read is not None:
        request["timeout"] = httpx.Timeout(
            connect=timeout.connect,
            read=timeout.read + call.wait_s,
            write=timeout.write,
            pool=timeout.pool,
        )
    return request


def retry_after_s(value: str | None) -> float | None:
    """Seconds from ``Retry-After``: a number of seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def answer_of(call: Call[T], response: httpx.Response, tries: int = 1) -> T:
    """The call's value, or its refusal raised (``tries``: how many times it was sent)."""
    try:
        doc = response.json() if response.content else None
    except ValueError:
        doc = None
    if response.status_code >= 400:
        body = doc if isinstance(doc, dict) else {}
        detail = body.get("detail", body.get("error")) if body else response.text
        submitted = call.method == "POST" and call.parse == Job.from_json
        if response.status_code == 409 and submitted and "id" in body and "location" in body:
            raise JobExists(response.status_code, detail, body, tries)
        retry = retry_after_s(response.headers.get("retry-after"))
        raise RdvError(response.status_code, detail, retry, body, tries)
    if call.parse == Job.from_json and isinstance(doc, dict) and "location" not in doc:
        # a submit's Location header; a poll or a cancel was sent to the job's own place
        here = call.path if call.method != "POST" else None
        doc = {**doc, "location": response.headers.get("location") or here}
    return call.parse(doc)


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


WAIT_POLL_PAUSE_S = 1.0
"""A wait's pause after a poll that reached no gateway (one restarting, say)."""


class Waiting:
    """A wait for a job's end as long polls of at most ``poll_ms`` each (the gateway refuses
    one longer than ``RDV_JOB_MAX_WAIT_MS``, 30 s by default) until ``timeout_s``."""

    def __init__(self, job: Job | str, timeout_s: float, poll_ms: int):
        if timeout_s < 0 or poll_ms < 1:
            raise ValueError("timeout_s cannot be negative, and poll_ms must be 1 or more")
        self.job_id = _job_id(job)
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.poll_ms = poll_ms

    def next_wait_ms(self, job: Job | None) -> int | None:
        """The next poll's wait; None once ``job`` ended. TimeoutError past the deadline."""
        if job is not None and job.finished:
            return None
        left_ms = int((self.deadline - time.monotonic()) * 1000)
        if job is not None and left_ms <= 0:
            raise TimeoutError(f"job {self.job_id} still {job.status} after {self.timeout_s} s")
        return max(0, min(self.poll_ms, left_ms))

    def pause_after(self, exc: Exception) -> float | None:
        """The pause before polling again after a poll that failed for a moment (a 429 or 503
        the client's retries did not outlast, or no gateway reached), or None: raise it. A
        wait is a read, and its budget is ``timeout_s``, not the client's retries: a routine
        failover (503s for 2-3 s) ended waits on healthy jobs (a helper's probe)."""
        if isinstance(exc, RdvError) and (bound := _wait_bound(exc)) is not None:
            if bound >= self.poll_ms:
                return None
            self.poll_ms = bound  # the gateway's RDV_JOB_MAX_WAIT_MS: every wait failed on it
            pause_s: float | None = 0.0
        elif isinstance(exc, RdvError):
            pause_s = exc.retry_after
        else:
            pause_s = WAIT_POLL_PAUSE_S if isinstance(exc, GatewayUnreachable) else None
        left_s = self.deadline - time.monotonic()
        if pause_s is None or left_s <= 0:
            return None
        return min(max(pause_s, 0.0), left_s)


def _wait_bound(exc: RdvError) -> int | None:
    """The gateway's longest long poll, from its 422 refusing a longer ``wait_ms`` (None: not
    that refusal)."""
    if exc.status != 422 or not isinstance(exc.detail, list):
        return None
    for fault in exc.detail:
        if isinstance(fault, dict) and fault.get("loc") == ["query", "wait_ms"]:
            bound = (fault.get("ctx") or {}).get("le")
            return bound if isinstance(bound, int) and bound >= 1 else None
    return None


def unsendable(call: Call[Any], exc: httpx.LocalProtocolError) -> ValueError:
    """httpx refused to send the request: nothing reached the gateway, and the same request
    would fail again (a retry would not help, unlike ``GatewayUnreachable``)."""
    return ValueError(f"{call.method} {call.path}: not sendable as HTTP: {exc}")


def unreachable(call: Call[Any], exc: httpx.TransportError, tries: int = 1) -> GatewayUnreachable:
    what = "no answer in time" if isinstance(exc, httpx.TimeoutException) else "not reached"
    after = f" (after {tries} tries)" if tries > 1 else ""
    return GatewayUnreachable(f"{call.method} {call.path}: {what}: {exc!r}{after}")
