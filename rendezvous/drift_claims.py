"""One list of active drift alerts per deployment, whoever raised them: the merge script and
the documents around it, shared by every source (pure: callers run the script on their own
client, the gateway's async one or the log bin's in its ack pipeline).

Alerts come from several sources at once: the log bins' feature detectors
(``models.feature_watch``, source ``logbin:<consumer>``: every request's rows, judged in
batches), every gateway process's prediction-prior detector (``gateway:<instance>``) and the
drift monitor (``monitor``: merged sketches, on a timer). Each source *claims* the alerts it
holds now (``drift:claims``, one field per source, with a time and a staleness bound), and one
Lua script merges the claims into the active list (``drift:alerts``): an alert is active while
any fresh claim holds it. The script alone writes that list, so a raise or a clear is decided
once, atomically, whatever the sources do concurrently, and its event goes to ``drift:events``
(and a count to ``drift:event-counts``) in the same step. Each event names the source whose call
decided it (``by``): that source tells the webhooks, or, for a log bin (which has no HTTP
client), the gateway process that leads the deployment's drift evaluation relays it.

A claim not renewed within its ``stale_ms`` (a process that died) is dropped by the next call of
any source; its alerts then clear unless another source holds them. Each source sets its own
bound: 10 s for a gateway (another process adopts its alert long before), 180 s for a log bin
(``models.feature_watch.CLAIM_STALE_S``: its restart adopts them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from rendezvous import names

LOGBIN_SOURCE = "logbin:"
"""Prefix of the log bins' sources; their events are relayed to the webhooks by a gateway."""
GATEWAY_SOURCE = "gateway:"
"""Prefix of the gateway processes' sources (the prediction prior)."""

EVENTS_MAXLEN = 1000

MERGE = """
local now = tonumber(ARGV[3])
local okm, merges = pcall(cjson.decode, redis.call('HGET', KEYS[1], '#merges') or '')
if not okm or type(merges) ~= 'table' then merges = {} end
local paused, resumed = tonumber(merges.paused) or 0, tonumber(merges.resumed) or 0
if tonumber(merges.last) ~= nil and now - tonumber(merges.last) > tonumber(ARGV[6]) then
  paused, resumed = tonumber(merges.last), now
end
redis.call('HSET', KEYS[1], '#merges',
           cjson.encode({last = now, paused = paused, resumed = resumed}))
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
-- claims this source took over and no longer needs (their process died): dropped if unchanged
local okr, retire = pcall(cjson.decode, ARGV[8] or '')
if okr and type(retire) == 'table' then
  for src, ts in pairs(retire) do
    local okc, c = pcall(cjson.decode, redis.call('HGET', KEYS[1], src) or '')
    if okc and type(c) == 'table' and tonumber(c.ts_ms) == tonumber(ts) then
      redis.call('HDEL', KEYS[1], src)
    end
  end
end
local wanted, when, figures, fwhen = {}, {}, {}, {}
local claims = redis.call('HGETALL', KEYS[1])
for i = 1, #claims, 2 do
  local ok, c = pcall(cjson.decode, claims[i + 1])
  local ts = ok and type(c) == 'table' and tonumber(c.ts_ms) or nil
  local stale = ok and type(c) == 'table' and tonumber(c.stale_ms) or 0
  local excused = ts ~= nil and ts + stale >= paused
    and now <= resumed + math.max(stale, tonumber(ARGV[7]) or 0)
  if string.sub(claims[i], 1, 1) == '#' then
    -- the merges' own times
  elseif ts == nil or (ts + stale < now and not excused) then
    redis.call('HDEL', KEYS[1], claims[i])
  else
    if type(c.alerts) == 'table' then
      for id, a in pairs(c.alerts) do
        if type(a) == 'table' and (when[id] == nil or ts > when[id]) then
          a.source = claims[i]
          wanted[id], when[id] = a, ts
        end
      end
    end
    if type(c.figures) == 'table' then
      for id, f in pairs(c.figures) do
        if fwhen[id] == nil or ts > fwhen[id] then figures[id], fwhen[id] = f, ts end
      end
    end
  end
end
local events = {}
local function event(kind_of, id, a)
  local e = {type = kind_of, id = id, deployment = ARGV[5], ts_ms = now, by = ARGV[1]}
  for _, k in ipairs({'kind', 'feature', 'value', 'threshold', 'detail', 'since_ms', 'source'}) do
    e[k] = a[k]
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'e', cjson.encode(e))
  events[#events + 1] = e
end
local current = redis.call('HGETALL', KEYS[2])
local have = {}
for i = 1, #current, 2 do
  local id = current[i]
  local ok, old = pcall(cjson.decode, current[i + 1])
  if not ok or type(old) ~= 'table' then old = {kind = id} end
  have[id] = true
  local a = wanted[id]
  if a == nil then
    redis.call('HDEL', KEYS[2], id)
    local f = figures[id]
    if type(f) == 'table' then
      old.value, old.threshold = f.value, f.threshold
    end
    event('cleared', id, old)
  else
    a.since_ms = old.since_ms or now
    a.id = id
    local encoded = cjson.encode(a)
    if encoded ~= current[i + 1] then redis.call('HSET', KEYS[2], id, encoded) end
  end
end
for id, a in pairs(wanted) do
  if not have[id] then
    a.since_ms, a.id = now, id
    redis.call('HSET', KEYS[2], id, cjson.encode(a))
    redis.call('HINCRBY', KEYS[4], a.kind or id, 1)
    event('raised', id, a)
  end
end
if #events == 0 then return '[]' end
return cjson.encode(events)
"""
"""KEYS: claims, alerts, events, event counts (one hash tag); ARGV: source, claim document
('' to only sweep stale claims), now (ms), events' maxlen, deployment, the gap (ms) that is an
outage, the least time (ms) a claim is kept after one, and (optional) the claims to drop as
JSON ``{source: ts_ms}``: each dropped only while it is still the version taken over. Returns
the events this call decided, as JSON.

The claims hash also keeps the time of the last merge, and the two around the latest outage
(``#merges``, a document with no ``ts_ms``, which a reader of the claims skips as stale): when
no merge ran for ``OUTAGE_MS`` (Redis away, or every source of the deployment), a claim that
was fresh when they stopped gets its staleness bound anew from the first merge after. A claim
no source could renew meanwhile was dropped at the first merge after, and its alerts cleared:
a Redis restart of more than 10 s sent the webhooks a "resolved" and, a second later, a
"firing" for every feature alert of a feed still broken (found by a probe)."""

OUTAGE_MS = 5000
"""Longer than the usual gap between a deployment's merges (each source renews its claim at
least every few seconds), shorter than a claim's staleness bound (10 s and more)."""
RESUMED_GRACE_MS = 60_000
"""After an outage, a claim fresh when it began is kept at least this long from the first merge
after (its own bound, if longer): a gateway's (10 s) was dropped before the restarted gateways
were up to adopt it, when the log bin came back first (an upgrade's restart of 10-15 s: a
"resolved" and later a "firing" for a class prior still shifted; a helper's probe)."""


def keys(deployment: str) -> list[str]:
    return [
        names.drift_claims_key(deployment),
        names.drift_alerts_key(deployment),
        names.drift_events_stream(deployment),
        names.drift_event_counts_key(deployment),
    ]


def merge_args(
    deployment: str,
    source: str,
    alerts: Mapping[str, Mapping[str, Any]] | None,
    *,
    stale_ms: float,
    figures: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    now_ms: float | None = None,
    retire: Mapping[str, float] | None = None,
) -> list[Any]:
    """Everything after the script for ``EVAL MERGE``: the key count, the keys and the
    arguments. ``alerts``: the alerts ``source`` holds now (None: only drop stale claims);
    ``figures``: the statistic of alerts this source just released (their clear event carries
    it); ``extra``: more of the source's state, kept with the claim for the drift report;
    ``retire``: the claims of dead sources this one took over and is done with (source ->
    the ``ts_ms`` of the claim taken over), dropped so that they no longer hold its alerts
    until they go stale."""
    now_ms = round(time.time() * 1000 if now_ms is None else now_ms)  # Lua's cjson: 14 digits
    doc = ""
    if alerts is not None:
        body = {"ts_ms": now_ms, "stale_ms": stale_ms, **(extra or {})}
        body["alerts"] = {k: dict(v) for k, v in alerts.items()}
        body["figures"] = {k: dict(v) for k, v in (figures or {}).items()}
        doc = json.dumps(body, default=float)
    args = [
        source,
        doc,
        repr(now_ms),
        str(EVENTS_MAXLEN),
        deployment,
        str(OUTAGE_MS),
        str(RESUMED_GRACE_MS),
    ]
    if retire:
        args.append(json.dumps(dict(retire), default=float))
    return [4, *keys(deployment), *args]


def events_of(raw: Any) -> list[dict[str, Any]]:
    """The raise and clear events a merge returned, in order."""
    events = json.loads(raw)
    return events if isinstance(events, list) else []


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def parse(
    alerts_raw: Mapping[Any, Any], counts_raw: Mapping[Any, Any], claims_raw: Mapping[Any, Any]
) -> dict[str, Any]:
    """The active alerts (sorted by id), the raise counts by kind and the fresh claims, from
    the three hashes as read (bytes or text)."""
    alerts = []
    for key in sorted(alerts_raw, key=_text):
        try:
            alerts.append(json.loads(alerts_raw[key]))
        except ValueError:
            continue
    counts = {_text(k): int(v) for k, v in counts_raw.items()}
    now_ms = time.time() * 1000
    docs = {}
    for key, raw in claims_raw.items():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict):
            docs[_text(key)] = doc
    merges = docs.pop("#merges", {})
    paused, resumed = float(merges.get("paused") or 0), float(merges.get("resumed") or 0)
    claims = {}
    for key, doc in docs.items():
        ts, stale = float(doc.get("ts_ms", 0)), float(doc.get("stale_ms", 0))
        # as the merge script keeps them: fresh, or fresh when the latest outage began and
        # within its grace since (a gateway's prior alert, dropped here at 10 s, was never
        # adopted after an upgrade's restart, and cleared a minute on; a helper's probe)
        excused = ts + stale >= paused and now_ms <= resumed + max(stale, RESUMED_GRACE_MS)
        if ts + stale >= now_ms or excused:
            claims[key] = doc
    return {"alerts": alerts, "event_counts": counts, "claims": claims}


def alert_id(alert: Mapping[str, Any]) -> str:
    """``kind/feature``, or ``kind`` for an alert about no one feature."""
    feature = alert.get("feature")
    return f"{alert['kind']}/{feature}" if feature else str(alert["kind"])


def cleared_figures(cleared: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """What each cleared alert measured, by alert id: a source passes them with its next
    claim, so the clear event says what the alert was."""
    return {alert_id(a): {"value": a.get("value"), "threshold": a.get("threshold")}
            for a in cleared}  # fmt: skip


def event_line(deployment: str, event: Mapping[str, Any]) -> str:
    """One log line for a raise or a clear."""
    value, threshold = event.get("value"), event.get("threshold")
    feature = f" [{event['feature']}]" if event.get("feature") else ""
    detail = f": {event['detail']}" if event.get("detail") and event.get("type") == "raised" else ""
    shown = f"{value:.4g}" if isinstance(value, int | float) else value
    limit = f"{threshold:.4g}" if isinstance(threshold, int | float) else threshold
    return (
        f"drift alert {event.get('type')} on {deployment}: {event.get('kind')}{feature} "
        f"{shown} (threshold {limit}){detail}"
    )
