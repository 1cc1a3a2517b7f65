"""Tests of image reading: formats, channel layouts, bit depths and unreadable files."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from leukemia.data import ImageReadError, read_image


def color_bars(height: int = 48, width: int = 64) -> np.ndarray:
    """Return an RGB image of four solid vertical bars, red, green, blue and a purple stain color."""
    image = np.zeros((height, width, 3), np.uint8)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (150, 80, 190)]
    bar = width // len(colors)
    for index, color in enumerate(colors):
        image[:, index * bar : (index + 1) * bar] = color
    return image


def noise_image(size: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".bmp", ".png", ".tif", ".tiff", ".BMP", ".Png"])
def test_lossless_formats_exact(tmp_path, image_writer, suffix):
    expected = color_bars()
    path = image_writer(tmp_path / f"cell{suffix}", expected)

    image = read_image(path)

    assert image.dtype == np.uint8
    assert image.shape == expected.shape
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPEG"])
def test_jpeg_close_to_source(tmp_path, image_writer, suffix):
    expected = color_bars()
    path = image_writer(tmp_path / f"cell{suffix}", expected)

    image = read_image(path)

    assert image.shape == expected.shape
    # The bars are wide, so JPEG error stays small away from their edges.
    interior = np.abs(image[:, 4:12].astype(int) - expected[:, 4:12]).max()
    assert interior <= 8


def test_rgb_channel_order(tmp_path, image_writer):
    path = image_writer(tmp_path / "red.png", np.full((32, 32, 3), (200, 10, 20), np.uint8))

    image = read_image(path)

    assert image[0, 0].tolist() == [200, 10, 20]


def test_grayscale_repeated_to_rgb(tmp_path, image_writer):
    gray = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    path = image_writer(tmp_path / "gray.png", gray)

    image = read_image(path)

    assert image.shape == (32, 32, 3)
    for channel in range(3):
        assert np.array_equal(image[:, :, channel], gray)


def test_rgba_alpha_dropped(tmp_path, image_writer):
    rgb = color_bars()
    alpha = np.full(rgb.shape[:2] + (1,), 30, np.uint8)
    path = image_writer(tmp_path / "alpha.png", np.concatenate([rgb, alpha], axis=2))

    image = read_image(path)

    assert image.shape == rgb.shape
    assert np.array_equal(image, rgb)


def test_png_16_bit_scaled(tmp_path, image_writer):
    values = np.array([[0, 257, 257 * 100], [257 * 200, 65535, 65535]], np.uint16)
    tiled = np.tile(values, (16, 11))  # 32 x 33, above the 32-pixel minimum
    path = image_writer(tmp_path / "deep.png", np.dstack([tiled, tiled, tiled]))

    image = read_image(path)

    assert image.dtype == np.uint8
    assert image[:2, :3, 0].tolist() == [[0, 1, 100], [200, 255, 255]]


def test_gray_png_16_bit_scaled(tmp_path, image_writer):
    path = image_writer(tmp_path / "deep_gray.png", np.full((32, 32), 257 * 42, np.uint16))

    image = read_image(path)

    assert image.shape == (32, 32, 3)
    assert image.dtype == np.uint8
    assert np.all(image == 42)


def test_palette_bmp_to_rgb(tmp_path):
    path = tmp_path / "palette.bmp"
    Image.fromarray(color_bars()).convert("P").save(path)
    with Image.open(path) as saved:
        assert saved.mode == "P"
        expected = np.asarray(saved.convert("RGB"))

    image = read_image(path)

    assert image.shape == expected.shape
    assert np.array_equal(image, expected)


def test_non_ascii_path(tmp_path, image_writer):
    path = image_writer(tmp_path / "Zellen ü" / "célula_血.png", color_bars())

    image = read_image(path)

    assert np.array_equal(image, color_bars())


def test_real_sample_cell(sample_images):
    image = read_image(sample_images[0])

    assert image.shape == (450, 450, 3)
    assert image.dtype == np.uint8


# Unreadable files: the error names the file


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.bmp"
    path.write_bytes(b"")

    with pytest.raises(ImageReadError, match=re.escape(str(path)) + r": the file is empty \(0 bytes\)"):
        read_image(path)


def test_text_named_bmp(tmp_path):
    path = tmp_path / "notes.bmp"
    path.write_text("this is not an image\n")

    with pytest.raises(ImageReadError, match=re.escape(str(path)) + ": not a decodable"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, image_writer, suffix):
    whole = image_writer(tmp_path / f"whole{suffix}", noise_image())
    path = tmp_path / f"truncated{suffix}"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageReadError, match=re.escape(str(path)) + ": not a decodable"):
        read_image(path)


def test_missing_file(tmp_path):
    path = tmp_path / "gone.png"

    with pytest.raises(ImageReadError, match=re.escape(str(path)) + ": cannot be read"):
        read_image(path)


def test_error_keeps_path_and_reason(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(ImageReadError) as caught:
        read_image(str(path))

    assert caught.value.path == path
    assert caught.value.reason.startswith("the file is empty")
    assert isinstance(caught.value, ValueError)
