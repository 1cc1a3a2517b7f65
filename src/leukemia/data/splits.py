"""Train/validation/test splits that keep every subject on one side.

Cells of one subject share staining, imaging session and label, so a split that puts a
subject's cells on both sides measures recognition of the subject, not of the disease. Every
split here is made over subjects; an image-level split exists only for showing that effect.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from leukemia.data.discovery import Sample

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
_SHUFFLE_ATTEMPTS = 20
LEAKAGE_WARNING = (
    "WARNING: images were split at random, so cells of the same subject are in training and test; "
    "these results are optimistic because of subject leakage."
)


@dataclass
class Split:
    """Samples assigned to train, val and test, with the rule that made the assignment."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    rule: str
    subject_level: bool = True
    notes: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def write_csv(self, path: Path) -> None:
        """Write one row per image: file, split, subject, label."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["file", "split", "subject", "label"])
            for name, samples in self.parts().items():
                for sample in samples:
                    writer.writerow([str(sample.path), name, sample.subject or "", sample.label])


def check_subject_disjoint(split: Split) -> list[str]:
    """Return the subjects found in more than one split (an empty list when disjoint)."""
    splits_by_subject: dict[str, set[str]] = defaultdict(set)
    for name, samples in split.parts().items():
        for sample in samples:
            splits_by_subject[_subject_key(sample)].add(name)
    return sorted(subject for subject, names in splits_by_subject.items() if len(names) > 1)


def make_split(
    samples: list[Sample],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    image_level: bool = False,
    seed: int = 42,
) -> Split:
    """Split labeled samples into train, validation and test.

    Rules, in order:

    1. ``image_level=True``: a random stratified split of images (subject leakage).
    2. A labeled preliminary-test set with both classes is the test set; validation subjects
       are drawn from the training folds.
    3. Otherwise every labeled image joins one stratified split by subject.

    Raises:
        ValueError: a class has no image, or too few subjects to place one in every split.
    """
    labeled = [sample for sample in samples if sample.label is not None]
    _require_both_classes(labeled, "the data set")

    if image_level:
        return _split_images(labeled, val_fraction, test_fraction, seed)

    prelim = [sample for sample in labeled if sample.group == "prelim_test"]
    if len({sample.label for sample in prelim}) == 2:
        development = [sample for sample in labeled if sample.group != "prelim_test"]
        train, val = _split_subjects(development, val_fraction, seed)
        return Split(
            train, val, prelim,
            rule="official preliminary test set as test; validation subjects drawn from the training folds",
        )

    notes = []
    if prelim:
        notes.append(
            f"the preliminary test set holds {len(prelim)} labeled image(s) of one class only, "
            "so it joins the subject split instead of being the test set"
        )
    development, test = _split_subjects(labeled, test_fraction, seed)
    train, val = _split_subjects(development, val_fraction / (1.0 - test_fraction), seed + 1)
    return Split(train, val, test, rule="stratified split by subject of all labeled images", notes=notes)


def _split_subjects(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off about ``fraction`` of each class's images as whole subjects.

    StratifiedGroupKFold with k = round(1 / fraction) gives subject-disjoint folds. C-NMC
    subjects differ in size by two orders of magnitude, so a single shuffle can give a fold
    far from the target; the fold whose per-class fractions come closest to ``fraction`` over
    a fixed number of seeded shuffles is held out, which keeps the result deterministic.
    """
    _require_subjects(samples)
    labels = np.array([sample.label for sample in samples])
    groups = np.array([_subject_key(sample) for sample in samples])
    n_splits = max(2, min(round(1.0 / fraction), _min_subjects_per_class(samples)))
    class_sizes = {label: int(np.sum(labels == label)) for label in (0, 1)}

    best_error, best = float("inf"), None
    for attempt in range(_SHUFFLE_ATTEMPTS):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 1000 * attempt)
        for keep_index, held_index in splitter.split(np.zeros(len(samples)), labels, groups):
            if len(set(labels[held_index])) < 2 or len(set(labels[keep_index])) < 2:
                continue
            error = sum(
                abs(np.sum(labels[held_index] == label) / class_sizes[label] - fraction) for label in (0, 1)
            )
            if error < best_error:
                best_error, best = error, (keep_index, held_index)
    if best is None:
        raise ValueError(
            "cannot split by subject with both classes on each side; each class needs at least "
            "3 subjects for a train/validation/test split"
        )
    keep_index, held_index = best
    return [samples[i] for i in keep_index], [samples[i] for i in held_index]


def _split_images(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int) -> Split:
    logger.warning(LEAKAGE_WARNING)
    labels = [sample.label for sample in samples]
    development, test = train_test_split(samples, test_size=test_fraction, stratify=labels, random_state=seed)
    development_labels = [sample.label for sample in development]
    train, val = train_test_split(
        development,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=development_labels,
        random_state=seed + 1,
    )
    return Split(train, val, test, rule="random image-level split (subject leakage)", subject_level=False)


def _subject_key(sample: Sample) -> str:
    # An image without a known subject is its own group, so it can never leak.
    return sample.subject if sample.subject is not None else f"file:{sample.path}"


def _require_both_classes(samples: list[Sample], what: str) -> None:
    present = {sample.label for sample in samples}
    for label, name in ((1, "ALL"), (0, "HEM")):
        if label not in present:
            raise ValueError(f"{what} has no usable {name} image; a classifier needs images of both classes")


def _require_subjects(samples: list[Sample]) -> None:
    missing = sum(1 for sample in samples if sample.subject is None)
    if missing:
        logger.warning(
            "%d images have no subject in their file name or manifest; each is treated as its own subject",
            missing,
        )


def _min_subjects_per_class(samples: list[Sample]) -> int:
    subjects: dict[int, set[str]] = defaultdict(set)
    for sample in samples:
        subjects[sample.label].add(_subject_key(sample))
    return min(len(subjects[0]), len(subjects[1]))
