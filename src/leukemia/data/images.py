"""Reading cell images from disk into RGB uint8 arrays."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

# A C-NMC cell image is 450 pixels square. Below the minimum, an image is a thumbnail without
# the cell's detail. Above the maximum, it is no single-cell image, and decoding it could
# exhaust memory.
MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 10_000


class ImageReadError(ValueError):
    """An image file that cannot be decoded into a cell image."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: Path) -> bool:
    """Return whether the file name has a supported image extension, in any case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: Path | str) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    Grayscale images are repeated over three channels, an alpha channel is dropped, and
    16-bit images are scaled to 8 bits. The image is decoded from the file's bytes, so
    paths with non-ASCII characters work on every platform.

    The size is read from the file header before any pixel is decoded, so a huge image is
    rejected without allocating its pixels.

    Raises:
        ImageReadError: the file is missing, empty, or not a decodable image, or a side is
            under 32 or over 10,000 pixels.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error.strerror or error})") from error
    if data.size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes); replace it with a valid image")

    header_size = _header_size(data, path)
    if header_size is not None:
        _check_size(*header_size, path)

    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(
            path, "not a decodable BMP, PNG, JPEG or TIFF image (corrupt, truncated or another format)"
        )
    # The header check misses formats Pillow cannot parse; the decoded size is final.
    _check_size(image.shape[1], image.shape[0], path)
    return _to_rgb_uint8(image, path)


def _header_size(data: np.ndarray, path: Path) -> tuple[int, int] | None:
    """Return (width, height) from the file header, or None when Pillow cannot parse it.

    ``Image.open`` reads the header only; the pixels are decoded later, by OpenCV.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                return header.size
    except Image.DecompressionBombError as error:
        # Pillow raises this above twice Image.MAX_IMAGE_PIXELS (178,956,970 pixels by
        # default), which no image within the side limit (100 million pixels) reaches.
        raise ImageReadError(path, f"the image is {_too_large_advice()} ({error})") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _check_size(width: int, height: int, path: Path) -> None:
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ImageReadError(path, f"the image is {width}x{height} pixels, {_too_large_advice()}")
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise ImageReadError(
            path,
            f"the image is {width}x{height} pixels, below the minimum of {MIN_IMAGE_SIDE} pixels per side; "
            "use the full-size cell image, not a thumbnail",
        )


def _too_large_advice() -> str:
    return (
        f"larger than {MAX_IMAGE_SIDE:,} pixels per side; crop or downscale it to the single cell "
        "(a C-NMC cell image is 450 pixels square)"
    )


def _to_rgb_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(path, f"unsupported pixel type {image.dtype}; save the image with 8 or 16 bits")

    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageReadError(path, f"unsupported number of channels ({channels}); expected 1, 3 or 4")
