"""Steps shared by the train and evaluate jobs: preprocessing samples, recording the environment."""

from __future__ import annotations

import csv
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning
import timm
import torch
import torchvision

from leukemia import __version__
from leukemia.data.discovery import Sample
from leukemia.preprocessing.cache import PreprocessCache, preprocess_files

logger = logging.getLogger(__name__)


@dataclass
class PreparedCells:
    """Samples whose images were preprocessed, their cache keys, and the files skipped."""

    samples: list[Sample]
    keys: list[str]
    skipped: list[tuple[Path, str]]


def prepare_cells(
    samples: list[Sample], cache: PreprocessCache, *, workers: int | None, progress: bool = True
) -> PreparedCells:
    """Preprocess the samples into the cache; drop, and record, the ones that fail."""
    outcomes = preprocess_files([sample.path for sample in samples], cache, workers=workers, progress=progress)
    kept, keys, skipped = [], [], []
    for sample, outcome in zip(samples, outcomes):
        if outcome.key is None:
            skipped.append((sample.path, outcome.error or "unknown error"))
        else:
            kept.append(sample)
            keys.append(outcome.key)
    return PreparedCells(kept, keys, skipped)


def write_skipped(path: Path, skipped: list[tuple[Path, str]]) -> None:
    """Write the skipped files and their reasons to a CSV (header only when none was skipped)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows([str(file), reason] for file, reason in skipped)


def environment_record() -> dict:
    """Return the versions that a run's results depend on."""
    return {
        "leukemia": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
    }
