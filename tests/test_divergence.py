"""Divergence measures, checked against SciPy and against hand-computed values."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from rendezvous.divergence import divergence, js_distance


def test_identical_outputs_have_zero_divergence() -> None:
    p = np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32)
    d = divergence([1, 0], p, [1, 0], p)
    assert d.disagreements == 0 and d.disagreement_rate == 0
    assert d.abs_diff_mean == pytest.approx(0) and d.js_max == pytest.approx(0, abs=1e-6)


def test_opposite_certain_outputs_are_maximally_apart() -> None:
    d = divergence([0], np.array([[1.0, 0.0]]), [1], np.array([[0.0, 1.0]]))
    assert d.disagreements == 1 and d.disagreement_rate == 1.0
    assert d.abs_diff_mean == pytest.approx(1.0)
    assert d.js_mean == pytest.approx(1.0)


def test_js_distance_matches_scipy() -> None:
    rng = np.random.default_rng(7)
    p = rng.dirichlet([1, 1, 1], size=50)
    q = rng.dirichlet([1, 1, 1], size=50)
    expected = [jensenshannon(a, b, base=2) for a, b in zip(p, q, strict=True)]
    np.testing.assert_allclose(js_distance(p, q), expected, atol=1e-9)


def test_summary_over_rows() -> None:
    pa = np.array([[0.1, 0.9], [0.6, 0.4], [0.5, 0.5]])
    pb = np.array([[0.3, 0.7], [0.4, 0.6], [0.5, 0.5]])
    d = divergence([1, 0, 1], pa, [1, 1, 1], pb)
    assert d.rows == 3 and d.disagreements == 1
    assert d.disagreement_rate == pytest.approx(1 / 3)
    assert d.abs_diff_mean == pytest.approx((0.2 + 0.2 + 0.0) / 3)
    assert d.abs_diff_max == pytest.approx(0.2)


def test_multiclass_has_no_positive_class_difference() -> None:
    p = np.array([[0.2, 0.3, 0.5]])
    d = divergence([2], p, [1], np.array([[0.2, 0.5, 0.3]]))
    assert d.abs_diff_mean is None and d.js_mean > 0


def test_misaligned_outputs_are_refused() -> None:
    with pytest.raises(ValueError):
        divergence([1], np.array([[0.5, 0.5]]), [1, 0], np.array([[0.5, 0.5], [0.5, 0.5]]))


def test_the_plain_python_path_agrees_with_numpy() -> None:
    """Small inputs take a plain-Python path (it is 40x cheaper per request); it must give
    the numpy path's figures."""
    from rendezvous import divergence as mod

    rng = np.random.default_rng(3)
    for rows in (1, 2, 7, mod.SMALL):
        for classes in (2, 3):
            pa = rng.dirichlet(np.ones(classes), rows).astype(np.float32)
            pb = rng.dirichlet(np.ones(classes), rows).astype(np.float32)
            pb[0] = pa[0]  # an identical row too
            la, lb = list(pa.argmax(1)), list(pb.argmax(1))
            small = mod.divergence(la, pa, lb, pb)
            big = mod.divergence(la * 20, np.repeat(pa, 20, 0), lb * 20, np.repeat(pb, 20, 0))
            assert small.disagreements * 20 == big.disagreements
            assert small.js_mean == pytest.approx(big.js_mean, abs=1e-6)
            assert small.js_max == pytest.approx(big.js_max, abs=1e-6)
            if classes == 2:
                assert small.abs_diff_mean == pytest.approx(big.abs_diff_mean, abs=1e-6)
            else:
                assert small.abs_diff_mean is None and big.abs_diff_mean is None


def test_a_nan_probability_gives_nan_on_both_paths() -> None:
    """A model that answers NaN must not read as a figure (0 or 1) on the one-row path."""
    from rendezvous import divergence as mod

    pa = np.array([[np.nan, 0.5]], dtype=np.float32)
    pb = np.array([[0.5, 0.5]], dtype=np.float32)
    small = mod.divergence([1], pa, [1], pb)
    big = mod.divergence([1] * 20, np.repeat(pa, 20, 0), [1] * 20, np.repeat(pb, 20, 0))
    assert np.isnan(small.js_mean) and np.isnan(big.js_mean)
