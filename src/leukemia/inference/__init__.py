"""Loading trained checkpoints and predicting on new cell images."""

from leukemia.inference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from leukemia.inference.predictor import Predictor

__all__ = ["CheckpointError", "Predictor", "load_checkpoint", "save_checkpoint"]
