"""The gateways' drift sketches read back (``drift_feed`` writes them): decoded, merged into a
window of one real model's requests, and that model's score reference, which a window's score
distribution is compared with. The reference is the training distribution its metadata carries;
without one, the first full window of its scores after it became real, stored once built so
that every evaluator (and a restart) compares with the same one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
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


class ScoreReferences:
    """Each real model's score reference, and where it came from (``training`` or
    ``promotion``; None while no full window of its scores exists yet)."""

    def __init__(self, client: AsyncClient, window_requests: int, local_meta: ModelMeta | None):
        self.client = client
        self.window_requests = window_requests
        self.local_meta = local_meta
        """Model metadata from this host's registry files: for a model not (yet) in the
        Redis index (the index is filled by the admin plane)."""
        self._training: dict[str, np.ndarray | None] = {}

    async def _training_reference(
        self, name: str, version: int, meta_raw: bytes | None
    ) -> np.ndarray | None:
        """The score distribution stored with the model (metadata never changes for a
        version, so it is looked up once)."""
        key = f"{name}:{version}"
        if key not in self._training:
            meta: Mapping[str, Any] | None = json.loads(meta_raw) if meta_raw else None
            if meta is None and self.local_meta is not None:
                meta = await asyncio.to_thread(self.local_meta, name, version)
            if meta is None:
                return None  # not found anywhere yet: ask again next time
            ref = meta.get("score_reference")
            self._training[key] = np.asarray(ref, dtype=np.float64) if ref else None
        return self._training[key]

    async def of(
        self,
        deployment: str,
        name: str,
        version: int,
        meta_raw: bytes | None,
        reference_raw: bytes | None,
    ) -> tuple[np.ndarray | None, str | None]:
        """``meta_raw``: the model's metadata from the Redis index; ``reference_raw``: the
        deployment's stored reference (both read in the evaluation's first round trip)."""
        real = f"{name}:{version}"
        training = await self._training_reference(name, version, meta_raw)
        if training is not None:
            return training, "training"
        if reference_raw is not None:
            stored = json.loads(reference_raw)
            if stored.get("model") == real:
                return np.asarray(stored["fractions"], dtype=np.float64), "promotion"
        # The first full window of this model's scores the stream still holds.
        entries = await self.client.xrange(names.drift_sketch_stream(deployment), count=SCAN_LIMIT)
        first = merge_window(
            decode_sketches(cast(Entries, entries)), real, None, self.window_requests
        )
        if first.requests < self.window_requests:
            return None, None
        total = first.score_real.sum()
        fractions = (first.score_real / total).tolist() if total else None
        if fractions is None:
            return None, None
        await self.client.set(
            names.drift_reference_key(deployment),
            json.dumps(
                {
                    "model": real,
                    "fractions": fractions,
                    "requests": first.requests,
                    "from_ms": first.start_ms,
                    "to_ms": first.end_ms,
                }
            ),
        )
        log.info(
            "drift: %s's score reference is its first %d requests as real", real, first.requests
        )
        return np.asarray(fractions), "promotion"


def local_model_meta(models_dir: Path) -> ModelMeta:
    def load(name: str, version: int) -> Mapping[str, Any] | None:
        try:
            return ModelRegistry(models_dir).meta(name, version).to_dict()
        except (OSError, LookupError, ValueError):
            return None

    return load
