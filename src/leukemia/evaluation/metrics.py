"""Classification metrics for ALL (positive, 1) versus HEM (negative, 0)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from leukemia import CLASS_NAMES


def compute_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Return every report metric for binary targets and probabilities of ALL.

    ``roc_auc`` is None when the targets hold one class, where it is undefined. Weighted F1 is
    the C-NMC 2019 challenge metric.
    """
    targets = np.asarray(targets).astype(int)
    probs = np.asarray(probs, dtype=float)
    preds = (probs >= threshold).astype(int)

    tn, fp, fn, tp = confusion_matrix(targets, preds, labels=[0, 1]).ravel()
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=[0, 1], zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[label]),
            "recall": float(recall[label]),
            "f1": float(f1[label]),
            "support": int(support[label]),
        }
        for label, name in enumerate(CLASS_NAMES)
    }
    return {
        "threshold": float(threshold),
        "n_images": int(len(targets)),
        "accuracy": float(accuracy_score(targets, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(targets, preds)) if len(set(targets)) > 1 else None,
        "f1_weighted": float(f1_score(targets, preds, average="weighted", zero_division=0)),
        "roc_auc": float(roc_auc_score(targets, probs)) if len(set(targets)) > 1 else None,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "per_class": per_class,
    }


def describe_confusion(confusion: dict) -> str:
    """Describe confusion-matrix counts in words, naming the positive class."""
    return (
        "Positive class: ALL (leukemic blast, label 1). Negative class: HEM (normal cell, label 0).\n"
        f"True positives  (ALL called ALL): {confusion['tp']}\n"
        f"False negatives (ALL called HEM): {confusion['fn']}\n"
        f"True negatives  (HEM called HEM): {confusion['tn']}\n"
        f"False positives (HEM called ALL): {confusion['fp']}\n"
    )
