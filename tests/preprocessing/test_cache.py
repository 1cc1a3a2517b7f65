"""Tests of the on-disk preprocessing cache: keys, reuse, skipped files and worker processes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from leukemia.data import read_image
from leukemia.preprocessing import PreprocessCache, PreprocessConfig, preprocess_cell, preprocess_files
from leukemia.preprocessing.cache import file_digest

SMALL_OUTPUT = PreprocessConfig(output_size=64)


@pytest.fixture
def cells(sample_images, tmp_path) -> list[Path]:
    """Copies of four real cells, two of each class, in a folder the test may change."""
    chosen = [path for path in sample_images if "/all/" in path.as_posix()][:2]
    chosen += [path for path in sample_images if "/hem/" in path.as_posix()][:2]
    folder = tmp_path / "cells"
    folder.mkdir()
    return [Path(shutil.copy(path, folder / path.name)) for path in chosen]


def run_preprocessing(paths: list[Path], cache: PreprocessCache, workers: int = 1):
    return preprocess_files(paths, cache, workers=workers, progress=False)


def test_first_run_stores_entries(cells, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)

    outcomes = run_preprocessing(cells, cache)

    assert [outcome.path for outcome in outcomes] == cells
    assert all(outcome.error is None for outcome in outcomes)
    assert not any(outcome.cached for outcome in outcomes)
    assert all(cache.entry_path(outcome.key).is_file() for outcome in outcomes)


def test_second_run_all_cached(cells, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)
    first = run_preprocessing(cells, cache)

    second = run_preprocessing(cells, cache)

    assert all(outcome.cached for outcome in second)
    assert [outcome.key for outcome in second] == [outcome.key for outcome in first]


def test_entry_equals_direct_output(cells, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)

    (outcome,) = run_preprocessing(cells[:1], cache)
    stored = cache.load(outcome.key)
    expected = preprocess_cell(read_image(cells[0]), SMALL_OUTPUT).output

    assert stored.shape == (64, 64, 3)
    assert stored.dtype == np.uint8
    assert np.array_equal(stored, expected)


def test_changed_setting_recomputes(cells, tmp_path):
    root = tmp_path / "cache"
    run_preprocessing(cells, PreprocessCache(root, SMALL_OUTPUT))
    other = PreprocessCache(root, PreprocessConfig(output_size=64, crop="fixed"))

    outcomes = run_preprocessing(cells, other)

    assert other.folder != PreprocessCache(root, SMALL_OUTPUT).folder
    assert not any(outcome.cached for outcome in outcomes)
    assert all(outcome.error is None for outcome in outcomes)


def test_changed_size_loads_new_size(cells, tmp_path):
    root = tmp_path / "cache"
    run_preprocessing(cells[:1], PreprocessCache(root, SMALL_OUTPUT))
    larger = PreprocessCache(root, PreprocessConfig(output_size=96))

    (outcome,) = run_preprocessing(cells[:1], larger)

    assert larger.load(outcome.key).shape == (96, 96, 3)


def test_key_follows_content_not_name(cells, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)
    (original,) = run_preprocessing(cells[:1], cache)
    renamed = Path(shutil.copy(cells[0], tmp_path / "renamed_copy.jpg"))

    (outcome,) = run_preprocessing([renamed], cache)

    assert outcome.key == original.key
    assert outcome.key == file_digest(cells[0])
    assert outcome.cached is True


def test_edited_file_new_key(cells, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)
    (before,) = run_preprocessing(cells[:1], cache)
    shutil.copy(cells[1], cells[0])

    (after,) = run_preprocessing(cells[:1], cache)

    assert after.key != before.key
    assert after.cached is False


def test_bad_files_skipped(cells, tmp_path, image_writer, caplog):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)
    corrupt = tmp_path / "corrupt.bmp"
    corrupt.write_bytes(b"BM this is not a bitmap")
    blank = image_writer(tmp_path / "blank.png", np.zeros((450, 450, 3), np.uint8))

    with caplog.at_level(logging.WARNING, logger="leukemia.preprocessing.cache"):
        outcomes = run_preprocessing([cells[0], corrupt, blank, cells[1]], cache)
    good, bad_file, blank_file, other_good = outcomes

    assert good.error is None
    assert other_good.error is None
    assert bad_file.key is None
    assert "not a decodable" in bad_file.error
    assert blank_file.key is None
    assert blank_file.error.startswith("blank image: ")
    assert f"skipped {corrupt}" in caplog.text
    assert f"skipped {blank}" in caplog.text


def test_missing_file_skipped(tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)

    (outcome,) = run_preprocessing([tmp_path / "gone.png"], cache)

    assert outcome.key is None
    assert outcome.error.startswith("cannot be read")


def test_no_temporary_files_left(cells, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)

    run_preprocessing(cells, cache)

    assert list(cache.folder.rglob("*.tmp")) == []
    assert len(list(cache.folder.rglob("*.png"))) == len(cells)


def test_two_workers_same_entries(cells, tmp_path):
    serial = PreprocessCache(tmp_path / "serial", SMALL_OUTPUT)
    parallel = PreprocessCache(tmp_path / "parallel", SMALL_OUTPUT)

    serial_outcomes = run_preprocessing(cells, serial, workers=1)
    parallel_outcomes = run_preprocessing(cells, parallel, workers=2)

    assert [o.key for o in parallel_outcomes] == [o.key for o in serial_outcomes]
    for outcome in serial_outcomes:
        assert np.array_equal(parallel.load(outcome.key), serial.load(outcome.key))


def test_load_missing_entry(tmp_path):
    cache = PreprocessCache(tmp_path / "cache", SMALL_OUTPUT)

    with pytest.raises(FileNotFoundError, match="cache entry missing or unreadable"):
        cache.load("ab" + "0" * 62)
