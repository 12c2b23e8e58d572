"""The gateways' drift sketches read back (``drift_feed`` writes them): decoded, merged into a
window of one real model's requests, and that model's score reference, which a window's score
distribution is compared with (and a multiclass model's class reference, its predicted-class
mix). The reference is the training distribution its metadata carries; without one, the first
full window of its answers after it became real, stored once built so that every evaluator
(and a restart) compares with the same one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from gateway.observability.drift_feed import SKETCH_FIELD
from models.registry import ModelRegistry
from rendezvous import names
from rendezvous.bus.connection import AsyncClient
from rendezvous.drift import Sketch

log = logging.getLogger(__name__)

SCAN_LIMIT = 20_000
"""Most sketch entries one evaluation reads (a window rarely needs more than a few hundred)."""
Entries = list[tuple[bytes, dict[bytes, bytes]]]
"""Stream entries as a client without ``decode_responses`` reads them."""
ModelMeta = Callable[[str, int], Mapping[str, Any] | None]


def decode_sketches(entries: Entries) -> list[Sketch]:
    out = []
    for _id, fields in entries:
        try:
            out.append(Sketch.from_bytes(fields[SKETCH_FIELD]))
        except (KeyError, ValueError) as exc:
            log.warning("skipping an unreadable drift sketch: %s", exc)
    return out


def merge_window(
    sketches: list[Sketch], real_model: str, feature_version: str | None, limit: int
) -> Sketch:
    """Merge ``sketches`` (in the order given) of ``real_model`` until ``limit`` requests.
    Feature counts built against another feature spec are left out."""
    window = Sketch(real_model=real_model)
    for sketch in sketches:
        if sketch.real_model != real_model:
            continue
        if sketch.features is not None and sketch.feature_version != feature_version:
            sketch.features, sketch.feature_rows, sketch.feature_version = None, 0, None
        try:
            window = sketch if window.empty() else window.merge(sketch)
        except ValueError:  # e.g. another canary since: not the same comparison
            continue
        if window.requests >= limit:
            break
    return window


@dataclass(frozen=True)
class References:
    """What a real model's window is compared with: its score histogram and, for a multiclass
    model, its predicted-class mix (``class_labels`` names the classes), and where they came
    from (``training`` or ``promotion``; None while neither is known)."""

    scores: np.ndarray | None = None
    classes: np.ndarray | None = None
    source: str | None = None
    class_labels: list[str] | None = None


def _array(values: Any) -> np.ndarray | None:
    return np.asarray(values, dtype=np.float64) if values else None


class ScoreReferences:
    """Each real model's score reference (and class reference), and where it came from."""

    def __init__(self, client: AsyncClient, window_requests: int, local_meta: ModelMeta | None):
        self.client = client
        self.window_requests = window_requests
        self.local_meta = local_meta
        """Model metadata from this host's registry files: for a model not (yet) in the
        Redis index (the index is filled by the admin plane)."""
        self._training: dict[str, References] = {}

    async def _training_reference(
        self, name: str, version: int, meta_raw: bytes | None
    ) -> References | None:
        """The distributions stored with the model (metadata never changes for a version, so
        it is looked up once); None while the metadata is not found."""
        key = f"{name}:{version}"
        if key not in self._training:
            meta: Mapping[str, Any] | None = json.loads(meta_raw) if meta_raw else None
            if meta is None and self.local_meta is not None:
                meta = await asyncio.to_thread(self.local_meta, name, version)
            if meta is None:
                return None  # not found anywhere yet: ask again next time
            scores = _array(meta.get("score_reference"))
            labels = meta.get("class_names") or meta.get("classes")
            self._training[key] = References(
                scores=scores,
                classes=_array(meta.get("class_reference")),
                source="training" if scores is not None else None,
                class_labels=[str(c) for c in labels] if labels else None,
            )
        return self._training[key]

    async def of(
        self,
        deployment: str,
        name: str,
        version: int,
        meta_raw: bytes | None,
        reference_raw: bytes | None,
    ) -> References:
        """``meta_raw``: the model's metadata from the Redis index; ``reference_raw``: the
        deployment's stored reference (both read in the evaluation's first round trip)."""
        real = f"{name}:{version}"
        training = await self._training_reference(name, version, meta_raw) or References()
        if training.source is not None:
            return training
        labels = training.class_labels
        if reference_raw is not None:
            stored = json.loads(reference_raw)
            if stored.get("model") == real:
                return References(_array(stored["fractions"]), _array(stored.get("classes")),
                                  "promotion", labels)  # fmt: skip
        # The first full window of this model's scores the stream still holds.
        entries = await self.client.xrange(names.drift_sketch_stream(deployment), count=SCAN_LIMIT)
        first = merge_window(
            decode_sketches(cast(Entries, entries)), real, None, self.window_requests
        )
        if first.requests < self.window_requests:
            return References(class_labels=labels)
        total = first.score_real.sum()
        fractions = (first.score_real / total).tolist() if total else None
        if fractions is None:
            return References(class_labels=labels)
        predicted = first.predicted
        classes = (
            (predicted / predicted.sum()).tolist()
            if predicted is not None and predicted.sum()
            else None
        )
        await self.client.set(
            names.drift_reference_key(deployment),
            json.dumps(
                {
                    "model": real,
                    "fractions": fractions,
                    **({"classes": classes} if classes else {}),
                    "requests": first.requests,
                    "from_ms": first.start_ms,
                    "to_ms": first.end_ms,
                }
            ),
        )
        log.info(
            "drift: %s's score reference is its first %d requests as real", real, first.requests
        )
        return References(_array(fractions), _array(classes), "promotion", labels)


def local_model_meta(models_dir: Path) -> ModelMeta:
    def load(name: str, version: int) -> Mapping[str, Any] | None:
        try:
            return ModelRegistry(models_dir).meta(name, version).to_dict()
        except (OSError, LookupError, ValueError):
            return None

    return load
