"""Scale and colour jitter keep what the backbone expects: shape, dtype and value range."""

import numpy as np
import pytest
import torch

from leukemia.data.images import read_image
from leukemia.preprocessing.cell import PreprocessConfig, preprocess_cell
from leukemia.preprocessing.views import N_DIHEDRAL_VIEWS, dihedral_view
from leukemia.training.augment import build_augmentation


@pytest.fixture(scope="module")
def cells(sample_images):
    return [preprocess_cell(read_image(path), PreprocessConfig()).output for path in sample_images[::12]]


@pytest.mark.parametrize("scale, colour", [(0.1, 0.0), (0.0, 0.05), (0.1, 0.05), (0.4, 0.9)])
def test_jitter_keeps_shape_dtype_and_range(cells, scale, colour):
    augment = build_augmentation(scale, colour)
    torch.manual_seed(0)
    for cell in cells:
        for view in range(N_DIHEDRAL_VIEWS):
            image = dihedral_view(cell, view)
            jittered = augment(image)

            assert jittered.shape == image.shape
            assert jittered.dtype == np.uint8
            assert jittered.flags["C_CONTIGUOUS"]
            assert not np.array_equal(jittered, image)


def test_small_jitter_changes_little(cells):
    augment = build_augmentation(0.1, 0.05)
    torch.manual_seed(1)
    changes = [np.abs(augment(cell).astype(int) - cell.astype(int)).mean() for cell in cells]

    assert max(changes) < 40, "a small jitter keeps the cell recognisable"


def test_scale_jitter_fills_with_black(cells):
    # A zoom-out uncovers the corners; they take the black of the preprocessed background.
    augment = build_augmentation(0.3, 0.0)
    torch.manual_seed(2)
    images = [augment(cells[0]) for _ in range(20)]

    assert any((image[0, 0] == 0).all() for image in images)


def test_jitter_follows_torch_seed(cells):
    augment = build_augmentation(0.1, 0.05)
    torch.manual_seed(3)
    first = augment(cells[0])
    torch.manual_seed(3)

    assert np.array_equal(first, augment(cells[0]))


def test_no_jitter_is_none():
    assert build_augmentation(0.0, 0.0) is None


@pytest.mark.parametrize("scale, colour, message", [
    (-0.1, 0.0, "invalid scale jitter -0.1"),
    (0.5, 0.0, "invalid scale jitter 0.5"),
    (0.0, 1.0, "invalid colour jitter 1.0"),
])
def test_invalid_strength_rejected(scale, colour, message):
    with pytest.raises(ValueError, match=message):
        build_augmentation(scale, colour)


def test_dataset_jitters_each_draw_reproducibly(tmp_path, sample_images):
    from leukemia.preprocessing.cache import PreprocessCache, preprocess_files
    from leukemia.training.datasets import CachedCellDataset

    cache = PreprocessCache(tmp_path, PreprocessConfig())
    keys = [outcome.key for outcome in preprocess_files(sample_images[:2], cache, workers=1)]
    dataset = CachedCellDataset(cache, keys, [1, 0], (0.5,) * 3, (0.25,) * 3, n_views=8,
                                augment=build_augmentation(0.1, 0.05), augment_seed=7)

    first, again, next_epoch = dataset[3][0], dataset[3][0], dataset[3 + len(dataset)][0]

    assert torch.equal(first, again), "a draw's jitter depends on its number, not on the random state"
    assert not torch.equal(first, next_epoch), "the same cell and view get new jitter in the next epoch"
    assert torch.equal(dataset[3][1], dataset[3 + len(dataset)][1])
