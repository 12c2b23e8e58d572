"""The decisions stream's cap: a count, lowered when records are large."""

from __future__ import annotations

import pytest

from gateway.dataplane.decision_cap import ENTRY_OVERHEAD_BYTES, DecisionCap

pytestmark = pytest.mark.pure


def test_small_records_keep_the_count_and_large_ones_fit_the_bytes() -> None:
    cap = DecisionCap(50_000, 64 * 2**20)
    assert cap.maxlen("one-row", 650) == 50_000  # 50,000 x 0.7 KB is under 64 MB
    assert cap.maxlen("batch", 10_000) == 64 * 2**20 // (10_000 + ENTRY_OVERHEAD_BYTES)


def test_the_mean_follows_a_change_of_sizes_and_one_odd_record_barely_moves_it() -> None:
    cap = DecisionCap(50_000, 10 * 2**20)
    for _ in range(500):
        settled = cap.maxlen("d", 1_000)
    odd = cap.maxlen("d", 100_000)
    assert settled == 10 * 2**20 // 1_064 and settled * 0.2 < odd < settled  # moved, not ruled
    for _ in range(1_000):
        later = cap.maxlen("d", 10_000)
    assert later == pytest.approx(10 * 2**20 / 10_064, rel=0.01)
    assert cap.maxlen("other", 1_000) == settled  # each deployment has its own mean


def test_a_floor_of_records_is_kept_however_large_and_no_byte_cap_means_the_count() -> None:
    assert DecisionCap(50_000, 2**20).maxlen("d", 10**7) == 100
    assert DecisionCap(50, 2**20).maxlen("d", 10**7) == 50  # the floor never exceeds the count
    assert DecisionCap(50_000).maxlen("d", 10**7) == 50_000
