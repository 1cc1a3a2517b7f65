"""Confidence intervals from a bootstrap over subjects.

Cells of one subject are not independent observations: they share the subject's label,
stain and imaging session. Resampling cells would treat a test set of 10,000 cells from 30
subjects as 10,000 independent draws and give intervals far too narrow. Here whole subjects
are resampled, separately within each class (every subject carries one label), so every
resample keeps the number of ALL and HEM subjects and every metric stays defined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

# The metrics the intervals cover, and the classes each needs to be defined.
METRIC_NAMES = ("accuracy", "balanced_accuracy", "f1_weighted", "roc_auc", "sensitivity", "specificity")
REQUIRED_CLASSES = {"balanced_accuracy": {0, 1}, "roc_auc": {0, 1}, "sensitivity": {1}, "specificity": {0}}


def binary_metrics(targets: np.ndarray, probs: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Return the metrics of ``METRIC_NAMES`` that the classes present define, from counts.

    The same values as scikit-learn's scorers (the tests check this), computed from the
    confusion counts and the ranks of the probabilities, because a bootstrap calls this
    thousands of times.
    """
    positives, negatives = targets == 1, targets == 0
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    tp = int(np.sum(preds[positives] == 1))
    tn = int(np.sum(preds[negatives] == 0))
    fp, fn = n_neg - tn, n_pos - tp
    values = {"accuracy": (tp + tn) / len(targets)}
    f1 = {}
    for label, (hits, n_true, n_called) in {1: (tp, n_pos, tp + fp), 0: (tn, n_neg, tn + fn)}.items():
        f1[label] = 2 * hits / (n_true + n_called) if n_true + n_called else 0.0
    values["f1_weighted"] = (n_pos * f1[1] + n_neg * f1[0]) / len(targets)
    if n_pos:
        values["sensitivity"] = tp / n_pos
    if n_neg:
        values["specificity"] = tn / n_neg
    if n_pos and n_neg:
        values["balanced_accuracy"] = (values["sensitivity"] + values["specificity"]) / 2
        ranks = rankdata(probs)
        values["roc_auc"] = (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {name: float(values[name]) for name in METRIC_NAMES if name in values}


@dataclass(frozen=True)
class Interval:
    """A metric's value on all the data and the percentile interval of its bootstrap distribution."""

    value: float
    low: float
    high: float

    def format(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def subject_resamples(subjects: list[str], targets: np.ndarray, *, n_resamples: int, seed: int) -> list[np.ndarray]:
    """Return ``n_resamples`` arrays of cell indices, each from subjects drawn with replacement per class.

    A subject's class is the label of its cells; the draw keeps the number of subjects of
    each class. Passing the same subjects, targets and seed gives the same resamples, which
    is what a paired comparison of two models on the same cells needs. The order of the cells
    does not matter: subjects are drawn in sorted order.

    Raises:
        ValueError: there are no cells, or a subject has cells of both classes.
    """
    cells_by_subject: dict[str, list[int]] = {}
    for index, subject in enumerate(subjects):
        cells_by_subject.setdefault(subject, []).append(index)
    by_class: dict[int, list[np.ndarray]] = {0: [], 1: []}
    # Sorted, so the draws do not depend on the order of the cells.
    for subject, indices in sorted(cells_by_subject.items()):
        labels = set(targets[indices].tolist())
        if len(labels) > 1:
            raise ValueError(f"subject {subject} has cells of both classes; a subject bootstrap needs one label per subject")
        by_class[labels.pop()].append(np.asarray(indices))
    if not cells_by_subject:
        raise ValueError("a subject bootstrap needs at least one cell")
    by_class = {label: groups for label, groups in by_class.items() if groups}

    generator = np.random.default_rng(seed)
    resamples = []
    for _ in range(n_resamples):
        drawn = [groups[i] for groups in by_class.values() for i in generator.integers(0, len(groups), len(groups))]
        resamples.append(np.concatenate(drawn))
    return resamples


def bootstrap_intervals(
    subjects: list[str],
    targets: np.ndarray,
    probs: np.ndarray,
    preds: np.ndarray,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Return each metric of ``METRIC_NAMES`` with its subject-bootstrap confidence interval.

    Metrics that need a class the cells lack (ROC AUC with HEM cells only) are left out.

    Args:
        subjects: the subject of each cell; a cell without a known subject should get a
            unique placeholder (it is then its own subject).
        targets: (N,) int labels, 1 for ALL.
        probs: (N,) float probabilities of ALL.
        preds: (N,) int predicted labels.
    """
    return _intervals(subject_resamples(subjects, targets, n_resamples=n_resamples, seed=seed),
                      lambda index: binary_metrics(targets[index], probs[index], preds[index]),
                      targets, confidence)


def paired_difference_intervals(
    subjects: list[str],
    targets: np.ndarray,
    first: tuple[np.ndarray, np.ndarray],
    second: tuple[np.ndarray, np.ndarray],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Return ``second - first`` for each metric, with an interval from the same subject resamples.

    ``first`` and ``second`` are (probs, preds) of two models on the same cells in the same
    order. Resampling both together keeps the pairing, so the interval of the difference is
    narrower than the two separate intervals suggest when the models err on the same subjects.
    """
    def difference(index: np.ndarray) -> dict[str, float]:
        before = binary_metrics(targets[index], first[0][index], first[1][index])
        after = binary_metrics(targets[index], second[0][index], second[1][index])
        return {name: after[name] - before[name] for name in before}

    return _intervals(subject_resamples(subjects, targets, n_resamples=n_resamples, seed=seed),
                      difference, targets, confidence)


def _intervals(
    resamples: list[np.ndarray],
    statistic: Callable[[np.ndarray], dict[str, float]],
    targets: np.ndarray,
    confidence: float,
) -> dict[str, Interval]:
    """Return each metric's value on all cells with the percentile interval over the resamples."""
    values = statistic(np.arange(len(targets)))
    draws = [statistic(index) for index in resamples]
    tail = (1.0 - confidence) / 2.0 * 100.0
    intervals = {}
    for name, value in values.items():
        low, high = np.percentile([draw[name] for draw in draws], [tail, 100.0 - tail])
        intervals[name] = Interval(value, float(low), float(high))
    return intervals
