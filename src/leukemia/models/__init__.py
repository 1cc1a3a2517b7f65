"""Backbones with ImageNet weights and the cell classifier built on them."""

from leukemia.models.backbones import BackboneSpec, WeightsUnavailableError, create_backbone, list_backbones
from leukemia.models.classifier import CellClassifier

__all__ = ["BackboneSpec", "CellClassifier", "WeightsUnavailableError", "create_backbone", "list_backbones"]
