"""Explanations of the classifier's decisions: Grad-CAM heat maps over preprocessed cells."""

from leukemia.explain.gradcam import (
    find_target_layer,
    gradcam_heatmaps,
    gradcam_overlays,
    overlay_file_names,
    overlay_heatmap,
    save_overlay,
)

__all__ = [
    "find_target_layer",
    "gradcam_heatmaps",
    "gradcam_overlays",
    "overlay_file_names",
    "overlay_heatmap",
    "save_overlay",
]
