"""The evaluation report: metrics, predictions and figures written into a run directory."""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report

from leukemia import CLASS_NAMES
from leukemia.evaluation.metrics import compute_metrics, describe_confusion
from leukemia.evaluation.plots import plot_confusion_matrix, plot_history, plot_roc
from leukemia.preprocessing.cache import write_atomically

logger = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Per-image results of one evaluated split, in matching order."""

    files: list[str]
    subjects: list[str | None]
    targets: np.ndarray  # (N,) int, 1 ALL, 0 HEM
    probs: np.ndarray  # (N,) float, probability of ALL
    threshold: float

    @property
    def preds(self) -> np.ndarray:
        return (self.probs >= self.threshold).astype(int)


def split_metrics(predictions: Predictions) -> dict:
    """Return ``compute_metrics`` plus the number of images and subjects per class."""
    metrics = compute_metrics(predictions.targets, predictions.probs, predictions.threshold)
    for label, name in enumerate(CLASS_NAMES):
        mask = predictions.targets == label
        subjects = {s for s, keep in zip(predictions.subjects, mask) if keep and s is not None}
        metrics["per_class"][name]["n_images"] = int(mask.sum())
        metrics["per_class"][name]["n_subjects"] = len(subjects)
    return metrics


def write_report(
    out_dir: Path,
    test: Predictions,
    *,
    validation: Predictions | None = None,
    header_lines: tuple[str, ...] = (),
    extra: dict | None = None,
    history_csvs: Sequence[Path] = (),
) -> dict:
    """Write metrics.json, classification_report.txt, figures, predictions.csv and per_subject.csv.

    ``header_lines`` come first in metrics.json (as "notes") and in the text report; a
    subject-leakage warning belongs there. ``history_csvs`` are the training stages' CSV logs,
    in order; missing ones are skipped. Returns the metrics dictionary.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"notes": list(header_lines)} if header_lines else {}
    metrics["test"] = split_metrics(test)
    if validation is not None:
        metrics["validation"] = split_metrics(validation)
    metrics.update(extra or {})
    write_atomically(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode("utf-8"))

    _write_text_report(out_dir / "classification_report.txt", test, metrics["test"], header_lines)
    _write_predictions(out_dir / "predictions.csv", test)
    _write_per_subject(out_dir / "per_subject.csv", test)
    plot_confusion_matrix(metrics["test"]["confusion_matrix"], out_dir / "confusion_matrix.png")
    plot_roc(test.targets, test.probs, metrics["test"]["roc_auc"], out_dir / "roc.png")
    stages = [path for path in history_csvs if path.is_file()]
    if stages:
        plot_history(stages, out_dir)
    return metrics


def _write_text_report(path: Path, test: Predictions, metrics: dict, header_lines: tuple[str, ...]) -> None:
    lines = list(header_lines)
    lines += [
        f"Test set: {metrics['n_images']} images, threshold {test.threshold:.3f} on the probability of ALL",
        "",
        classification_report(
            test.targets, test.preds, labels=[0, 1], target_names=list(CLASS_NAMES), digits=4, zero_division=0
        ),
        f"Weighted F1 (C-NMC 2019 challenge metric): {metrics['f1_weighted']:.4f}",
        f"Balanced accuracy: {_format(metrics['balanced_accuracy'])}",
        f"ROC AUC: {_format(metrics['roc_auc'])}",
        f"Sensitivity (ALL recall): {_format(metrics['sensitivity'])}",
        f"Specificity (HEM recall): {_format(metrics['specificity'])}",
        "",
        "Confusion matrix:",
        describe_confusion(metrics["confusion_matrix"]),
    ]
    write_atomically(path, "\n".join(lines).encode("utf-8"))


def _write_predictions(path: Path, predictions: Predictions) -> None:
    rows = [["file", "subject", "label", "probability", "prediction"]]
    for file, subject, target, prob, pred in zip(
        predictions.files, predictions.subjects, predictions.targets, predictions.probs, predictions.preds
    ):
        rows.append([file, subject or "", int(target), f"{prob:.6f}", int(pred)])
    _write_csv(path, rows)


def _write_per_subject(path: Path, predictions: Predictions) -> None:
    """Accuracy per subject; each subject has one class, so no per-subject AUC exists."""
    indices: dict[str, list[int]] = defaultdict(list)
    for index, subject in enumerate(predictions.subjects):
        indices[subject or "unknown"].append(index)

    rows = [["subject", "label", "n_images", "accuracy", "mean_probability", "fraction_called_all"]]
    for subject in sorted(indices):
        index = np.array(indices[subject])
        targets, preds, probs = predictions.targets[index], predictions.preds[index], predictions.probs[index]
        labels = sorted(set(targets.tolist()))
        rows.append([
            subject,
            "/".join(CLASS_NAMES[label] for label in labels),
            len(index),
            f"{float(np.mean(preds == targets)):.4f}",
            f"{float(np.mean(probs)):.4f}",
            f"{float(np.mean(preds)):.4f}",
        ])
    _write_csv(path, rows)


def _write_csv(path: Path, rows: list[list]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    temporary.replace(path)


def _format(value: float | None) -> str:
    return "undefined (one class only)" if value is None else f"{value:.4f}"
