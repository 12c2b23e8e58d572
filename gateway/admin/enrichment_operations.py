"""The enrichment operations of the admin API: declare (or drop) the features a deployment
looks up by entity, load entities' features into the online store (all or nothing, each row
checked first), and read one entity back as the gateway would.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from gateway.admin.bodies import Conflict, EnrichmentPatch, Invalid, NotFound
from gateway.admin.service_core import AdminCore
from rendezvous import names
from rendezvous.input_types import InputRule, faults
from rendezvous.spec import Lookup, float32_number, shown_stored, stored_number


class EnrichmentOperations(AdminCore):
    """``/admin/deployments/{d}/enrichment`` and ``.../entities``: the online feature store."""

    def set_enrichment(self, name: str, req: EnrichmentPatch, actor: str) -> dict[str, Any]:
        """Declare (or, with null, drop) the features the deployment looks up by entity; the
        gateways follow within their refresh interval, and the change is in the history."""
        before = self._dep(name).feature_spec
        spec = self._with_lookup(before, req.lookup)
        if spec.lookup == before.lookup:
            if spec.lookup is None:
                raise Conflict(f"{name} looks nothing up: there is no lookup to drop")
            raise Conflict(f"{name} already has that lookup")
        detail = {"lookup": [x.to_dict() if x else None for x in (before.lookup, spec.lookup)]}
        return self._change(
            name,
            lambda d: dataclasses.replace(d, feature_spec=d.feature_spec.with_lookup(spec.lookup)),
            "set-enrichment",
            actor,
            req.reason,
            detail,
        )

    def load_entities(self, name: str, rows: list[dict[str, Any]], actor: str) -> dict[str, Any]:
        """Write each entity's features (``{<key>: "c-17", <feature>: number, ...}``) to the
        online store, in one pipelined round trip; the features an entity does not give keep
        their stored values. All or nothing: one bad row refuses the batch, naming it."""
        dep = self._dep(name)
        lookup = dep.feature_spec.lookup
        if lookup is None:
            raise Conflict(
                f"deployment {name} looks nothing up: declare its lookup first "
                f"(PATCH /admin/deployments/{name}/enrichment)"
            )
        writes, errors = _entity_writes(lookup, rows, dep.input_rule)
        if errors:
            raise Invalid(
                f"{len(errors)} of {len(rows)} entities refused; nothing was written",
                errors=errors[:10],
            )
        pipe = self.client.pipeline(transaction=False)
        for entity, values in writes:
            pipe.hset(names.entity_key(name, entity), mapping=values)  # type: ignore[arg-type]
        pipe.execute()
        return {"deployment": name, "key": lookup.key, "loaded": len(writes), "by": actor}

    def entity(self, name: str, entity: str) -> dict[str, Any]:
        """One entity's stored features, as the gateway would read them."""
        lookup = self._dep(name).feature_spec.lookup
        if lookup is None:
            raise NotFound(f"deployment {name} looks nothing up")
        key = names.entity_key(name, entity)
        stored = self.client.hmget(key, list(lookup.features))
        values: dict[str, float] = {}
        unusable: dict[str, str] = {}
        for feature, value in zip(lookup.features, stored, strict=True):
            if value is None:
                continue
            number = stored_number(value)
            if math.isfinite(number):
                values[feature] = number
            else:  # written by hand beside the API: predict refuses the entity (422)
                unusable[feature] = shown_stored(value)
        if not values and not unusable:
            held = sorted(self.client.hkeys(key))  # a second round trip, for the 404 only
            if held:  # loaded for a lookup of other features (a helper's probe: "not in")
                shown = [f.decode() if isinstance(f, bytes) else str(f) for f in held[:5]]
                raise NotFound(f"{lookup.key} {entity!r} holds none of the looked-up features "
                               f"{list(lookup.features)[:5]} (it holds {shown}: loaded for "
                               "another lookup; load it again)")  # fmt: skip
            raise NotFound(f"{lookup.key} {entity!r} is not in the feature store of {name}")
        doc: dict[str, Any] = {"deployment": name, lookup.key: entity, "features": values}
        if unusable:
            doc["unusable"] = unusable
        return doc

    def delete_entity(self, name: str, entity: str, actor: str) -> dict[str, Any]:
        """Remove one entity from the online store (a customer gone, a key loaded by mistake):
        predict then finds nothing for it (the lookup's defaults, else 422)."""
        self._dep(name)
        if not names.ENTITY_PATTERN.fullmatch(entity):
            raise NotFound(f"no entity {entity[:130]!r} in the feature store of {name}")
        if not self.client.delete(names.entity_key(name, entity)):
            raise NotFound(f"no entity {entity!r} in the feature store of {name}")
        return {"deployment": name, "entity": entity, "deleted": True, "by": actor}


def _entity_writes(
    lookup: Lookup, rows: list[dict[str, Any]], rule: InputRule | None = None
) -> tuple[list[tuple[str, dict[str, float]]], list[dict[str, Any]]]:
    """(entity, values) per row, and what is wrong with the rows that are not right: for a
    deployment of an integer model, what it cannot take too (5.5 was stored, and every predict
    naming the entity refused; a helper's probe)."""
    known = set(lookup.features)
    writes: list[tuple[str, dict[str, float]]] = []
    errors: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        entity = row.get(lookup.key)
        values = {k: v for k, v in row.items() if k != lookup.key}
        problems = []
        if entity is None:
            problems.append(f"no {lookup.key}: each row names its entity")
        elif not isinstance(entity, str):
            kind = {bool: "true or false", int: "a number", float: "a number", list: "an array",
                    dict: "an object"}.get(type(entity), type(entity).__name__)  # fmt: skip
            problems.append(f"{lookup.key} must be a string (an entity id), not {kind}")
        elif not names.ENTITY_PATTERN.fullmatch(entity):
            problems.append(f"{lookup.key} must be 1-128 characters of A-Z, a-z, 0-9 and ._:@+=/-")
        unknown = [k for k in values if k not in known]
        if unknown:
            problems.append(f"not looked-up features: {unknown[:5]}")
        if not values:
            problems.append("no feature")
        numbers = []
        for k, v in values.items():
            if k in known and not float32_number(v):
                problems.append(f"{k!r} is not a finite float32 number")
            elif k in known:
                numbers.append((k, v))
        if numbers and rule is not None and rule.integer is not None:  # one check a row
            given = np.array([[v for _, v in numbers]], dtype=np.float64)
            problems += [f"{numbers[c][0]!r}: {why}" for _, c, _, why in faults(given, rule)]
        if problems:
            errors.append({"row": i, lookup.key: str(entity)[:130], "msg": "; ".join(problems)})
        else:
            writes.append((str(entity), {k: float(v) for k, v in values.items()}))
    return writes, errors
