"""An export that fails part way (its disk full) leaves the previous export as it was."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import redis

import models.export as export_module
from models.archive import ArchiveReader
from models.export import Exporter

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_export_cut_short_by_a_full_disk_leaves_the_last_one_whole(
    r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A full disk mid-export left a cut CSV (an empty Parquet file) in place of the last
    export, and the last export's .meta.json beside it (a helper's disk probe)."""
    out = tmp_path / f"slice.{fmt}"
    out.write_text("the last export\n")
    meta = Path(f"{out}.meta.json")
    meta.write_text('{"rows": 1}\n')

    def full_disk(path: Path, *args: Any) -> int:
        with Path(path).open("w") as f:
            f.write("request_id,row\nr-1,0\nr-2")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "_csv" if fmt == "csv" else "_parquet", full_disk)
    exporter = Exporter(r, ArchiveReader(tmp_path / "logbin"), "dep", ["a"], [0, 1])
    with pytest.raises(OSError, match="No space left"):
        exporter.export({}, out, fmt, {})
    assert out.read_text() == "the last export\n"
    assert meta.read_text() == '{"rows": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, meta.name])
