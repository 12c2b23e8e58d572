"""The drift benchmark's own parts, without a server: every fault changes the rows as its name
says, and the offline false-alarm replay counts and bounds what it sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.drift_bench import offline_far, table
from benchmarks.drift_faults import TARGETS, Data, faults


@pytest.fixture(scope="module")
def data() -> Data:
    return Data.load()


def test_every_fault_changes_the_rows_and_has_a_target(data: Data) -> None:
    chosen = faults(data)
    assert len(chosen) == 15 and {f.group for f in chosen} == set(TARGETS)
    names = data.names
    for fault in chosen:
        rows = fault.rows(np.random.default_rng(0), 400)
        assert rows.shape == (400, len(names)), fault.name
        if fault.group == "prior":
            continue
        normal = data.normal(np.random.default_rng(0), 400)
        changed = {names[i] for i in np.flatnonzero((rows != normal).any(axis=0))}
        assert changed and all(n in fault.name for n in changed), (fault.name, changed)
    [malignant] = [f for f in chosen if "90 % malignant" in f.name]
    rows = malignant.rows(np.random.default_rng(1), 2000)
    labels = {tuple(r): y for r, y in zip(data.x.tolist(), data.y.tolist(), strict=True)}
    assert np.mean([labels[tuple(r)] for r in rows.tolist()]) == pytest.approx(0.1, abs=0.03)


def test_offline_replay_counts_alarms_per_100k(data: Data, demo_data_dir: Path) -> None:
    far = offline_far(data, data.held_out, 20_000, seed=3, models_dir=demo_data_dir / "models")
    assert far["rows"] == 20_000 and far["alarms"] == {}
    assert far["per_100k"] == 0 and far["per_100k_upper_95"] == pytest.approx(15.0)
    text = table({"live": {}, "offline": {"held-out": far}})
    assert "0 alarms in 20,000 rows" in text
