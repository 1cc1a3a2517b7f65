"""Grad-CAM heat maps of the ALL logit over preprocessed cells, drawn with ``pytorch_grad_cam``.

The classifier outputs one logit, positive for ALL. Grad-CAM weights the channels of the
backbone's last spatial feature map by the gradient of that logit and keeps the positive part.
A heat map therefore marks the regions that raise the ALL logit (``category=1``) or, with the
logit's sign flipped, the regions that raise the probability of HEM (``category=0``).

The backbone of a trained model is frozen (its parameters do not require gradients), and
inference may run it in bfloat16, channels-last, or on a GPU. Heat maps are computed in float32
on the CPU, with gradients taken with respect to the input only. The model's ``requires_grad``
flags, ``.grad`` tensors and train/eval modes are restored afterwards. A model with any tensor
off the CPU or outside float32 is explained through a CPU copy, so the caller's model is not
changed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from torch import nn

from leukemia.models.classifier import CellClassifier
from leukemia.training.datasets import to_batch_tensor

logger = logging.getLogger(__name__)

ALL_CATEGORY = 1


def find_target_layer(model: CellClassifier) -> nn.Module:
    """Return the backbone module whose output Grad-CAM explains: the last spatial feature map.

    ResNet50 uses its last bottleneck (``backbone.layer4[-1]``). Any other backbone (the timm
    EfficientNet-Lite0 and other timm models) is probed with one forward pass of a blank input.
    The target is the last module, called once, that outputs a (B, C, H, W) tensor with H and W
    above 1: the final feature map before global pooling (``bn2`` with its activation for timm
    EfficientNets). If the probe finds none, the last ``Conv2d`` is used.

    Raises:
        ValueError: the backbone has no spatial feature map and no ``Conv2d`` module.
    """
    backbone = model.backbone
    if model.spec.name == "resnet50":
        return backbone.layer4[-1]

    probed = _probe_last_spatial_module(backbone, model.spec.input_size)
    if probed is not None:
        return probed
    convolutions = [module for module in backbone.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise ValueError(
            f"backbone {model.spec.name!r} has no spatial feature map (no Conv2d module), so Grad-CAM "
            "cannot explain it; use a convolutional backbone such as resnet50 or efficientnet_lite0"
        )
    return convolutions[-1]


def gradcam_heatmaps(
    model: CellClassifier,
    images: list[np.ndarray],
    *,
    category: int = ALL_CATEGORY,
    batch_size: int = 8,
) -> np.ndarray:
    """Compute one Grad-CAM heat map per preprocessed cell.

    Args:
        model: a classifier, e.g. from ``inference.checkpoint.load_checkpoint``; left unchanged.
        images: preprocessed cells, each (S, S, 3) uint8 RGB (``preprocess_cell(...).output``).
        category: 1 explains the ALL logit, 0 the negated logit (evidence for HEM).
        batch_size: cells per forward and backward pass.

    Returns:
        (N, S, S) float32 heat maps in [0, 1]; each is scaled to its own maximum, and is all
        zeros where no region raises the chosen logit.

    Raises:
        ValueError: ``images`` is empty, a cell is not (S, S, 3) uint8, or ``category`` is not 0 or 1.
    """
    _check_images(images)
    if category not in (0, 1):
        raise ValueError(f"invalid category {category!r}; use 1 for ALL or 0 for HEM")

    # The CAM runs on a float32 CPU model, which is the caller's own model when it already is one.
    working = _cpu_float32(model)
    target_layer = find_target_layer(working)

    heatmaps = []
    with _gradients_for_input_only(working):
        cam = GradCAM(model=working, target_layers=[target_layer])
        try:
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                batch = torch.stack([to_batch_tensor(image, working.spec.mean, working.spec.std) for image in chunk])
                batch.requires_grad_(True)
                targets = [BinaryClassifierOutputTarget(category) for _ in chunk]
                heatmaps.append(cam(input_tensor=batch, targets=targets))
        finally:
            cam.activations_and_grads.release()
    return np.concatenate(heatmaps).astype(np.float32)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, *, image_weight: float = 0.5) -> np.ndarray:
    """Blend a heat map (JET colours, red is high) over a cell.

    Args:
        image: (S, S, 3) uint8 RGB cell.
        heatmap: (S, S) float heat map in [0, 1].
        image_weight: share of the cell in the blend, in [0, 1].

    Returns:
        (S, S, 3) uint8 RGB overlay.
    """
    if heatmap.shape != image.shape[:2]:
        raise ValueError(f"heat map shape {heatmap.shape} does not match the cell's {image.shape[:2]}")
    return show_cam_on_image(image.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=image_weight)


def gradcam_overlays(
    model: CellClassifier,
    images: list[np.ndarray],
    *,
    category: int = ALL_CATEGORY,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Return the Grad-CAM overlay of the ALL logit (see ``gradcam_heatmaps``) on each cell.

    Returns:
        One (S, S, 3) uint8 RGB overlay per cell, in input order.
    """
    heatmaps = gradcam_heatmaps(model, images, category=category, batch_size=batch_size)
    return [overlay_heatmap(image, heatmap) for image, heatmap in zip(images, heatmaps)]


def save_overlay(path: Path, overlay: np.ndarray) -> Path:
    """Write an (S, S, 3) uint8 RGB overlay as PNG, creating the folder; return the path.

    Raises:
        OSError: OpenCV could not encode or the file could not be written.
    """
    path = Path(path)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"OpenCV failed to encode the overlay for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
    return path


def overlay_file_names(paths: list[Path]) -> list[str]:
    """Return one PNG name per input file: its stem, with ``_2``, ``_3`` ... on repeats.

    Names are compared without case, so they stay distinct on case-insensitive file systems.
    """
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "cell"
        name, counter = f"{stem}.png", 1
        while name.lower() in used:
            counter += 1
            name = f"{stem}_{counter}.png"
        used.add(name.lower())
        names.append(name)
    return names


def _check_images(images: list[np.ndarray]) -> None:
    if not images:
        raise ValueError("no cells to explain; pass at least one preprocessed (S, S, 3) uint8 image")
    for index, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1] or image.dtype != np.uint8:
            raise ValueError(
                f"cell {index} has shape {image.shape} and dtype {image.dtype}; expected a square (S, S, 3) "
                "uint8 RGB image as preprocess_cell(...).output gives"
            )


def _cpu_float32(model: CellClassifier) -> CellClassifier:
    tensors = list(model.parameters()) + list(model.buffers())
    on_cpu = all(tensor.device.type == "cpu" for tensor in tensors)
    float32 = all(tensor.dtype == torch.float32 for tensor in tensors if tensor.is_floating_point())
    if on_cpu and float32:
        return model
    logger.debug("explaining a float32 CPU copy of the model")
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


@contextmanager
def _gradients_for_input_only(model: nn.Module) -> Iterator[None]:
    """Turn gradients on for the input only, in float32, and restore the model afterwards.

    With every parameter frozen, the backward pass computes no weight gradient; the gradient
    reaches the target layer through the input batch, which requires a gradient.
    ``GradCAM`` puts the model in eval mode and clears ``.grad``; both are put back.
    """
    parameters = list(model.parameters())
    flags = [parameter.requires_grad for parameter in parameters]
    grads = [parameter.grad for parameter in parameters]
    modes = [(module, module.training) for module in model.modules()]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            yield
    finally:
        for parameter, flag, grad in zip(parameters, flags, grads):
            parameter.requires_grad_(flag)
            parameter.grad = grad
        for module, training in modes:
            module.train(training)


def _probe_last_spatial_module(backbone: nn.Module, input_size: int) -> nn.Module | None:
    """Run a blank input through the backbone; return the last module with a spatial output."""
    calls: dict[nn.Module, int] = {}
    spatial: list[nn.Module] = []

    def record(module: nn.Module, _inputs: tuple, output: object) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            spatial.append(module)

    handles = [module.register_forward_hook(record) for module in backbone.modules() if module is not backbone]
    modes = [(module, module.training) for module in backbone.modules()]
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, 3, input_size, input_size))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.train(training)
    # A module called more than once (a shared activation) would give Grad-CAM several maps.
    candidates = [module for module in spatial if calls[module] == 1]
    return candidates[-1] if candidates else None
