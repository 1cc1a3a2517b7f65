"""Segment the cell in a microscope image and crop it to the model's input size.

Every function takes and returns NumPy arrays: ``image`` is (H, W, 3) uint8 RGB, ``gray`` and
``mask`` are (H, W) uint8 (mask values 0 or 255).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

CropMode = Literal["bbox", "fixed"]


class BlankImageError(ValueError):
    """An image without a cell to segment (uniform, or nothing left after the mask is cleaned)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the preprocessing pipeline; a model records the ones it was trained with.

    Attributes:
        clahe_clip_limit: CLAHE contrast limit.
        clahe_tile_grid: CLAHE tiles along each axis.
        opening_kernel: diameter in pixels of the elliptical opening that removes specks.
        crop: "bbox" crops the cell's bounding box plus a margin, so every cell fills the
            frame and its size is lost; "fixed" crops a window of ``window`` pixels centred
            on the cell, so cell size, which is diagnostic (blasts are larger), is kept.
        margin: for "bbox", the margin on each side as a fraction of the box's longer side.
        window: for "fixed", the window side in source pixels. C-NMC cells are at most about
            300 pixels across at the release's magnification.
        output_size: side of the square output in pixels.
        enhance_output: apply CLAHE to the lightness of the resized output too (the mask is
            always computed on the enhanced gray image).
        min_cell_fraction: a component smaller than this fraction of the segmentation window
            is no cell.
        segmentation_window: side in pixels of the square, centred on the cell, in which the
            mask is computed; the C-NMC canvas is 450 pixels.
    """

    clahe_clip_limit: float = 3.0
    clahe_tile_grid: int = 8
    opening_kernel: int = 5
    crop: CropMode = "bbox"
    margin: float = 0.1
    window: int = 320
    output_size: int = 224
    enhance_output: bool = True
    min_cell_fraction: float = 0.002
    segmentation_window: int = 450

    def __post_init__(self) -> None:
        if self.crop not in ("bbox", "fixed"):
            raise ValueError(f"invalid crop mode {self.crop!r}; use 'bbox' or 'fixed'")
        if self.clahe_clip_limit <= 0 or self.clahe_tile_grid < 1:
            raise ValueError("CLAHE clip limit must be positive and the tile grid at least 1")
        if self.output_size < 16 or self.window < 16 or self.segmentation_window < 16:
            raise ValueError("output_size, window and segmentation_window must be at least 16 pixels")
        if self.margin < 0:
            raise ValueError(f"invalid margin {self.margin}; it must be 0 or more")
        if self.opening_kernel < 0:
            raise ValueError(f"invalid opening_kernel {self.opening_kernel}; it must be 0 or more")
        if not 0 <= self.min_cell_fraction < 1:
            raise ValueError(f"invalid min_cell_fraction {self.min_cell_fraction}; it must be in [0, 1)")

    def digest(self) -> str:
        """Return a short hash of the settings, part of every cache key."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessConfig":
        return cls(**values)


@dataclass
class PreprocessResult:
    """The output and every intermediate step, for drawing and debugging."""

    original: np.ndarray
    gray: np.ndarray
    enhanced: np.ndarray
    mask: np.ndarray
    crop: np.ndarray
    output: np.ndarray
    bbox: tuple[int, int, int, int]  # x, y, width, height of the cell in the original
    dark_background: bool
    window_origin: tuple[int, int]  # x, y of the segmentation window (gray, enhanced, mask) in the original


def preprocess_cell(image: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> PreprocessResult:
    """Run the pipeline on one RGB image: CLAHE, Otsu mask, opening, largest component, crop, resize.

    Raises:
        BlankImageError: the image is uniform or no component is large enough to be a cell.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} and dtype {image.dtype}")

    # Gray image and background polarity.
    full_gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if int(full_gray.max()) - int(full_gray.min()) < 2:
        raise BlankImageError(
            f"the image is uniform (every pixel is about {int(full_gray.mean())}), so it shows no cell; "
            "check the file or remove it from the data"
        )
    dark_background = is_dark_background(full_gray)

    # Segmentation window: a square of fixed side around the cell's rough position, so that
    # CLAHE tiles and the minimum cell area do not depend on the canvas size (a 600x600 image
    # with the cell centred gives the same mask as the 450x450 one).
    side = config.segmentation_window
    left, top = _segmentation_origin(full_gray, dark_background, side)
    gray_background = 0 if dark_background else int(np.median(_border(full_gray)))
    gray = _crop_square(full_gray, left, top, side, gray_background)

    # Segmentation: CLAHE, Otsu on the enhanced image, opening, the largest component.
    enhanced = _clahe(config).apply(gray)
    mask = otsu_mask(enhanced, dark_background)
    mask = open_mask(mask, config.opening_kernel)
    # 16-bit labels halve the memory traffic. After an opening of 3 pixels or more, a window
    # contains far fewer than 65,535 components.
    label_type = cv2.CV_16U if config.opening_kernel >= 3 and side <= 2048 else cv2.CV_32S
    mask, window_bbox = largest_component(mask, min_area=config.min_cell_fraction * side * side, label_type=label_type)
    bbox = (window_bbox[0] + left, window_bbox[1] + top, window_bbox[2], window_bbox[3])

    # Crop and output: the crop keeps the cell undistorted, padding makes it square.
    background = _background_color(image, dark_background)
    if config.crop == "bbox":
        crop = crop_bbox(image, bbox, config.margin, background)
    else:
        crop = crop_window(image, bbox, config.window, background)
    interpolation = cv2.INTER_AREA if crop.shape[0] > config.output_size else cv2.INTER_LINEAR
    output = cv2.resize(crop, (config.output_size, config.output_size), interpolation=interpolation)
    if config.enhance_output:
        # At the output size, so the CLAHE tiles cover the same share of every cell.
        output = enhance_color(output, config)

    return PreprocessResult(image, gray, enhanced, mask, crop, output, bbox, dark_background, (left, top))


def is_dark_background(gray: np.ndarray) -> bool:
    """Return whether the background is darker than the cell, judged from the image border.

    C-NMC cells lie on black; smears and most other data sets have a bright background.
    """
    # The mean, not the median, is the reference: on a large background the median of the
    # whole image is the background value itself.
    return float(np.median(_border(gray))) < float(np.mean(gray))


def otsu_mask(enhanced: np.ndarray, dark_background: bool) -> np.ndarray:
    """Threshold with Otsu's method so that the cell is 255 whatever the background's polarity."""
    mode = cv2.THRESH_BINARY if dark_background else cv2.THRESH_BINARY_INV
    _, mask = cv2.threshold(enhanced, 0, 255, mode | cv2.THRESH_OTSU)
    return mask


def open_mask(mask: np.ndarray, kernel_size: int) -> np.ndarray:
    """Remove specks smaller than the kernel with a morphological opening."""
    if kernel_size <= 1:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)


def largest_component(
    mask: np.ndarray, min_area: float, label_type: int = cv2.CV_32S
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Keep the largest 8-connected component; return it as a mask and its bounding box.

    Raises:
        BlankImageError: no component reaches ``min_area`` pixels.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=label_type)
    if count <= 1:
        raise BlankImageError("no cell found: the mask is empty after thresholding")
    areas = stats[1:, cv2.CC_STAT_AREA]
    index = int(np.argmax(areas)) + 1
    if stats[index, cv2.CC_STAT_AREA] < min_area:
        raise BlankImageError(
            f"no cell found: the largest component has {stats[index, cv2.CC_STAT_AREA]} pixels, "
            f"fewer than the minimum of {int(min_area)}"
        )
    x, y, width, height = (int(v) for v in stats[index, :4])
    return cv2.compare(labels, index, cv2.CMP_EQ), (x, y, width, height)


def crop_bbox(
    image: np.ndarray, bbox: tuple[int, int, int, int], margin: float, background: tuple[int, int, int]
) -> np.ndarray:
    """Crop a square around the bounding box with a margin, padding where it leaves the image."""
    x, y, width, height = bbox
    side = int(round(max(width, height) * (1.0 + 2.0 * margin)))
    left, top = _square_origin(x + width / 2.0, y + height / 2.0, side)
    return _crop_square(image, left, top, side, background)


def crop_window(
    image: np.ndarray, bbox: tuple[int, int, int, int], window: int, background: tuple[int, int, int]
) -> np.ndarray:
    """Crop a fixed square window centred on the cell, which keeps the cell's size in pixels.

    A cell larger than the window is cropped at its bounding box instead, and then scaled
    down like every other crop; this is rare at the C-NMC magnification.
    """
    x, y, width, height = bbox
    side = max(window, width, height)
    left, top = _square_origin(x + width / 2.0, y + height / 2.0, side)
    return _crop_square(image, left, top, side, background)


def enhance_color(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Apply CLAHE to the lightness channel in Lab space, which keeps the stain's hue."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = _clahe(config).apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _segmentation_origin(full_gray: np.ndarray, dark_background: bool, side: int) -> tuple[int, int]:
    """Return the top-left corner of a ``side`` square centred on the centroid of the plain Otsu mask.

    The centroid moves exactly with the cell when the canvas grows, and costs a fraction of a
    connected-component pass.
    """
    moments = cv2.moments(otsu_mask(full_gray, dark_background), binaryImage=True)
    if moments["m00"] == 0:
        raise BlankImageError("no cell found: the mask is empty after thresholding")
    return _square_origin(moments["m10"] / moments["m00"], moments["m01"] / moments["m00"], side)


def _square_origin(center_x: float, center_y: float, side: int) -> tuple[int, int]:
    # floor(x + 0.5) rounds halves the same way at every offset, unlike round(), so a cell
    # shifted on a larger canvas gives the same crop.
    return math.floor(center_x - side / 2.0 + 0.5), math.floor(center_y - side / 2.0 + 0.5)


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0, :], image[-1, :], image[:, 0], image[:, -1]])


def _crop_square(
    image: np.ndarray, left: int, top: int, side: int, background: int | tuple[int, int, int]
) -> np.ndarray:
    """Cut the square at (left, top) with the given side, padding with ``background`` outside the image."""
    height, width = image.shape[:2]
    pad_left, pad_top = max(0, -left), max(0, -top)
    pad_right, pad_bottom = max(0, left + side - width), max(0, top + side - height)
    crop = image[max(0, top) : min(height, top + side), max(0, left) : min(width, left + side)]
    if pad_left or pad_top or pad_right or pad_bottom:
        crop = cv2.copyMakeBorder(
            crop, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_CONSTANT, value=background
        )
    return np.ascontiguousarray(crop)


def _background_color(image: np.ndarray, dark_background: bool) -> tuple[int, int, int]:
    if dark_background:
        return (0, 0, 0)
    return tuple(int(v) for v in np.median(_border(image), axis=0))


def _clahe(config: PreprocessConfig) -> cv2.CLAHE:
    grid = (config.clahe_tile_grid, config.clahe_tile_grid)
    return cv2.createCLAHE(clipLimit=config.clahe_clip_limit, tileGridSize=grid)
