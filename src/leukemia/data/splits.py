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
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

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


@dataclass
class Folds:
    """A partition of labeled samples into cross-validation folds, each kept whole by subject.

    Attributes:
        parts: the samples of each fold; fold k is the test split of the k-th run.
        rule: how the folds were made.
        excluded: labeled samples left out of every fold (the official test sets).
        notes: remarks for the report.
    """

    parts: list[list[Sample]]
    rule: str
    excluded: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


DEFAULT_FOLDS = 5


def make_folds(
    samples: list[Sample],
    *,
    n_folds: int | None = None,
    image_level: bool = False,
    seed: int = 42,
) -> Folds:
    """Partition labeled samples into cross-validation folds.

    Rules, in order:

    1. ``image_level=True``: stratified folds of images (subject leakage, for comparison only),
       as many as rule 2 or 3 would make.
    2. The C-NMC training folds (``fold_0`` ...), when every labeled training image is in one
       and ``n_folds`` is None or their number. The official test sets stay out of the
       folds: they are the test set of the challenge protocol, not of cross-validation.
    3. Otherwise ``n_folds`` (default 5) stratified folds of whole subjects.

    Raises:
        ValueError: a class has no image, or has fewer subjects than folds.
    """
    labeled = [sample for sample in samples if sample.label is not None]
    _require_both_classes(labeled, "the data set")
    official, unusable = _official_folds(labeled)
    if image_level:
        # As many folds as the subject-level default, so the two can be compared.
        logger.warning(LEAKAGE_WARNING)
        return _image_folds(labeled, n_folds or (len(official.parts) if official else DEFAULT_FOLDS), seed)

    if official is not None and n_folds in (None, len(official.parts)):
        return official
    notes = [unusable] if unusable else []
    if official is not None:
        notes.append(f"{n_folds} folds were requested, so the {len(official.parts)} official folds are not used")
    n_folds = n_folds or DEFAULT_FOLDS
    _require_subjects(labeled)
    if _min_subjects_per_class(labeled) < n_folds:
        raise ValueError(
            f"cannot make {n_folds} folds of whole subjects: a class has only {_min_subjects_per_class(labeled)} "
            f"subject(s), and every fold needs one of each class; use --folds {max(2, _min_subjects_per_class(labeled))} "
            "or fewer"
        )
    labels = np.array([sample.label for sample in labeled])
    groups = np.array([_subject_key(sample) for sample in labeled])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    parts = [[labeled[i] for i in held] for _, held in splitter.split(np.zeros(len(labeled)), labels, groups)]
    return Folds(parts, rule=f"{n_folds} stratified folds of whole subjects", notes=notes)


def make_fold_split(
    samples: list[Sample],
    *,
    fold: int,
    n_folds: int | None = None,
    val_fraction: float = 0.15,
    image_level: bool = False,
    seed: int = 42,
) -> Split:
    """Return the split of cross-validation run ``fold``: that fold as test, the others for training.

    Validation subjects are drawn from the training folds, as in the main job.

    Raises:
        ValueError: the folds cannot be made (see ``make_folds``), or ``fold`` is not one of them.
    """
    folds = make_folds(samples, n_folds=n_folds, image_level=image_level, seed=seed)
    if not 0 <= fold < len(folds.parts):
        raise ValueError(f"invalid fold {fold}; the data has {len(folds.parts)} folds, numbered from 0")
    test = folds.parts[fold]
    development = [sample for k, part in enumerate(folds.parts) if k != fold for sample in part]
    rule = f"cross-validation, fold {fold} of {len(folds.parts)} as test ({folds.rule})"
    if image_level:
        labels = [sample.label for sample in development]
        train, val = train_test_split(development, test_size=val_fraction, stratify=labels, random_state=seed)
        return Split(train, val, test, rule=rule, subject_level=False, notes=folds.notes)
    train, val = _split_subjects(development, val_fraction, seed)
    notes = list(folds.notes)
    if folds.excluded:
        notes.append(f"{len(folds.excluded)} labeled image(s) of the official test sets are in no fold")
    return Split(train, val, test, rule=rule + "; validation subjects drawn from the other folds", notes=notes)


def _official_folds(samples: list[Sample]) -> tuple[Folds | None, str | None]:
    """Return the C-NMC training folds when every labeled training image is in one of two or more.

    Returns (None, reason) when the official folds exist but cannot serve: a fold lacks a
    class (a subset of the release), or a subject is in more than one fold (a modified copy).
    """
    test_groups = ("prelim_test", "final_test")
    training = [sample for sample in samples if sample.group not in test_groups]
    names = sorted({sample.group for sample in training}, key=lambda name: (len(name), name))
    if len(names) < 2 or not all(name.startswith("fold_") for name in names):
        return None, None
    parts = [[sample for sample in training if sample.group == name] for name in names]
    excluded = [sample for sample in samples if sample.group in test_groups]
    for name, part in zip(names, parts):
        if len({sample.label for sample in part}) < 2:
            return None, f"the official fold {name} contains images of one class only, so folds of subjects are made instead"
    folds = Folds(parts, rule=f"the {len(names)} official C-NMC folds ({', '.join(names)})", excluded=excluded)
    folds_by_subject: dict[str, set[str]] = defaultdict(set)
    for sample in training:
        folds_by_subject[_subject_key(sample)].add(sample.group)
    shared = sorted(subject for subject, groups in folds_by_subject.items() if len(groups) > 1)
    if shared:
        return None, (f"subjects {', '.join(shared)} are in more than one official fold, so folds of whole subjects "
                      "are made instead")
    return folds, None


def _image_folds(samples: list[Sample], n_folds: int, seed: int) -> Folds:
    labels = np.array([sample.label for sample in samples])
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    parts = [[samples[i] for i in held] for _, held in splitter.split(np.zeros(len(samples)), labels)]
    return Folds(parts, rule=f"{n_folds} stratified folds of images (subject leakage)")
