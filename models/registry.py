"""The model registry: versioned ONNX artifacts with their metadata.

Artifacts live in the data folder, ``<data>/models/<name>/<version>/model.onnx`` beside
``meta.json``, each written to a temporary name and renamed into place so a reader never sees
half a model. With a Redis client the registry also keeps its index in Redis (``rdv:models``),
so every gateway and worker process sees the same list; the index entry is written after the
files, so whoever finds it there finds the artifact too. A new version is claimed by creating
its folder (``mkdir`` is atomic), so two uploads never get the same number.

Nothing here unpickles anything: a model is ONNX bytes plus JSON.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from models.meta import ModelMeta
from rendezvous.bus.connection import Client, text
from rendezvous.names import MODELS_INDEX, MODELS_RETIRED, check_name

log = logging.getLogger(__name__)

READOPT_S = 10.0
"""How often an empty index is compared with the data folder (``list``)."""

RETIRED = "deleted.json"
"""In a deleted version's folder: the number stays taken."""


class ModelNotFound(LookupError):
    pass


class ModelUnreadable(ModelNotFound):
    """A version whose ``meta.json`` is damaged: as good as absent, and said so with its
    path."""


class ArtifactChanged(ValueError):
    """The artifact on disk is not the one uploaded: its sha256 differs from its metadata's."""


class ModelExists(ValueError):
    """That name and version is already in the registry."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        if isinstance(exc, OSError) and exc.filename is None:  # a write's names no file:
            exc.filename = str(path)  # the 507's log line says where (the README's promise)
        raise


def _field(name: str, version: int) -> str:
    return f"{name}:{int(version)}"


class ModelRegistry:
    def __init__(self, root: Path, index: Client | None = None):
        self.root = Path(root)
        self.index = index
        """Redis client holding the shared index; None: the data folder alone (workers,
        training, tests of the files)."""
        self._readopt_at = 0.0

    def _dir(self, name: str, version: int) -> Path:
        if int(version) < 1:
            raise ValueError("model versions start at 1")
        return self.root / check_name(name, "model name") / str(int(version))

    # -- writing ------------------------------------------------------------------------------

    def save(self, meta: ModelMeta, onnx_bytes: bytes) -> ModelMeta:
        """Store an artifact under its own version; its sha256 is computed here, never taken
        on trust. Overwrites files of that version (training); ``add`` never does."""
        stored = self._stamped(meta, onnx_bytes)
        d = self._dir(meta.name, meta.version)
        d.mkdir(parents=True, exist_ok=True)
        self._write(d, stored, onnx_bytes)
        if self.index is not None:
            self.index.hset(
                MODELS_INDEX, _field(stored.name, stored.version), json.dumps(stored.to_dict())
            )
        return stored

    def add(self, meta: ModelMeta, onnx_bytes: bytes, version: int | None = None) -> ModelMeta:
        """Store a new version: ``version`` if given (ModelExists if taken), else the next
        free number. Nothing is overwritten."""
        name = check_name(meta.name, "model name")
        stamped = self._stamped(meta, onnx_bytes)
        candidate = version if version is not None else self._latest(name) + 1
        while True:
            d = self._dir(name, candidate)
            d.parent.mkdir(parents=True, exist_ok=True)
            retired = self._retired(name, candidate)
            try:
                if retired:
                    raise FileExistsError
                d.mkdir()  # the claim: atomic, so concurrent uploads never share a number
            except FileExistsError:
                if version is not None:
                    raise self._taken(name, version) from None
                candidate += 1
                continue
            stored = ModelMeta.from_dict({**stamped.to_dict(), "version": candidate})
            try:
                self._write(d, stored, onnx_bytes)
                indexed = self._index_new(stored)
            except BaseException:
                shutil.rmtree(d, ignore_errors=True)
                with contextlib.suppress(OSError):  # a new name's folder, empty: a refusal
                    d.parent.rmdir()  # leaves nothing (only ever removed when empty)
                raise
            if indexed:
                return stored
            shutil.rmtree(d, ignore_errors=True)  # a stale index entry holds that number
            if version is not None:
                raise self._taken(name, version)
            candidate += 1

    def _retired(self, name: str, version: int) -> bool:
        """The number belonged to a version since deleted (here or on another host)."""
        if (self._dir(name, version) / RETIRED).exists():
            return True
        return self.index is not None and bool(
            self.index.sismember(MODELS_RETIRED, _field(name, version))
        )

    def retired(self, name: str, version: int) -> bool:
        """Deleted, or marked to be (``retire``): no role may take it any more."""
        return self._retired(name, version)

    def retire(self, name: str, version: int) -> bool:
        """Mark a version retired ahead of its deletion, so that a change giving it a role
        refuses it from now on; True if this call marked it (``unretire`` undoes that mark
        when the deletion is refused)."""
        return self.index is not None and bool(
            self.index.sadd(MODELS_RETIRED, _field(name, version))
        )

    def unretire(self, name: str, version: int) -> None:
        if self.index is not None:
            self.index.srem(MODELS_RETIRED, _field(name, version))

    def _taken(self, name: str, version: int) -> ModelExists:
        if self._retired(name, version):
            return ModelExists(
                f"model {name} version {version} was deleted, and a number is never given to "
                "another artifact (its replays, labels and history are about the deleted one): "
                "upload it without a version to get the next one"
            )
        return ModelExists(f"model {name} version {version} already exists")

    def _index_new(self, meta: ModelMeta) -> bool:
        """Index a freshly written version; False when the index already holds another
        artifact under that number (a concurrent ``adopt`` of this very one is fine)."""
        if self.index is None:
            return True
        key = _field(meta.name, meta.version)
        if self.index.hsetnx(MODELS_INDEX, key, json.dumps(meta.to_dict())):
            return True
        raw = self.index.hget(MODELS_INDEX, key)
        return raw is not None and json.loads(raw).get("sha256") == meta.sha256

    def delete(self, name: str, version: int) -> None:
        """Drop a version from the index, then its files; the caller checks no role holds it.
        Its number stays taken (a marker in its folder, and ``rdv:models:retired``): evidence
        about a version (replays, labelled answers, the history) is kept by name and number,
        and must never be taken for another artifact's. The marker is written first, so a disk
        that refuses it (full, read-only) leaves the version listed as it was."""
        d = self._dir(name, version)
        field = _field(name, version)
        found = (d / "meta.json").exists() or (d / "model.onnx").exists()
        if self.index is not None:
            found = found or bool(self.index.hexists(MODELS_INDEX, field))
        if not found:
            raise ModelNotFound(f"model {name} version {version} is not in the registry")
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / RETIRED, json.dumps({"deleted_at": time.time()}).encode())
        if self.index is not None:
            self.index.sadd(MODELS_RETIRED, field)  # before the index lets go of it
            self.index.hdel(MODELS_INDEX, field)
        for path in d.iterdir():
            if path.name != RETIRED:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def adopt(self) -> list[ModelMeta]:
        """Index artifacts found in the data folder but not in Redis (trained before Redis ran,
        or Redis lost its data), and re-index those retrained in place (``train-demo
        --force``); an artifact whose sha256 does not match its metadata is skipped."""
        if self.index is None:
            return []
        known = {
            text(k): json.loads(v).get("sha256")
            for k, v in self.index.hgetall(MODELS_INDEX).items()
        }
        adopted = []
        for meta in self._disk_metas():
            key = _field(meta.name, meta.version)
            if known.get(key) == meta.sha256:
                continue
            if not self.verify(meta.name, meta.version):
                log.warning(
                    "not indexing %s v%d: its sha256 does not match", meta.name, meta.version
                )
                continue
            self.index.hset(MODELS_INDEX, key, json.dumps(meta.to_dict()))
            adopted.append(meta)
        return adopted

    # -- reading ------------------------------------------------------------------------------

    def exists(self, name: str, version: int) -> bool:
        d = self._dir(name, version)
        return (d / "meta.json").exists() and (d / "model.onnx").exists()

    def meta(self, name: str, version: int) -> ModelMeta:
        path = self._dir(name, version) / "meta.json"
        try:
            return ModelMeta.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ModelNotFound(
                f"model {name} version {version} is not in the registry at {self.root}"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # not JSON, not UTF-8, or not a model's metadata: a traceback named neither the
            # file nor the way out (found by a helper's probe)
            raise ModelUnreadable(
                f"model {name} version {version}: {path} is damaged ({type(exc).__name__}: "
                f"{str(exc)[:200]}): delete its folder, or upload the version again"
            ) from None

    def artifact_path(self, name: str, version: int) -> Path:
        path = self._dir(name, version) / "model.onnx"
        if not path.exists():
            raise ModelNotFound(f"model {name} version {version} has no artifact at {path}")
        return path

    def verify(self, name: str, version: int) -> bool:
        """True when the artifact on disk still has the sha256 recorded at save time."""
        return (
            sha256_hex(self.artifact_path(name, version).read_bytes())
            == self.meta(name, version).sha256
        )

    def artifact(self, name: str, version: int, meta: ModelMeta | None = None) -> bytes:
        """The artifact to serve, checked against the sha256 recorded at its upload: a file
        replaced, cut short or damaged on disk since then is refused, where it was served
        under the version's name (another model's answers, logged and judged as this one's)."""
        path = self.artifact_path(name, version)
        data = path.read_bytes()
        expected = (meta or self.meta(name, version)).sha256
        if expected and (found := sha256_hex(data)) != expected:
            raise ArtifactChanged(
                f"model {name} version {version}: the artifact on disk ({path}) is not the one "
                f"uploaded (sha256 {found[:12]}..., its metadata says {expected[:12]}...): put "
                "the original back, or upload the model again as a new version"
            )
        return data

    def list(self, name: str | None = None) -> list[ModelMeta]:
        """Every version (of ``name``), by name then version; from the index when there is
        one, else from the data folder."""
        if self.index is None:
            metas: Iterable[ModelMeta] = self._disk_metas()
        else:
            raws = self.index.hvals(MODELS_INDEX)
            if not raws and self._index_lost() and self.adopt():
                # An index gone whole (Redis restarted without its data, or flushed): made
                # again from the data folder at once. Until a gateway restarted, the admin
                # API listed no model and refused every version as not in the registry.
                log.warning("the model index in Redis was empty: made again from %s", self.root)
                raws = self.index.hvals(MODELS_INDEX)
            metas = [ModelMeta.from_dict(json.loads(raw)) for raw in raws]
        chosen = [m for m in metas if name is None or m.name == name]
        return sorted(chosen, key=lambda m: (m.name, m.version))

    # -- internals ----------------------------------------------------------------------------

    def _index_lost(self) -> bool:
        """Whether an empty index may have lost what the data folder holds: nothing was ever
        deleted (a deletion's mark is in Redis too), asked at most every ``READOPT_S``."""
        now = time.monotonic()
        if self.index is None or now < self._readopt_at:
            return False
        self._readopt_at = now + READOPT_S
        return not self.index.exists(MODELS_RETIRED)

    @staticmethod
    def _stamped(meta: ModelMeta, onnx_bytes: bytes) -> ModelMeta:
        digest = sha256_hex(onnx_bytes)
        if meta.sha256 and meta.sha256 != digest:
            raise ValueError("metadata sha256 does not match the artifact")
        return ModelMeta.from_dict(
            {**meta.to_dict(), "sha256": digest, "size_bytes": len(onnx_bytes)}
        )

    @staticmethod
    def _write(d: Path, meta: ModelMeta, onnx_bytes: bytes) -> None:
        _write_atomic(d / "model.onnx", onnx_bytes)
        _write_atomic(d / "meta.json", json.dumps(meta.to_dict(), indent=2).encode())

    def _latest(self, name: str) -> int:
        versions = [m.version for m in self.list(name)]
        name_dir = self.root / name
        if name_dir.exists():
            versions += [int(p.name) for p in name_dir.iterdir() if p.name.isdigit()]
        return max(versions, default=0)

    def _disk_metas(self) -> builtins.list[ModelMeta]:
        out: list[ModelMeta] = []
        if not self.root.exists():
            return out
        for name_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            versions = [p for p in name_dir.iterdir() if p.is_dir() and p.name.isdigit()]
            for vdir in sorted(versions, key=lambda p: int(p.name)):
                if (vdir / "meta.json").exists() and (vdir / "model.onnx").exists():
                    try:
                        out.append(self.meta(name_dir.name, int(vdir.name)))
                    except ModelUnreadable as exc:  # the others are still listed, adopted
                        log.warning("registry: skipping %s", exc)
        return out


# -- checking an uploaded artifact ------------------------------------------------------------
