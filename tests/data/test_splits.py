"""Tests of train/validation/test splits: subject-disjoint by default, leaking only on request."""

from __future__ import annotations

import csv
import itertools
import logging
from pathlib import Path

import pytest

from leukemia.data import Sample, Split, check_subject_disjoint, discover, make_split
from leukemia.data.splits import LEAKAGE_WARNING, SPLIT_NAMES


def make_samples(subjects: dict[str, int], *, images: int, group: str = "fold_0") -> list[Sample]:
    """Return ``images`` samples for each subject of ``subjects``, a map from subject id to label."""
    return [
        Sample(Path(f"/cells/{group}/UID_{subject}_{i}_1.bmp"), label, subject, group)
        for subject, label in subjects.items()
        for i in range(images)
    ]


def subjects_of(samples: list[Sample]) -> set[str]:
    return {sample.subject for sample in samples}


def paths_of(split: Split) -> dict[str, list[Path]]:
    return {name: [sample.path for sample in samples] for name, samples in split.parts().items()}


DEVELOPMENT_SUBJECTS = {**{str(i): 1 for i in range(1, 9)}, **{f"H{i}": 0 for i in range(1, 9)}}


# Real subset, default split


@pytest.fixture(scope="module")
def real_samples(cnmc_subset) -> list[Sample]:
    return discover(cnmc_subset).samples


@pytest.fixture(scope="module")
def real_split(real_samples) -> Split:
    return make_split(real_samples)


def test_real_split_checker_disjoint(real_split):
    assert check_subject_disjoint(real_split) == []


def test_real_split_subject_sets_disjoint(real_split):
    parts = real_split.parts()

    assert all(sample.subject is not None for samples in parts.values() for sample in samples)
    for first, second in itertools.combinations(SPLIT_NAMES, 2):
        shared = subjects_of(parts[first]) & subjects_of(parts[second])
        assert shared == set(), f"subjects in both {first} and {second}: {sorted(shared)}"


@pytest.mark.parametrize("name", SPLIT_NAMES)
def test_real_split_both_classes(real_split, name):
    labels = {sample.label for sample in real_split.parts()[name]}

    assert labels == {0, 1}


def test_real_split_uses_every_image(real_split, real_samples):
    assigned = [sample.path for samples in real_split.parts().values() for sample in samples]

    assert len(assigned) == len(real_samples)
    assert set(assigned) == {sample.path for sample in real_samples}


def test_real_split_rule_and_note(real_split):
    assert real_split.subject_level is True
    assert "by subject" in real_split.rule
    assert len(real_split.notes) == 1
    assert "1 labeled image(s) of one class only" in real_split.notes[0]


def test_real_image_level_leaks(real_samples, caplog):
    with caplog.at_level(logging.WARNING, logger="leukemia.data.splits"):
        split = make_split(real_samples, image_level=True)

    assert split.subject_level is False
    assert "subject leakage" in split.rule
    assert check_subject_disjoint(split) != []
    assert LEAKAGE_WARNING in caplog.text


# Synthetic sets


def test_labeled_prelim_is_test_set():
    development = make_samples(DEVELOPMENT_SUBJECTS, images=10)
    prelim = make_samples({"50": 1, "51": 1, "H50": 0, "H51": 0}, images=5, group="prelim_test")

    split = make_split(development + prelim)

    assert {sample.path for sample in split.test} == {sample.path for sample in prelim}
    assert "preliminary test set" in split.rule
    assert split.notes == []
    assert check_subject_disjoint(split) == []
    assert {sample.label for sample in split.val} == {0, 1}


def test_unlabeled_samples_left_out():
    development = make_samples(DEVELOPMENT_SUBJECTS, images=4)
    unlabeled = [Sample(Path(f"/cells/final/{i}.bmp"), None, None, "final_test") for i in range(5)]

    split = make_split(development + unlabeled)
    assigned = {sample.path for samples in split.parts().values() for sample in samples}

    assert assigned == {sample.path for sample in development}


def test_without_hem_raises():
    samples = make_samples({"1": 1, "2": 1, "3": 1}, images=3)

    with pytest.raises(ValueError, match="no usable HEM image"):
        make_split(samples)


def test_without_all_raises():
    samples = make_samples({"H1": 0, "H2": 0, "H3": 0}, images=3)

    with pytest.raises(ValueError, match="no usable ALL image"):
        make_split(samples)


def test_too_few_subjects_raises():
    samples = make_samples({"1": 1, "2": 1, "H1": 0, "H2": 0}, images=5)

    with pytest.raises(ValueError, match="at least 3 subjects"):
        make_split(samples)


def test_same_seed_same_split(sample_dir):
    samples = discover(sample_dir).samples

    first = make_split(samples, seed=7)
    second = make_split(samples, seed=7)

    assert paths_of(first) == paths_of(second)


def test_sample_split_disjoint(sample_dir):
    split = make_split(discover(sample_dir).samples)

    assert check_subject_disjoint(split) == []


def test_checker_reports_shared_subject():
    train = make_samples({"1": 1, "H1": 0}, images=2)
    test = make_samples({"1": 1}, images=1, group="fold_1")

    split = Split(train=train, val=[], test=test, rule="hand-made")

    assert check_subject_disjoint(split) == ["1"]


# CSV output


def test_write_csv_rows(tmp_path):
    train = [Sample(Path("/cells/a.bmp"), 1, "11", "fold_0")]
    val = [Sample(Path("/cells/b.bmp"), 0, "H3", "fold_1")]
    test = [Sample(Path("/cells/c.bmp"), 1, None, "prelim_test")]
    split = Split(train=train, val=val, test=test, rule="hand-made")
    path = tmp_path / "split.csv"

    split.write_csv(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))

    assert rows == [
        ["file", "split", "subject", "label"],
        [str(Path("/cells/a.bmp")), "train", "11", "1"],
        [str(Path("/cells/b.bmp")), "val", "H3", "0"],
        [str(Path("/cells/c.bmp")), "test", "", "1"],
    ]
