"""Reading cell images from disk into RGB uint8 arrays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


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

    Raises:
        ImageReadError: the file is missing, empty, or not a decodable image.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error.strerror or error})") from error
    if data.size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes); replace it with a valid image")

    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(
            path, "not a decodable BMP, PNG, JPEG or TIFF image (corrupt, truncated or another format)"
        )
    return _to_rgb_uint8(image, path)


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
