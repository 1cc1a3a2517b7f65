"""The 8 views of the dihedral group (rotations by 90 degrees, with and without a flip).

A cell on a slide has no orientation, so these views are label-preserving augmentations that
cost no interpolation: every view is an exact permutation of the pixels.
"""

from __future__ import annotations

import numpy as np

N_DIHEDRAL_VIEWS = 8


def dihedral_view(image: np.ndarray, view: int) -> np.ndarray:
    """Return view ``view`` (0-7) of an (H, W, C) image: rotate by 90 * (view % 4) degrees, flip if view >= 4.

    View 0 is the image itself. The result is contiguous and has the input's shape (for a
    square image) and dtype.
    """
    if not 0 <= view < N_DIHEDRAL_VIEWS:
        raise ValueError(f"invalid view {view}; views are numbered 0 to {N_DIHEDRAL_VIEWS - 1}")
    rotated = np.rot90(image, k=view % 4, axes=(0, 1))
    if view >= 4:
        rotated = rotated[:, ::-1]
    return np.ascontiguousarray(rotated)
