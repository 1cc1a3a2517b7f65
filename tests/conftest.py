"""Fixtures shared by the test suite: data folders and a writer for generated images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).parents[1]
SAMPLE_DIR = REPO_ROOT / "examples" / "cnmc-sample"
# The real C-NMC data lives in a folder next to the repository, not inside it.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def _shared_path(name: str) -> Path:
    path = SHARED_DATA_DIR / name
    if not path.exists():
        pytest.skip(f"real C-NMC data not found at {path}")
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 48-cell JPEG sample in the repository, in the Kaggle release layout."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_images(sample_dir: Path) -> list[Path]:
    """Every image of the repository sample, sorted by path."""
    return sorted(sample_dir.rglob("*.jpg"))


@pytest.fixture(scope="session")
def cnmc_subset() -> Path:
    """392 real cells with mixed encodings (BMP, PNG, JPEG) in the Kaggle release layout."""
    return _shared_path("cnmc-subset")


@pytest.fixture(scope="session")
def cnmc_subset_jpeg() -> Path:
    """The same 392 cells, every one stored as JPEG."""
    return _shared_path("cnmc-subset-jpeg")


@pytest.fixture(scope="session")
def release_listing() -> Path:
    """Tab-separated list (path, sha256, bytes) of every file of the Kaggle release."""
    return _shared_path("cnmc-release-listing.tsv")


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write an RGB, RGBA or grayscale array (8 or 16 bits) to ``path``, in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(path.suffix, image)
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode {path}")
    path.write_bytes(encoded.tobytes())
    return path


@pytest.fixture
def image_writer() -> Callable[[Path, np.ndarray], Path]:
    """The ``write_image`` helper, for tests that generate image files."""
    return write_image
