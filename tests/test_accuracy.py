"""The live-accuracy figures and the paired test (pure): every figure against scikit-learn's
and scipy's own computation of the same rows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn import metrics

from rendezvous.accuracy import accuracy_report, gate_shortfalls, latest, mcnemar_p, paired
from rendezvous.outcomes import BinAnswer, Label, Labelled, Outcome, label_problems


def _answer(model: str, version: int, p1: list[float]) -> BinAnswer:
    probabilities = [[1 - p, p] for p in p1]
    return BinAnswer(model, version, [int(p >= 0.5) for p in p1], probabilities)


def _entries(seed: int, n: int) -> tuple[list[Labelled], np.ndarray, np.ndarray, np.ndarray]:
    """``n`` labelled requests of one row each: real mostly right, canary less so."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    real_p = np.clip(np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.25, n), 0.01, 0.99)
    canary_p = np.clip(np.where(y == 1, 0.6, 0.4) + rng.normal(0, 0.3, n), 0.01, 0.99)
    weights = rng.choice([1.0, 2.0, 0.5], n)
    out = []
    for i in range(n):
        outcome = Outcome(
            1_000 + i,
            "real",
            {
                "real": _answer("m", 2, [float(real_p[i])]),
                "canary": _answer("m", 1, [float(canary_p[i])]),
            },
        )
        # round trip through the stored form: the figures are of what Redis holds
        outcome = Outcome.decode(outcome.encode())
        label = Label.decode(Label((int(y[i]),), None, float(weights[i]), 5).encode())
        out.append(Labelled(f"r{i}", label, outcome))
    return out, y, weights, np.array([[e.outcome.answers["real"].probabilities[0][1],
                                       e.outcome.answers["canary"].probabilities[0][1]]
                                      for e in out])  # fmt: skip


def test_figures_equal_sklearns() -> None:
    entries, y, w, p1 = _entries(1, 400)
    report = accuracy_report(entries, 1000, [0, 1], {"real": "m:2", "canary": "m:1"})
    by_role = {m["role"]: m for m in report["models"]}
    assert report["requests"] == 400 and report["labelled"] == 400
    for k, role in enumerate(("real", "canary")):
        fig = by_role[role]
        proba = np.column_stack([1 - p1[:, k], p1[:, k]])
        pred = (p1[:, k] >= 0.5).astype(int)
        pred = np.array([e.outcome.answers[role].labels[0] for e in entries])
        assert fig["labelled"] == 400 and fig["current"]
        assert fig["accuracy"] == pytest.approx(metrics.accuracy_score(y, pred, sample_weight=w))
        assert fig["log_loss"] == pytest.approx(
            metrics.log_loss(y, proba, sample_weight=w, labels=[0, 1]), rel=1e-6
        )
        assert fig["brier"] == pytest.approx(
            metrics.brier_score_loss(y, proba[:, 1], sample_weight=w), rel=1e-6
        )
        for c in (0, 1):
            assert fig["precision"][str(c)] == pytest.approx(
                metrics.precision_score(y, pred, pos_label=c, sample_weight=w)
            )
            assert fig["recall"][str(c)] == pytest.approx(
                metrics.recall_score(y, pred, pos_label=c, sample_weight=w)
            )
        assert sum(b["rows"] for b in fig["calibration"]) == 400
        # expected calibration error over ten confidence bins (the top class's probability)
        stored = np.array([e.outcome.answers[role].probabilities[0] for e in entries])
        stored = stored / stored.sum(axis=1, keepdims=True)
        conf, right = stored.max(axis=1), (pred == y)
        which = np.clip(np.ceil(conf * 10).astype(int) - 1, 0, 9)
        ece = sum(
            w[which == b].sum() / w.sum()
            * abs(np.average(right[which == b], weights=w[which == b])
                  - np.average(conf[which == b], weights=w[which == b]))
            for b in range(10) if (which == b).any()
        )  # fmt: skip
        assert fig["ece"] == pytest.approx(ece, rel=1e-9, abs=1e-12)
        assert [b["rows"] for b in fig["calibration"]] == [
            int((which == b).sum()) for b in range(10) if (which == b).any()
        ]
    assert by_role["real"]["accuracy"] > by_role["canary"]["accuracy"]


def test_relabels_replace_and_the_window_keeps_the_latest() -> None:
    entries, _y, _w, _p = _entries(2, 50)
    flipped = [
        Labelled(e.request_id, Label((1 - e.label.labels[0],), None, 1.0, 9), e.outcome)  # type: ignore[index]
        for e in entries[:10]
    ]
    kept = latest([*entries, *flipped], 45)
    assert len(kept) == 45
    assert [e.request_id for e in kept[-10:]] == [e.request_id for e in flipped]
    assert all(e.label.given_ms == 9 for e in kept[-10:])
    # the same figures as a stream holding only the final labels
    final = [*entries[10:], *flipped]
    current = {"real": "m:2", "canary": "m:1"}
    assert accuracy_report([*entries, *flipped], 100, [0, 1], current) == accuracy_report(
        final, 100, [0, 1], current
    )


def test_judgements_count_for_the_answer_given_only() -> None:
    real, canary = _answer("m", 2, [0.9]), _answer("m", 1, [0.2])
    rows = [
        Labelled("a", Label(None, True), Outcome(1, "real", {"real": real, "canary": canary})),
        Labelled("b", Label(None, False), Outcome(2, "canary", {"real": real, "canary": canary})),
    ]
    report = accuracy_report(rows, 10, [0, 1], {"real": "m:2", "canary": "m:1"})
    by_role = {m["role"]: m for m in report["models"]}
    assert by_role["real"]["judged"] == 1 and by_role["real"]["accuracy"] == 1.0
    assert by_role["canary"]["judged"] == 1 and by_role["canary"]["accuracy"] == 0.0
    assert by_role["real"]["log_loss"] is None and by_role["real"]["labelled"] == 0


@pytest.mark.parametrize("a,b", [(0, 0), (3, 0), (10, 4), (4, 10), (30, 12), (200, 170)])
def test_mcnemar_is_scipys_exact_binomial_test(a: int, b: int) -> None:
    expected = binomtest(a, a + b, 0.5).pvalue if a + b else 1.0
    assert mcnemar_p(a, b) == pytest.approx(expected, rel=1e-9)


def test_paired_and_the_gate() -> None:
    entries, y, _w, _p = _entries(3, 300)
    pair = paired(entries, "m:1", "m:2")  # canary as the candidate: worse than real
    real_right = np.array([e.outcome.answers["real"].labels[0] for e in entries]) == y
    canary_right = np.array([e.outcome.answers["canary"].labels[0] for e in entries]) == y
    assert pair["rows"] == 300
    assert pair["candidate_only_right"] == int(np.sum(canary_right & ~real_right))
    assert pair["baseline_only_right"] == int(np.sum(real_right & ~canary_right))
    refused = gate_shortfalls(pair, 100, 0.0, 0.05)
    assert len(refused) == 1 and "below min_accuracy_gain" in refused[0]
    assert "McNemar p=" in refused[0]
    better = paired(entries, "m:2", "m:1")
    assert gate_shortfalls(better, 100, 0.05, 0.05) == []
    assert "fewer than min_labeled=1000" in gate_shortfalls(better, 1000, None, None)[0]


def test_label_problems() -> None:
    assert label_problems(1, (1,), [0, 1]) is None
    assert "not a class" in str(label_problems(1, (7,), [0, 1]))
    assert "2 rows" in str(label_problems(2, (1,), [0, 1]))


def test_a_versions_figures_follow_it_from_challenger_to_real() -> None:
    real, cand = _answer("m", 2, [0.9]), _answer("m", 3, [0.2])
    rows = [Labelled(f"r{i}", Label((0,), None), Outcome(i, "real", {"real": real, "cand": cand}))
            for i in range(4)]  # fmt: skip
    before = accuracy_report(rows, 10, [0, 1], {"real": "m:2", "cand": "m:3"})
    after = accuracy_report(rows, 10, [0, 1], {"real": "m:3", "canary": "m:2"})
    by_model = {m["model"]: m for m in after["models"]}
    assert by_model["m:3"]["role"] == "real" and by_model["m:3"]["roles"] == ["cand"]
    assert by_model["m:3"]["accuracy"] == 1.0 and by_model["m:2"]["role"] == "canary"
    assert before["paired"][0]["gain"] == after["paired"][0]["gain"] * -1 == 1.0


def test_a_request_a_version_scored_in_two_roles_counts_once() -> None:
    """Across a promotion a request may be scored by one version as real and again as the
    new canary: it was counted twice in that version's figures (found by a helper's probe)."""
    same = _answer("m", 2, [0.9, 0.2])
    rows = [Labelled("r0", Label((1, 1), None), Outcome(0, "real", {"real": same, "canary": same}))]
    report = accuracy_report(rows, 10, [0, 1], {"real": "m:3", "canary": "m:2"})
    [fig] = report["models"]
    assert (fig["labelled"], fig["rows"], fig["accuracy"]) == (1, 2, 0.5), fig
    assert fig["roles"] == ["real", "canary"]


def test_a_probability_rounded_to_zero_costs_what_scikit_learn_counts_for_float32() -> None:
    """The outcomes keep the decision record's six decimals, as float32: a true class given
    below 5e-7 reads as 0, and the log loss clipped it at float64's eps (a loss of 36 a row,
    where scikit-learn on the model's float32 outputs counts 15.9; a helper's probe)."""
    sure = _answer("m", 2, [0.0])  # class 0 with probability 1: the true class 1 gets 0
    rows = [Labelled("r0", Label((1,), None), Outcome(0, "real", {"real": sure}))]
    [fig] = accuracy_report(rows, 10, [0, 1], {"real": "m:2"})["models"]
    proba = np.array([[1.0, 0.0]], dtype=np.float32)
    assert fig["log_loss"] == pytest.approx(metrics.log_loss([1], proba, labels=[0, 1]), rel=1e-6)
