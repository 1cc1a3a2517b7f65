"""Cell segmentation and cropping (pure NumPy/OpenCV), with an on-disk cache."""

from leukemia.preprocessing.cache import PreprocessCache, preprocess_files
from leukemia.preprocessing.cell import (
    BlankImageError,
    PreprocessConfig,
    PreprocessResult,
    preprocess_cell,
)

__all__ = [
    "BlankImageError",
    "PreprocessCache",
    "PreprocessConfig",
    "PreprocessResult",
    "preprocess_cell",
    "preprocess_files",
]
