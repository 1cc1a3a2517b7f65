"""Random scale and colour (stain) jitter for training cells, on top of the 8 dihedral views.

The jitter is kept small on purpose: a cell's size and the stain's hue carry diagnostic
information (blasts are larger than normal lymphocytes), so strong jitter would blur the
very cues the classifier needs. It changes pixels, so it applies only where the backbone
runs on the images themselves: the fine-tuning stage and ``live_backbone`` training. Cached
features of the frozen stage are computed from the unjittered cells.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

# The hue shift is this fraction of the colour jitter strength: hue is a cyclic channel in
# which a small shift already turns the purple of Giemsa-stained nuclei blue or red.
HUE_SHARE = 0.2


def build_augmentation(scale_jitter: float, color_jitter: float) -> "CellAugmentation | None":
    """Return a function that jitters an (S, S, 3) uint8 RGB image, or None when both strengths are 0.

    Args:
        scale_jitter: largest relative change of the cell's size; 0.1 zooms by a factor drawn
            from [0.9, 1.1] around the image centre, filling uncovered corners with black
            like the background of a preprocessed cell.
        color_jitter: largest relative change of brightness, contrast and saturation; the hue
            moves by up to ``HUE_SHARE`` times this (in turns of the colour wheel).

    The returned function keeps the image's shape, dtype (uint8) and value range (0-255). It
    draws from torch's global random state, which Lightning seeds.

    Raises:
        ValueError: a strength is negative or too large to be a small jitter.
    """
    if not 0 <= scale_jitter < 0.5:
        raise ValueError(f"invalid scale jitter {scale_jitter}; use a value from 0 (off) up to below 0.5")
    if not 0 <= color_jitter < 1:
        raise ValueError(f"invalid colour jitter {color_jitter}; use a value from 0 (off) up to below 1")
    steps = []
    if scale_jitter > 0:
        steps.append(v2.RandomAffine(degrees=0, scale=(1 - scale_jitter, 1 + scale_jitter),
                                     interpolation=v2.InterpolationMode.BILINEAR, fill=0))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                    hue=min(0.5, HUE_SHARE * color_jitter)))
    if not steps:
        return None
    return CellAugmentation(v2.Compose(steps))


class CellAugmentation:
    """Applies a torchvision transform to (S, S, 3) uint8 images; picklable for DataLoader workers."""

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, image: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return self.transform(tensor).permute(1, 2, 0).contiguous().numpy()
