"""Predicting the probability of ALL for cell images with a model file or its ONNX export."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leukemia.data.images import ImageReadError, read_image
from leukemia.inference.checkpoint import load_checkpoint
from leukemia.inference.engine import Engine, Precision
from leukemia.preprocessing.cell import BlankImageError, PreprocessConfig, preprocess_cell
from leukemia.preprocessing.views import N_DIHEDRAL_VIEWS, dihedral_view
from leukemia.training.datasets import to_batch_tensor

logger = logging.getLogger(__name__)


@dataclass
class CellPrediction:
    """The result for one file: a probability, or the reason it could not be classified."""

    path: Path
    probability: float | None = None
    prediction: int | None = None
    error: str | None = None


class Predictor:
    """A model loaded with the preprocessing settings and threshold it was trained with.

    ``checkpoint`` is a ``model.pt`` (or its run directory), run with PyTorch on the engine's
    device and precision, or an ``.onnx`` file from ``leukemia export``, run with ONNX Runtime.
    """

    def __init__(self, checkpoint: Path | str, *, device: str = "auto", precision: Precision = "auto") -> None:
        checkpoint = Path(checkpoint)
        if checkpoint.suffix.lower() == ".onnx":
            from leukemia.inference.export import OnnxRunner

            self.onnx = OnnxRunner(checkpoint)
            self.model = None
            self.metadata = dict(self.onnx.metadata)
            self.metadata["preprocess"] = PreprocessConfig.from_dict(self.metadata["preprocess"])
            self.runtime = "onnxruntime"
        else:
            self.onnx = None
            model, self.metadata = load_checkpoint(checkpoint)
            self.engine = Engine.create(device, precision)
            self.model = self.engine.prepare(model)
            self.runtime = f"torch {self.engine.device.type} {self.engine.precision}"
        self.preprocess: PreprocessConfig = self.metadata["preprocess"]
        self.threshold = float(self.metadata["threshold"])
        self.tta = bool(self.metadata.get("train_config", {}).get("tta", False))
        self.mean = tuple(self.metadata["backbone"]["mean"])
        self.std = tuple(self.metadata["backbone"]["std"])

    @torch.no_grad()
    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Return the probability of ALL for preprocessed (S, S, 3) uint8 RGB cells.

        With test-time augmentation (recorded in the model file) the probability is the mean over
        the 8 dihedral views of each cell.
        """
        n_views = N_DIHEDRAL_VIEWS if self.tta else 1
        batch = torch.stack([
            to_batch_tensor(dihedral_view(image, view), self.mean, self.std)
            for image in images for view in range(n_views)
        ])
        if self.onnx is not None:
            probs = 1.0 / (1.0 + np.exp(-self.onnx.logits(batch.numpy())))
        else:
            with self.engine.autocast():
                features = self.model.forward_features(self.engine.prepare_batch(batch))
            # The head runs in float32, as in training, whatever the backbone's precision.
            probs = torch.sigmoid(self.model.forward_head(features.float())).cpu().numpy()
        return probs.reshape(len(images), n_views).mean(axis=1)

    def predict_files(self, paths: list[Path], *, batch_size: int = 32) -> list[CellPrediction]:
        """Preprocess and classify files; unreadable or blank files get an error, not an exception."""
        results = [CellPrediction(Path(path)) for path in paths]
        pending: list[tuple[CellPrediction, np.ndarray]] = []
        for result in results:
            try:
                pending.append((result, preprocess_cell(read_image(result.path), self.preprocess).output))
            except ImageReadError as error:
                result.error = error.reason
            except BlankImageError as error:
                result.error = f"blank image: {error}"
            if len(pending) == batch_size:
                self._classify(pending)
                pending = []
        if pending:
            self._classify(pending)
        return results

    def explain_files(self, paths: list[Path], *, batch_size: int = 8) -> Iterator[np.ndarray]:
        """Return an iterator over the Grad-CAM overlays of the ALL logit on each file's cell, in order.

        Each overlay is (S, S, 3) uint8 RGB with S the preprocessing output size. Pass the files
        that ``predict_files`` classified; the model is not changed.

        Raises:
            ValueError: at once, when the predictor runs an ONNX file, which has no gradients.
            ImageReadError: while iterating, when a file cannot be read.
            BlankImageError: while iterating, when a file holds no cell.
        """
        if self.model is None:
            raise ValueError("Grad-CAM needs the PyTorch model file (model.pt), not an ONNX export; "
                             "pass the run directory or its model.pt")
        return self._explain(paths, batch_size)

    def _explain(self, paths: list[Path], batch_size: int) -> Iterator[np.ndarray]:
        # Imported here so that predicting without explanations does not load pytorch_grad_cam.
        from leukemia.explain.gradcam import gradcam_overlays

        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            cells = [preprocess_cell(read_image(path), self.preprocess).output for path in chunk]
            yield from gradcam_overlays(self.model, cells, batch_size=batch_size)

    def _classify(self, pending: list[tuple[CellPrediction, np.ndarray]]) -> None:
        probs = self.predict_images([image for _, image in pending])
        for (result, _), prob in zip(pending, probs):
            result.probability = float(prob)
            result.prediction = int(prob >= self.threshold)
