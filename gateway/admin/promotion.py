"""Promotion on evidence: what each non-real role did on the latest live requests (its shadow
record, from the decision records), how it fared against real on the latest labelled requests
(paired, with McNemar's exact test), and the gate a promotion may demand of it.

The record itself is computed in the vocabulary (``rendezvous.evidence``) from typed decision
records; the role changes a promotion makes are the deployment state's (``models.deployments``
``promoted``); this module reads the evidence from Redis and judges it for the admin service.
"""

from __future__ import annotations

from typing import Any, cast

from gateway.admin.bodies import Promote
from gateway.observability.live_accuracy import READ_FACTOR
from models.deployment_store import DeploymentStore
from models.deployments import Deployment, ModelRef
from models.replay_store import replay_report_for
from rendezvous import names
from rendezvous.accuracy import gate_shortfalls, latest, paired
from rendezvous.bus.connection import Client
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.evidence import ShadowRecord, shadow_record
from rendezvous.outcomes import decode_labelled


class Evidence:
    def __init__(
        self, client: Client, store: DeploymentStore, shadow_window: int, labelled_window: int
    ):
        self.client = client
        self.store = store
        self.shadow_window = shadow_window
        """How many of the latest decision records a shadow record looks at."""
        self.labelled_window = labelled_window
        """How many of the latest labelled requests the labelled gate looks at: the live
        accuracy's window, so the gate judges the figures the drift report shows."""

    def shadow(self, dep: Deployment) -> dict[str, Any]:
        """The shadow record of every role but real."""
        records = self._records(dep.name)
        return {
            "window": len(records),
            "roles": {
                role: self._shadow_of(dep, role, dep.roles[role], records).to_dict()
                for role in dep.role_names
                if role != names.REAL
            },
        }

    def gate(self, dep: Deployment, candidate: ModelRef, req: Promote) -> dict[str, Any] | None:
        """None when no evidence is demanded; else the figures and what falls short (an
        empty ``shortfalls``: the candidate may be promoted)."""
        shadow_on = bool(req.min_shadow_requests) or req.max_disagreement is not None
        labelled_on = req.min_labeled is not None or req.min_accuracy_gain is not None
        replay_on = (req.require_replay or req.min_replay_records is not None
                     or req.min_replay_agreement is not None)  # fmt: skip
        if not shadow_on and not labelled_on and not replay_on:
            return None
        out: dict[str, Any] = {"shortfalls": []}
        if shadow_on:
            holder = dep.role_of(candidate)
            records = self._records(dep.name)
            record = self._shadow_of(dep, holder or "candidate", candidate, records)
            out["min_shadow_requests"] = req.min_shadow_requests
            out["max_disagreement"] = req.max_disagreement
            out["shadow"] = record.to_dict()
            out["shortfalls"] += record.shortfalls(req.min_shadow_requests, req.max_disagreement)
        if labelled_on:
            figures = self.labelled(dep, candidate)
            out["min_labeled"] = req.min_labeled
            # the bound applied: 0 (not worse) when none was given, as gate_shortfalls has it
            gain = req.min_accuracy_gain
            out["min_accuracy_gain"] = gain if gain is not None else 0.0
            out["significance"] = req.significance
            out["labelled"] = figures
            out["shortfalls"] += gate_shortfalls(
                figures, req.min_labeled, req.min_accuracy_gain, req.significance
            )
        if replay_on:
            report = replay_report_for(self.client, dep.name, candidate.version, candidate.name,
                                       req.min_replay_records)  # fmt: skip
            out["replay"] = None if report is None else replay_summary(report)
            out["shortfalls"] += replay_shortfalls(
                report, candidate, req.min_replay_records, req.min_replay_agreement
            )
        return out

    def labelled(self, dep: Deployment, candidate: ModelRef) -> dict[str, Any]:
        """``candidate`` against real's current version on the latest labelled requests that
        both scored."""
        raw = self.client.xrevrange(
            names.labelled_stream(dep.name), count=self.labelled_window * READ_FACTOR
        )
        rows = latest(decode_labelled(list(reversed(cast(list[Any], raw)))), self.labelled_window)
        return paired(rows, str(candidate), str(dep.roles[names.REAL]))

    def _records(self, name: str) -> list[DecisionRecord]:
        entries = self.client.xrevrange(names.decisions_stream(name), count=self.shadow_window)
        return decode_entries(entries)

    def _shadow_of(
        self, dep: Deployment, role: str, ref: ModelRef, records: list[DecisionRecord]
    ) -> ShadowRecord:
        if dep.roles.get(role) != ref:
            return shadow_record([], role, model=ref.name, version=ref.version)
        since = self.store.role_since_ms(dep.name, role)
        return shadow_record(records, role, model=ref.name, version=ref.version, since_ms=since)


def replay_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the gate's answer and the history keep of a replay report (the whole report stays
    retrievable by its id)."""
    agreement = report.get("agreement") or {}
    return {
        "id": report.get("id"),
        "records": report.get("records"),
        "agreement_rate": agreement.get("rate"),
        "accuracy": (report.get("accuracy") or {}).get("accuracy"),
        "disagreement_rate_vs_real": (report.get("divergence") or {}).get("disagreement_rate"),
    }


def replay_shortfalls(
    report: dict[str, Any] | None,
    candidate: ModelRef,
    min_records: int | None,
    min_agreement: float | None,
) -> list[str]:
    """What a candidate's replay (the latest finished one with ``min_records``, else the
    latest) falls short of (empty: it passes)."""
    if report is None:
        return [f"no finished replay of {candidate.name} v{candidate.version} "
                f"(rdv replay --version {candidate.version})"]  # fmt: skip
    out = []
    records = int(report.get("records") or 0)
    if min_records is not None and records < min_records:
        out.append(f"replay {report.get('id')} scored {records} archived records, fewer than "
                   f"min_replay_records={min_records}")  # fmt: skip
    rate = (report.get("agreement") or {}).get("rate")
    if min_agreement is not None and (rate is None or rate < min_agreement):
        shown = "no answer to compare with" if rate is None else f"{rate:.2%}"
        out.append(f"replay {report.get('id')} agreed with the answers given then on "
                   f"{shown}, below min_replay_agreement={min_agreement}")  # fmt: skip
    return out
