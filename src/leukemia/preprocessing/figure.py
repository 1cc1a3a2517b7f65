"""A figure of the preprocessing steps of one image, side by side."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leukemia.preprocessing.cell import PreprocessResult  # noqa: E402


def draw_steps(result: PreprocessResult, path: Path, title: str = "") -> None:
    """Save original, gray, CLAHE, mask (with the cell's box), crop and resized output as one PNG."""
    x, y, width, height = result.bbox
    x, y = x - result.window_origin[0], y - result.window_origin[1]
    mask = cv2.cvtColor(result.mask, cv2.COLOR_GRAY2RGB)
    cv2.rectangle(mask, (x, y), (x + width - 1, y + height - 1), (255, 0, 0), 2)
    background = "dark" if result.dark_background else "bright"
    panels = [
        ("original", result.original, None),
        ("gray", result.gray, "gray"),
        ("CLAHE", result.enhanced, "gray"),
        (f"Otsu mask ({background} background)", mask, None),
        (f"crop {result.crop.shape[1]}x{result.crop.shape[0]}", result.crop, None),
        (f"resized {result.output.shape[1]}x{result.output.shape[0]}", result.output, None),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for axis, (name, image, cmap) in zip(axes, panels):
        axis.imshow(image, cmap=cmap, vmin=0, vmax=255)
        axis.set_title(name, fontsize=10)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
