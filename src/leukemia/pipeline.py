"""Steps shared by the train and evaluate jobs: preprocessing samples, recording the environment."""

from __future__ import annotations

import csv
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning
import timm
import torch
import torchvision

from leukemia import __version__, distributed
from leukemia.data.discovery import Sample
from leukemia.preprocessing.cache import PreprocessCache, PreprocessOutcome, preprocess_files

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
    """Preprocess the samples into the cache; drop, and record, the ones that fail.

    In a job of several processes, each process preprocesses its share of the files, and
    every process gets the outcomes of all files in the original order, so every process
    has every key and every skipped file. ``workers`` then defaults to the cores divided
    among the processes of a node.

    Raises:
        RuntimeError: a cell another process preprocessed is not in the cache here.
    """
    outcomes = _preprocess_shares([sample.path for sample in samples], cache, workers=workers, progress=progress)
    kept, keys, skipped = [], [], []
    for sample, outcome in zip(samples, outcomes):
        if outcome.key is None:
            skipped.append((sample.path, outcome.error or "unknown error"))
        else:
            kept.append(sample)
            keys.append(outcome.key)
    return PreparedCells(kept, keys, skipped)


def _preprocess_shares(
    paths: list[Path], cache: PreprocessCache, *, workers: int | None, progress: bool
) -> list[PreprocessOutcome]:
    """Preprocess this process's share of the files; return the outcomes of every process's share."""
    if distributed.world_size() == 1:
        return preprocess_files(paths, cache, workers=workers, progress=progress)

    # Shares are disjoint by path, but files with identical bytes under two names share a key,
    # so two processes may write the same entry at once. The cache writes each entry to a
    # temporary file and renames it into place, so the entry is whole whichever process wins.
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // distributed.launcher_world().local_size)
    mine = preprocess_files(distributed.shard(paths), cache, workers=workers, progress=progress)
    outcomes = distributed.gather_shards(mine)
    _check_entries_visible(outcomes, cache)
    return outcomes


def _check_entries_visible(outcomes: list[PreprocessOutcome], cache: PreprocessCache) -> None:
    """Fail when cells that other processes preprocessed are not in this process's cache folder."""
    unseen = [outcome.path for outcome in outcomes if outcome.key and not cache.entry_path(outcome.key).is_file()]
    if unseen:
        raise RuntimeError(
            f"{len(unseen)} cells preprocessed by other processes (the first: {unseen[0]}) are not in "
            f"{cache.folder}; with processes on several nodes, --cache-dir must be a folder every node shares"
        )


def write_skipped(path: Path, skipped: list[tuple[Path, str]]) -> None:
    """Write the skipped files and their reasons to a CSV (header only when none was skipped)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
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
