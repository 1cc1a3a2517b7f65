"""Finding labeled cell images on disk, reading them, and splitting them by subject."""

from leukemia.data.discovery import DataSet, Sample, discover, parse_subject
from leukemia.data.images import ImageReadError, read_image
from leukemia.data.splits import Split, check_subject_disjoint, make_split

__all__ = [
    "DataSet",
    "ImageReadError",
    "Sample",
    "Split",
    "check_subject_disjoint",
    "discover",
    "make_split",
    "parse_subject",
    "read_image",
]
