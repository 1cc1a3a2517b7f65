"""Cross-validation folds: every fold keeps whole subjects, on the real cells."""

from collections import defaultdict

import pytest

from leukemia.data.discovery import Sample, discover
from leukemia.data.splits import check_subject_disjoint, make_fold_split, make_folds


@pytest.fixture(scope="module")
def real_samples(cnmc_subset_jpeg):
    return discover(cnmc_subset_jpeg).labeled


def _folds_of_subjects(parts: list[list[Sample]]) -> dict[str, set[int]]:
    folds = defaultdict(set)
    for index, part in enumerate(parts):
        for sample in part:
            folds[sample.subject].add(index)
    return folds


def test_official_folds_by_default(real_samples):
    folds = make_folds(real_samples)

    assert folds.rule.startswith("the 3 official C-NMC folds")
    assert [{s.group for s in part} for part in folds.parts] == [{"fold_0"}, {"fold_1"}, {"fold_2"}]
    assert {s.group for s in folds.excluded} == {"prelim_test"}


@pytest.mark.parametrize("n_folds", [None, 3, 4, 5])
def test_every_subject_in_one_fold(real_samples, n_folds):
    folds = make_folds(real_samples, n_folds=n_folds)
    placed = [sample for part in folds.parts for sample in part] + folds.excluded

    assert all(len(indices) == 1 for indices in _folds_of_subjects(folds.parts).values())
    assert sorted(map(str, (s.path for s in placed))) == sorted(map(str, (s.path for s in real_samples)))
    assert all({s.label for s in part} == {0, 1} for part in folds.parts)


@pytest.mark.parametrize("n_folds", [None, 4])
def test_each_fold_split_is_subject_disjoint(real_samples, n_folds):
    parts = make_folds(real_samples, n_folds=n_folds).parts

    for fold in range(len(parts)):
        split = make_fold_split(real_samples, fold=fold, n_folds=n_folds)

        assert check_subject_disjoint(split) == []
        assert sorted(str(s.path) for s in split.test) == sorted(str(s.path) for s in parts[fold])
        assert {s.label for s in split.val} == {0, 1}


def test_other_fold_count_makes_subject_folds(real_samples):
    folds = make_folds(real_samples, n_folds=4)

    assert folds.rule == "4 stratified folds of whole subjects"
    assert folds.notes == ["4 folds were requested, so the 3 official folds are not used"]
    assert folds.excluded == []


def test_image_level_folds_share_subjects(real_samples):
    folds = make_folds(real_samples, image_level=True)

    assert len(folds.parts) == 3, "as many folds as the subject-level default, for a fair comparison"
    assert any(len(indices) > 1 for indices in _folds_of_subjects(folds.parts).values())


def test_one_class_fold_falls_back(sample_dir):
    # In the 48-cell sample, fold_2 contains ALL cells only.
    folds = make_folds(discover(sample_dir).labeled)

    assert folds.rule == "5 stratified folds of whole subjects"
    assert "fold_2 contains images of one class only" in folds.notes[0]


def test_too_many_folds_rejected(sample_dir):
    with pytest.raises(ValueError, match="cannot make 7 folds of whole subjects: a class has only 6 subject"):
        make_folds(discover(sample_dir).labeled, n_folds=7)


def test_unknown_fold_rejected(real_samples):
    with pytest.raises(ValueError, match="invalid fold 3; the data has 3 folds"):
        make_fold_split(real_samples, fold=3)


def test_folds_are_deterministic(real_samples):
    first = make_folds(real_samples, n_folds=4, seed=3)
    second = make_folds(real_samples, n_folds=4, seed=3)

    assert [[s.path for s in part] for part in first.parts] == [[s.path for s in part] for part in second.parts]
