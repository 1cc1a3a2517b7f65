"""The cell classifier: a backbone, then a small head that outputs one logit for ALL."""

from __future__ import annotations

import torch
from torch import nn

from leukemia.models.backbones import BackboneSpec


class CellClassifier(nn.Module):
    """Backbone features, then Dense 256 + ReLU, Dropout, and one logit (ALL is positive).

    ``forward_features`` and ``forward_head`` are separate so that the head can be trained on
    cached features of a frozen backbone.
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.head = nn.Sequential(
            nn.Linear(spec.feature_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def freeze_backbone(self) -> None:
        """Stop gradients into the backbone and keep its batch-norm statistics fixed."""
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.backbone.eval()

    def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Map a (B, 3, S, S) normalised batch to (B, D) pooled features."""
        return self.backbone(batch)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Map (B, D) features to (B,) logits."""
        return self.head(features).squeeze(-1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(batch)
        return self.forward_head(features)
