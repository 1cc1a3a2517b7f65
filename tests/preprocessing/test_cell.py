"""Tests of cell segmentation and cropping on synthetic discs and real C-NMC cells."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from leukemia.data import read_image
from leukemia.preprocessing import BlankImageError, PreprocessConfig, preprocess_cell

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
CYTOPLASM = (190, 150, 210)
NUCLEUS = (110, 60, 160)


def disc_image(size: int = 450, radius: int = 100, background=BLACK) -> tuple[np.ndarray, np.ndarray]:
    """Return a stained-cell-like disc (cytoplasm and an off-center nucleus) and its boolean mask."""
    image = np.full((size, size, 3), background, np.uint8)
    center = (size // 2, size // 2)
    cv2.circle(image, center, radius, CYTOPLASM, -1)
    cv2.circle(image, (center[0] - radius // 5, center[1]), radius // 2, NUCLEUS, -1)
    inside = np.zeros((size, size), np.uint8)
    cv2.circle(inside, center, radius, 1, -1)
    return image, inside.astype(bool)


def pad_black(image: np.ndarray, border: int) -> np.ndarray:
    return cv2.copyMakeBorder(image, border, border, border, border, cv2.BORDER_CONSTANT, value=BLACK)


def foreground_fraction(output: np.ndarray) -> float:
    """Return the fraction of output pixels brighter than the black background."""
    return float(np.mean(output.max(axis=2) > 40))


@pytest.fixture(scope="module")
def real_cell(sample_images) -> np.ndarray:
    return read_image(sample_images[0])


def in_window(values: np.ndarray, result) -> np.ndarray:
    """Cut the segmentation window out of an array in original coordinates (False outside)."""
    side = result.mask.shape[0]
    left, top = result.window_origin
    padded = np.pad(values, side, constant_values=False)
    return padded[top + side : top + 2 * side, left + side : left + 2 * side]


# Mask polarity: the mask covers the cell on either background


@pytest.mark.parametrize(("background", "dark"), [(BLACK, True), (WHITE, False), ((235, 230, 240), False)])
def test_disc_mask_covers_cell(background, dark):
    image, inside = disc_image(background=background)

    result = preprocess_cell(image)
    mask = result.mask > 0
    inside = in_window(inside, result)

    assert result.dark_background is dark
    assert np.mean(inside[mask]) > 0.99, "mask reaches into the background"
    assert np.mean(mask[inside]) > 0.95, "mask misses part of the cell"


def test_real_cell_mask_covers_cell(real_cell):
    result = preprocess_cell(real_cell)
    mask = result.mask > 0
    cell = in_window(real_cell.max(axis=2) > 10, result)

    assert result.dark_background is True
    assert np.mean(cell[mask]) > 0.99, "mask reaches into the background"
    assert np.mean(mask[cell]) > 0.9, "mask misses part of the cell"


def test_inverted_real_cell_same_mask(real_cell):
    original = preprocess_cell(real_cell).mask > 0

    inverted = preprocess_cell(255 - real_cell)
    mask = inverted.mask > 0
    overlap = np.sum(mask & original) / np.sum(mask | original)

    assert inverted.dark_background is False
    assert overlap > 0.95


# Larger canvas: the same cell centered on 600 x 600 gives the same output


@pytest.mark.parametrize("crop", ["bbox", "fixed"])
@pytest.mark.parametrize("radius", [60, 101])
def test_disc_larger_canvas_same_output(crop, radius):
    config = PreprocessConfig(crop=crop)
    image, _ = disc_image(radius=radius)

    small = preprocess_cell(image, config)
    large = preprocess_cell(pad_black(image, 75), config)

    assert large.bbox == (small.bbox[0] + 75, small.bbox[1] + 75, *small.bbox[2:])
    assert np.array_equal(large.output, small.output)


@pytest.mark.parametrize("crop", ["bbox", "fixed"])
def test_real_cells_larger_canvas_same_output(sample_images, crop):
    config = PreprocessConfig(crop=crop)
    differing = []

    for path in sample_images:
        image = read_image(path)  # 450 x 450, so the padded canvas is 600 x 600
        small = preprocess_cell(image, config).output
        large = preprocess_cell(pad_black(image, 75), config).output
        if not np.array_equal(small, large):
            differing.append(path.name)

    assert differing == []


# Blank images


@pytest.mark.parametrize("value", [0, 255, 128])
def test_uniform_image_is_blank(value):
    image = np.full((450, 450, 3), value, np.uint8)

    with pytest.raises(BlankImageError, match="the image is uniform"):
        preprocess_cell(image)


def test_speck_only_is_blank():
    image = np.zeros((450, 450, 3), np.uint8)
    image[200:203, 200:203] = 255

    with pytest.raises(BlankImageError, match="no cell found"):
        preprocess_cell(image)


def test_small_component_is_blank():
    image, _ = disc_image(radius=20)

    with pytest.raises(BlankImageError, match="fewer than the minimum"):
        preprocess_cell(image, PreprocessConfig(min_cell_fraction=0.05))


# Crop modes: the fixed window keeps cell size, the bounding box removes it


@pytest.fixture(scope="module")
def disc_fractions() -> dict[str, tuple[float, float]]:
    """Foreground fraction of the output for a small and a large disc, per crop mode."""
    fractions = {}
    for crop in ("bbox", "fixed"):
        config = PreprocessConfig(crop=crop)
        small = preprocess_cell(disc_image(radius=50)[0], config).output
        large = preprocess_cell(disc_image(radius=120)[0], config).output
        fractions[crop] = (foreground_fraction(small), foreground_fraction(large))
    return fractions


def test_fixed_crop_keeps_scale(disc_fractions):
    small, large = disc_fractions["fixed"]

    # The area ratio of the discs is (120 / 50) ** 2, about 5.8.
    assert large / small > 4


def test_bbox_crop_removes_scale(disc_fractions):
    small, large = disc_fractions["bbox"]

    assert abs(large - small) < 0.05


def test_fixed_crop_window_pixels():
    image, _ = disc_image(radius=50)

    result = preprocess_cell(image, PreprocessConfig(crop="fixed", window=320))

    assert result.crop.shape == (320, 320, 3)


def test_fixed_crop_larger_cell():
    image, _ = disc_image(radius=150)

    result = preprocess_cell(image, PreprocessConfig(crop="fixed", window=200))

    assert result.crop.shape[:2] == (max(result.bbox[2:]),) * 2


def test_crop_padding_on_white():
    image, _ = disc_image(radius=200, background=WHITE)

    result = preprocess_cell(image, PreprocessConfig(crop="fixed", window=440, enhance_output=False))

    assert result.crop.shape == (440, 440, 3)
    assert result.crop[0, 0].tolist() == list(WHITE)


# Output shape and type


@pytest.mark.parametrize("crop", ["bbox", "fixed"])
@pytest.mark.parametrize("size", [16, 96, 224, 384])
def test_output_shape_and_dtype(real_cell, crop, size):
    output = preprocess_cell(real_cell, PreprocessConfig(crop=crop, output_size=size)).output

    assert output.shape == (size, size, 3)
    assert output.dtype == np.uint8


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((64, 64, 3), np.float32),
    ],
    ids=["gray", "rgba", "float"],
)
def test_wrong_input_raises(image):
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB image"):
        preprocess_cell(image)


# Settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"crop": "centre"}, "invalid crop mode 'centre'"),
        ({"clahe_clip_limit": 0.0}, "CLAHE clip limit must be positive"),
        ({"clahe_clip_limit": -1.0}, "CLAHE clip limit must be positive"),
        ({"clahe_tile_grid": 0}, "tile grid at least 1"),
        ({"output_size": 8}, "output_size, window and segmentation_window must be at least 16"),
        ({"window": 15}, "output_size, window and segmentation_window must be at least 16"),
    ],
)
def test_config_rejects_invalid(settings, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**settings)


def test_config_rejects_negative_margin():
    with pytest.raises(ValueError, match="margin"):
        PreprocessConfig(margin=-0.6)


def test_digest_same_settings():
    assert PreprocessConfig().digest() == PreprocessConfig().digest()


@pytest.mark.parametrize(
    "change",
    [
        {"clahe_clip_limit": 2.0},
        {"clahe_tile_grid": 4},
        {"opening_kernel": 3},
        {"crop": "fixed"},
        {"margin": 0.2},
        {"window": 300},
        {"output_size": 96},
        {"enhance_output": False},
        {"min_cell_fraction": 0.01},
    ],
    ids=lambda change: next(iter(change)),
)
def test_digest_changes_with_setting(change):
    assert PreprocessConfig(**change).digest() != PreprocessConfig().digest()


def test_config_from_dict_round_trip():
    config = PreprocessConfig(crop="fixed", window=300, output_size=128)

    assert PreprocessConfig.from_dict(dataclasses.asdict(config)) == config
