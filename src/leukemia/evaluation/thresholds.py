"""Choosing the decision threshold on the probability of ALL from validation predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import f1_score, roc_curve

THRESHOLD_RULES = ("fixed", "f1_weighted", "sensitivity")


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and the sentence describing how it was chosen, for the report and the model file."""

    threshold: float
    rule: str


def choose_threshold(
    targets: np.ndarray,
    probs: np.ndarray,
    *,
    rule: str = "fixed",
    target_sensitivity: float = 0.95,
) -> ThresholdChoice:
    """Choose the threshold on validation predictions.

    Rules:
        fixed: 0.5.
        f1_weighted: the threshold that maximises weighted F1 (the C-NMC 2019 metric); ties go
            to the threshold closest to 0.5.
        sensitivity: the largest threshold whose sensitivity (ALL recall) reaches
            ``target_sensitivity``, so that specificity is as high as that allows.

    Raises:
        ValueError: an unknown rule, or validation with one class only for a data-driven rule.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"invalid threshold rule {rule!r}; use one of {', '.join(THRESHOLD_RULES)}")
    if rule == "fixed":
        return ThresholdChoice(0.5, "fixed at 0.5")

    targets = np.asarray(targets).astype(int)
    probs = np.asarray(probs, dtype=float)
    if len(set(targets.tolist())) < 2:
        raise ValueError(f"threshold rule {rule!r} needs validation images of both classes; use --threshold-rule fixed")

    if rule == "f1_weighted":
        candidates = np.unique(np.concatenate([probs, [0.5]]))
        scores = np.array([f1_score(targets, (probs >= t).astype(int), average="weighted") for t in candidates])
        best = np.flatnonzero(scores == scores.max())
        threshold = float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
        return ThresholdChoice(threshold, f"maximises weighted F1 on validation ({scores.max():.4f})")

    false_positive_rate, true_positive_rate, thresholds = roc_curve(targets, probs, drop_intermediate=False)
    reaching = np.flatnonzero(true_positive_rate >= target_sensitivity)
    index = int(reaching[0])
    threshold = float(min(thresholds[index], 1.0))
    return ThresholdChoice(
        threshold,
        f"sensitivity {true_positive_rate[index]:.4f} >= {target_sensitivity} on validation, "
        f"specificity {1 - false_positive_rate[index]:.4f}",
    )
