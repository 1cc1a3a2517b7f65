"""Predicting the probability of ALL for cell images with a trained model file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leukemia.data.images import ImageReadError, read_image
from leukemia.inference.checkpoint import load_checkpoint
from leukemia.preprocessing.cell import BlankImageError, preprocess_cell
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
    """A model file loaded with the preprocessing settings and threshold it was trained with."""

    def __init__(self, checkpoint: Path | str, *, device: str = "cpu") -> None:
        self.model, self.metadata = load_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.preprocess = self.metadata["preprocess"]
        self.threshold = float(self.metadata["threshold"])

    @torch.no_grad()
    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Return the probability of ALL for preprocessed (S, S, 3) uint8 RGB cells."""
        spec = self.model.spec
        batch = torch.stack([to_batch_tensor(image, spec.mean, spec.std) for image in images]).to(self.device)
        return torch.sigmoid(self.model(batch)).float().cpu().numpy()

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

    def _classify(self, pending: list[tuple[CellPrediction, np.ndarray]]) -> None:
        probs = self.predict_images([image for _, image in pending])
        for (result, _), prob in zip(pending, probs):
            result.probability = float(prob)
            result.prediction = int(prob >= self.threshold)
