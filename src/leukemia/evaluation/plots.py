"""Figures of the evaluation report, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from leukemia import CLASS_NAMES  # noqa: E402


def plot_confusion_matrix(confusion: dict, path: Path, title: str = "Test confusion matrix") -> None:
    matrix = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    figure, axes = plt.subplots(figsize=(4.5, 4))
    image = axes.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=14)
    axes.set_xticks([0, 1], [f"pred {name}" for name in CLASS_NAMES])
    axes.set_yticks([0, 1], [f"true {name}" for name in CLASS_NAMES])
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    _save(figure, path)


def plot_roc(targets: np.ndarray, probs: np.ndarray, roc_auc: float | None, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(4.5, 4))
    if roc_auc is not None:
        false_positive_rate, true_positive_rate, _ = roc_curve(targets, probs)
        axes.plot(false_positive_rate, true_positive_rate, label=f"ROC AUC = {roc_auc:.3f}")
    else:
        axes.text(0.5, 0.5, "undefined: one class only", ha="center")
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray")
    axes.set_xlabel("False positive rate (1 - specificity)")
    axes.set_ylabel("True positive rate (sensitivity)")
    axes.set_title("Test ROC, ALL positive")
    axes.legend(loc="lower right")
    _save(figure, path)


def plot_history(history_csvs: Sequence[Path], out_dir: Path) -> None:
    """Draw ``accuracy.png`` and ``loss.png`` from Lightning's CSV logs, one point per epoch.

    Several logs are training stages in order (frozen, then fine-tuning); their epochs are
    numbered on, and a dashed line marks where each later stage starts.
    """
    histories = [read_history(path) for path in history_csvs]
    for metric, file_name in (("accuracy", "accuracy.png"), ("loss", "loss.png")):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            offset = 0
            for index, history in enumerate(histories):
                epochs = sorted(e for e, row in history.items() if f"{split}_{metric}" in row)
                axes.plot([offset + e + 1 for e in epochs], [history[e][f"{split}_{metric}"] for e in epochs],
                          marker="o", color=colour, label=split if index == 0 else None)
                offset += max(history, default=-1) + 1
        offset = 0
        for index, history in enumerate(histories[:-1]):
            offset += max(history, default=-1) + 1
            axes.axvline(offset + 0.5, color="grey", linestyle="--", linewidth=1,
                         label="fine-tuning starts" if index == 0 else None)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.set_title(f"Training history: {metric}")
        axes.legend()
        _save(figure, out_dir / file_name)


def read_history(history_csv: Path) -> dict[int, dict[str, float]]:
    """Merge the rows Lightning's CSVLogger writes per epoch into {epoch: {metric: value}}."""
    history: dict[int, dict[str, float]] = {}
    with open(history_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = int(row["epoch"])
            for name, value in row.items():
                if name not in ("epoch", "step") and value not in ("", None):
                    history.setdefault(epoch, {})[name] = float(value)
    return history


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
