"""Ground truth in: labels joined by request id to what every bin answered.

``FeedbackService.accept`` takes the items of one feedback call (a class label per request,
or a ``correct`` judgement of the answer that was given), checks them all, finds every
request's kept outcome (``outcome_store``) and then stores them all in one script, or nothing:
the latest label per request in the label buckets (a relabel replaces it), and a joined entry
per item in the capped labelled stream that the live accuracy and the promotion gate read.
A request answered a moment ago may not have its outcome written yet (its decision record
closes after the grace period, outcomes are flushed every quarter second): a miss that may be
such a request is looked up again for up to the deployment's timeout and grace before it is
refused. Any other miss is refused at once: an id the gateway made up says when it was made
(``minted_ms``), and a caller's own id is held for ``RDV_REQUEST_ID_TTL_S`` after it was
published (``names.request_id_key``), so an id that is neither recent nor held was never
answered lately.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.failures import bounded_faults
from gateway.dataplane.outcome_store import ENTRY_OVERHEAD_BYTES, OutcomeStore
from gateway.problems import not_json
from models.deployments import Deployment
from rendezvous import names
from rendezvous.outcomes import Label, Outcome, label_problems
from rendezvous.request_ids import is_request_id, minted_ms

MAX_ID_CHARS = 128
MAX_WEIGHT = 1e6
"""The largest sample weight a label may carry."""
RETRY_FIRST_S = 0.02
RETRY_MAX_S = 0.25
"""A miss is looked up again after 20 ms, then twice as long each time up to 250 ms: a label
sent right after its prediction is accepted quickly, an unknown id costs ~15 lookups."""
CLOCK_SKEW_S = 10.0
"""How far apart the clocks of the gateways' hosts may be: an id another host made is taken
as recent for this much longer than the wait."""
SHOWN_IDS = 20
"""A 404 lists at most this many unknown ids (and says how many there were)."""

_STORE = """
local maxlen = ARGV[1]
local ttl = tonumber(ARGV[2])
local overhead = tonumber(ARGV[3])
local relabelled = 0
local at = 4
while at <= #ARGV do
  local slot = tonumber(ARGV[at])
  local key, entries = KEYS[slot], KEYS[slot + 1]
  local bucket, rid, label, outcome = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  at = at + 5
  if redis.call('HSET', key, rid, label) == 1 then
    redis.call('HINCRBY', KEYS[2], 'b:' .. bucket, 2 * #rid + #label + 2 * overhead)
  else
    relabelled = relabelled + 1
  end
  local replaced = redis.call('HGET', entries, rid)
  if replaced then redis.call('XDEL', KEYS[1], replaced) end
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'r', rid, 'y', label,
                        'o', outcome)
  redis.call('HSET', entries, rid, id)
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', entries, ttl)
end
return relabelled
"""
"""KEYS: the labelled stream, the outcome state, then per bucket its labels and their entries;
ARGV: maxlen, ttl, overhead, then per item (its bucket's labels slot, bucket, request id,
label, outcome). Returns how many items replaced a label (earlier, or in this very call).
A relabel deletes the entry it replaces: one entry a request, whoever sends it how often."""


class FeedbackRefused(ValueError):
    """A feedback call that stores nothing: ``status`` and what is wrong."""

    def __init__(self, status: int, detail: Any, **extra: Any):
        super().__init__(detail if isinstance(detail, str) else json.dumps(detail))
        self.status = status
        self.detail = detail
        self.extra = extra


ClassName = Annotated[str, Field(min_length=1, max_length=200)]


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    """As predict takes it (``X-Request-Id``, the Open Inference Protocol's ``id``): an id no
    request can carry is a 422, as there, not an unknown id (404)."""
    label: StrictInt | ClassName | list[StrictInt | ClassName] | None = None
    """The true class (as predict returns it, or its name among the real model's
    ``class_names``), or one per row of a request of several rows."""
    correct: StrictBool | None = None
    """Instead of ``label``: was the answer given right?"""
    weight: float = Field(default=1.0, gt=0, le=MAX_WEIGHT, allow_inf_nan=False, strict=True)
    """A number (not a string or a boolean) in (0, ``MAX_WEIGHT``]: weighted sums of a
    thousand labels must stay finite (a weight of 1e308 made the accuracy figures NaN and the
    drift report unservable)."""

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, value: str) -> str:
        if not is_request_id(value):
            raise ValueError(f"request_id must be 1-{MAX_ID_CHARS} printable ASCII characters, "
                             "no space at either end (as X-Request-Id)")  # fmt: skip
        return value


@dataclass(frozen=True, slots=True)
class Accepted:
    accepted: int
    relabelled: int


def parse_items(body: bytes, max_items: int) -> list[FeedbackItem]:
    """One object or a JSON array of them; 400 for what is not JSON, 413 beyond ``max_items``,
    422 naming each fault."""
    try:  # pydantic-core's parser caps the nesting depth: a hostile body is a 400, not a 500
        doc = pydantic_core.from_json(body)
    except ValueError as exc:
        raise FeedbackRefused(400, not_json(body, exc)) from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise FeedbackRefused(422, "an empty array: give at least one feedback item")
    if len(items) > max_items:
        raise FeedbackRefused(
            413, f"{len(items)} feedback items in one call, more than RDV_MAX_ROWS={max_items}"
        )
    out, faults = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            faults.append({"type": "object_type", "loc": ["body", i],
                           "msg": "each item must be an object"})  # fmt: skip
            continue
        try:
            parsed = FeedbackItem.model_validate(item)
        except ValidationError as exc:
            said_label = False
            for err in exc.errors():
                if err["loc"][:1] == ("label",):  # one line, not one per union branch
                    if not said_label:
                        faults.append(_label_fault(i, item.get("label")))
                        said_label = True
                    continue
                fault: dict[str, Any] = dict(err)
                fault["loc"] = ["body", i, *err["loc"]]
                faults.append(fault)
            continue
        if (parsed.label is None) == (parsed.correct is None):
            faults.append({"type": "label_or_correct", "loc": ["body", i],
                           "msg": "give 'label' or 'correct', exactly one of them"})  # fmt: skip
            continue
        out.append(parsed)
    if faults:
        raise FeedbackRefused(422, bounded_faults(faults))
    return out


def _label_fault(i: int, given: Any) -> dict[str, Any]:
    """A label of the wrong type: pydantic listed each branch of the union it tried (four to
    six faults, each showing ``"input": null``) and said nothing of the rule (a probe)."""
    shown = json.dumps(given)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return {"type": "label_type", "loc": ["body", i, "label"],
            "msg": f"label {shown} is not a class (an integer as predict returns it, or its name),"
                   " nor a list of them, one per row of the request"}  # fmt: skip


class FeedbackService:
    def __init__(
        self,
        client: Any,
        deployments: DeploymentCache,
        outcomes: OutcomeStore,
        *,
        max_items: int,
        labelled_maxlen: int,
        classes_of: Callable[[str, int], Awaitable[list[int] | None]],
        request_id_ttl_s: float = 0.0,
        class_names_of: Callable[[str, int], Awaitable[list[str] | None]] | None = None,
    ):
        self.client = client
        self.deployments = deployments
        self.outcomes = outcomes
        self.max_items = max_items
        self.labelled_maxlen = labelled_maxlen
        self.classes_of = classes_of
        self.request_id_ttl_s = request_id_ttl_s
        """How long a caller's own id stays held (0: unknown, so any miss may be recent)."""
        self.class_names_of = class_names_of

    async def accept(self, deployment: str, body: bytes) -> Accepted:
        dep = self.deployments.get(deployment)
        if not self.outcomes.enabled:
            raise FeedbackRefused(404, "feedback is off (RDV_FEEDBACK_RETENTION_S=0)")
        items = parse_items(body, self.max_items)
        real = dep.roles[names.REAL]
        classes = await self.classes_of(real.name, real.version)
        if any(_named(item.label) for item in items):
            items = await self._by_class(deployment, items, classes, real.name, real.version)
        for i, item in enumerate(items):
            if isinstance(item.label, int) and classes and item.label not in classes:
                raise FeedbackRefused(
                    422, f"item {i}: label {item.label} is not a class of deployment "
                    f"{deployment} (classes {classes})",
                )  # fmt: skip
        ids = list(dict.fromkeys(item.request_id for item in items))
        deadline_s = (dep.schedule.timeout_ms + dep.schedule.grace_ms) / 1000
        found = await self._find(dep, ids, deadline_s + 2 * self.outcomes.flush_s + 0.5)
        missing = [i for i in ids if i not in found]
        if missing:
            shown = ", ".join(missing[:SHOWN_IDS])
            more = f" and {len(missing) - SHOWN_IDS} more" if len(missing) > SHOWN_IDS else ""
            raise FeedbackRefused(
                404,
                f"unknown or expired request id{'s' if len(missing) > 1 else ''}: {shown}{more} "
                f"(outcomes are kept {self.outcomes.retention_s:.0f} s; a request no model had "
                "scored when it was decided, a 504 or 502 with no output at all, keeps none: "
                "no answer to judge); nothing was stored",
                unknown=missing[:SHOWN_IDS],
            )
        now_ms = int(time.time() * 1000)
        writes = []
        for i, item in enumerate(items):
            bucket, blob = found[item.request_id]
            outcome = Outcome.decode(blob)
            labels = None
            if item.label is not None:
                given = item.label if isinstance(item.label, list) else [item.label]
                labels = tuple(y for y in given if isinstance(y, int))  # names resolved above
                assert len(labels) == len(given)
                problem = label_problems(outcome.rows, labels, classes)
                if problem is not None:
                    raise FeedbackRefused(422, f"item {i} ({item.request_id}): {problem}")
            label = Label(labels, item.correct, float(item.weight), now_ms)
            writes.append((bucket, item.request_id, label.encode(), blob))
        relabelled = await self._store(deployment, writes)
        return Accepted(len(items), relabelled)

    async def _by_class(
        self,
        deployment: str,
        items: list[FeedbackItem],
        classes: list[int] | None,
        model: str,
        version: int,
    ) -> list[FeedbackItem]:
        """``items`` with each label given by name as its class: the names are the real
        model's ``class_names`` (a model trained on strings is uploaded with its classes as
        integers and their names; its labels came back as a 422 listing two type errors,
        found by a helper's probe)."""
        given = await self.class_names_of(model, version) if self.class_names_of else None
        by_name = dict(zip(given or [], classes or [], strict=False))

        def one(i: int, label: int | str) -> int:
            if isinstance(label, int):
                return label
            if label not in by_name:
                raise FeedbackRefused(
                    422, f"item {i}: label {label[:64]!r} is not a class name of deployment "
                    f"{deployment} (names {list(by_name)[:20]}, classes {classes})",
                )  # fmt: skip
            return by_name[label]

        out = []
        for i, item in enumerate(items):
            label = item.label
            if isinstance(label, list):
                label = [one(i, y) for y in label]
            elif label is not None:
                label = one(i, label)
            out.append(item.model_copy(update={"label": label}))
        return out

    async def _find(
        self, dep: Deployment, ids: list[str], wait_s: float
    ) -> dict[str, tuple[int, bytes]]:
        found = await self.outcomes.find(dep.name, ids)
        if len(found) == len(ids):
            return found
        await self.outcomes.flush()  # this process's own latest outcomes
        deadline = time.monotonic() + wait_s
        coming = await self._recent(dep, [i for i in ids if i not in found], wait_s)
        pause_s = RETRY_FIRST_S
        while coming:
            found.update(await self.outcomes.find(dep.name, coming, within_s=wait_s))
            coming = [i for i in coming if i not in found]
            if not coming or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(pause_s, max(0.0, deadline - time.monotonic())))
            pause_s = min(2 * pause_s, RETRY_MAX_S)
            await self.outcomes.flush()
        return found

    async def _recent(self, dep: Deployment, ids: list[str], wait_s: float) -> list[str]:
        """The ids among ``ids`` that may name a request answered so lately that its outcome
        is still on its way: made up by a gateway within the wait (and the clocks' skew), or a
        caller's own id still held. The rest are unknown or expired."""
        horizon_ms = (wait_s + CLOCK_SKEW_S) * 1000
        if self.request_id_ttl_s * 1000 < horizon_ms:
            return ids  # a caller's id may be released before its outcome is written
        now_ms = time.time() * 1000
        recent: list[str] = []
        held: list[str] = []
        for rid in ids:
            minted = minted_ms(rid)
            made_lately = minted is not None and abs(now_ms - minted) <= horizon_ms
            (recent if made_lately else held).append(rid)
        if held:
            counts = (dep.partitions, *dep.past_partitions)
            since_ms = now_ms - self.request_id_ttl_s * 1000
            owners: list[str] = []
            pipe = self.client.pipeline(transaction=False)
            for rid in held:
                keys = names.request_id_keys(dep.name, rid, counts)
                for key in dict.fromkeys([*keys, *dep.earlier_id_keys(rid, since_ms)]):
                    owners.append(rid)
                    pipe.exists(key)
            taken = zip(owners, await pipe.execute(), strict=True)
            recent += dict.fromkeys(rid for rid, exists in taken if exists)
        return recent

    async def _store(self, deployment: str, writes: list[tuple[int, str, bytes, bytes]]) -> int:
        keys = [names.labelled_stream(deployment), names.outcomes_state_key(deployment)]
        index: dict[int, int] = {}
        args: list[Any] = [self.labelled_maxlen, self.outcomes.ttl_s, ENTRY_OVERHEAD_BYTES]
        for bucket, rid, label, blob in writes:
            if bucket not in index:
                keys.append(names.labels_key(deployment, bucket))
                index[bucket] = len(keys)
                keys.append(names.label_entries_key(deployment, bucket))
            args += [index[bucket], bucket, rid, label, blob]
        return int(await self.client.eval(_STORE, len(keys), *keys, *args))


def _named(label: int | str | list[int | str] | None) -> bool:
    """A label given by a class's name (a string), or a list holding one."""
    return isinstance(label, str) or (
        isinstance(label, list) and any(isinstance(y, str) for y in label)
    )


class ModelClasses:
    """The classes a model version answers, from the registry's index in Redis, else from this
    gateway's data folder (``local_meta``); looked up once per version (they never change)."""

    def __init__(
        self,
        client: Any,
        local_meta: Callable[[str, int], Mapping[str, Any] | None] | None = None,
    ):
        self.client = client
        self.local_meta = local_meta
        self._known: dict[str, list[int]] = {}
        self._names: dict[str, list[str]] = {}

    async def __call__(self, name: str, version: int) -> list[int] | None:
        key = f"{name}:{version}"
        if key not in self._known:
            raw = await self.client.hget(names.MODELS_INDEX, key)
            meta: Mapping[str, Any] | None = json.loads(raw) if raw else None
            if meta is None and self.local_meta is not None:
                meta = await asyncio.to_thread(self.local_meta, name, version)
            if meta is None:
                return None
            self._known[key] = [int(c) for c in meta["classes"]]
            shown = meta.get("class_names") or []
            self._names[key] = [str(n) for n in shown] or [str(c) for c in self._known[key]]
        return self._known[key]

    async def class_names(self, name: str, version: int) -> list[str] | None:
        """The names of the classes, in their order (each class as text where none given)."""
        if await self(name, version) is None:
            return None
        return self._names[f"{name}:{version}"]
