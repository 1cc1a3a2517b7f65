"""Subject-bootstrap intervals and the metrics they resample."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from leukemia.evaluation.bootstrap import (
    binary_metrics,
    bootstrap_intervals,
    paired_difference_intervals,
    subject_resamples,
)


def _cells(n_subjects: int = 20, cells_per_subject: int = 15, seed: int = 0):
    """Cells of subjects 0..n-1; the first 60 % of the subjects are ALL; probabilities rounded so ties occur."""
    generator = np.random.default_rng(seed)
    subjects = [f"s{i}" for i in range(n_subjects) for _ in range(cells_per_subject)]
    targets = np.array([int(i < 0.6 * n_subjects) for i in range(n_subjects) for _ in range(cells_per_subject)])
    probs = np.round(np.clip(0.3 * targets + 0.7 * generator.random(len(targets)), 0, 1), 1)
    return subjects, targets, probs, (probs > 0.5).astype(int)


def test_metrics_equal_scikit_learn():
    _, targets, probs, preds = _cells()
    metrics = binary_metrics(targets, probs, preds)

    assert metrics["accuracy"] == pytest.approx(accuracy_score(targets, preds))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, preds))
    assert metrics["f1_weighted"] == pytest.approx(f1_score(targets, preds, average="weighted"))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(targets, probs))
    assert metrics["sensitivity"] == pytest.approx(recall_score(targets, preds))
    assert metrics["specificity"] == pytest.approx(recall_score(targets, preds, pos_label=0))


def test_resamples_keep_subjects_whole_and_class_counts():
    subjects, targets, _, _ = _cells()
    for index in subject_resamples(subjects, targets, n_resamples=50, seed=1):
        drawn = [subjects[i] for i in index]
        counts = {s: drawn.count(s) for s in set(drawn)}

        assert all(count % 15 == 0 for count in counts.values()), "a subject is drawn with all its cells"
        assert sum(targets[index]) == 12 * 15
        assert len(index) == 20 * 15


def test_intervals_contain_the_value_and_are_reproducible():
    cells = _cells()
    first = bootstrap_intervals(*cells, n_resamples=300, seed=4)
    second = bootstrap_intervals(*cells, n_resamples=300, seed=4)

    assert first == second
    for interval in first.values():
        assert interval.low <= interval.value <= interval.high
        assert interval.high - interval.low > 0


def _clustered_cells(n_subjects: int, cells_per_subject: int):
    """Cells whose probabilities share a per-subject offset, as stain and session make them do."""
    generator = np.random.default_rng(2)
    offsets = generator.normal(0, 0.3, n_subjects)
    subjects = [f"s{i}" for i in range(n_subjects) for _ in range(cells_per_subject)]
    targets = np.array([i % 2 for i in range(n_subjects) for _ in range(cells_per_subject)])
    probs = np.clip(0.35 + 0.3 * targets + np.repeat(offsets, cells_per_subject)
                    + generator.normal(0, 0.05, len(targets)), 0, 1)
    return subjects, targets, probs, (probs > 0.5).astype(int)


def test_intervals_widen_when_cells_cluster_by_subject():
    # The same number of cells: few subjects leave few independent draws, so the interval is wider.
    few = bootstrap_intervals(*_clustered_cells(10, 30), n_resamples=400)["balanced_accuracy"]
    many = bootstrap_intervals(*_clustered_cells(100, 3), n_resamples=400)["balanced_accuracy"]

    assert few.high - few.low > 1.5 * (many.high - many.low)


def test_one_class_leaves_out_two_class_metrics():
    subjects, targets, probs, preds = _cells()
    hem = targets == 0
    intervals = bootstrap_intervals([s for s, keep in zip(subjects, hem) if keep], targets[hem], probs[hem],
                                    preds[hem], n_resamples=100)

    assert set(intervals) == {"accuracy", "f1_weighted", "specificity"}


def test_paired_difference_self_zero():
    subjects, targets, probs, preds = _cells()
    difference = paired_difference_intervals(subjects, targets, (probs, preds), (probs, preds), n_resamples=100)

    assert all((i.value, i.low, i.high) == (0.0, 0.0, 0.0) for i in difference.values())


def test_paired_difference_sees_a_better_model():
    subjects, targets, probs, preds = _cells()
    better = np.clip(probs + 0.2 * (2 * targets - 1), 0, 1)
    difference = paired_difference_intervals(subjects, targets, (probs, preds), (better, (better > 0.5).astype(int)),
                                             n_resamples=300)

    assert difference["roc_auc"].low > 0
    assert difference["balanced_accuracy"].low > 0


def test_subject_with_both_labels_rejected():
    with pytest.raises(ValueError, match="subject s0 has cells of both classes"):
        subject_resamples(["s0", "s0"], np.array([0, 1]), n_resamples=1, seed=0)


def test_cell_order_does_not_change_intervals():
    subjects, targets, probs, preds = _cells()
    order = np.random.default_rng(5).permutation(len(targets))

    shuffled = bootstrap_intervals([subjects[i] for i in order], targets[order], probs[order], preds[order],
                                   n_resamples=200)

    assert shuffled == bootstrap_intervals(subjects, targets, probs, preds, n_resamples=200)
