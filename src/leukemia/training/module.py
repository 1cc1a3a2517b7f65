"""The LightningModule that trains the classifier's head on cached backbone features."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from leukemia.evaluation.metrics import compute_metrics
from leukemia.models.classifier import CellClassifier

# Validation metrics logged every epoch; any of them can be named to choose the best checkpoint.
MONITOR_MODES = {
    "val_loss": "min",
    "val_accuracy": "max",
    "val_balanced_accuracy": "max",
    "val_f1_weighted": "max",
    "val_roc_auc": "max",
}


class HeadOnFeatures(L.LightningModule):
    """Trains ``model.head`` on (features, target) batches with weighted binary cross-entropy.

    The backbone stays inside the module, frozen, so that every checkpoint holds the whole
    classifier and can predict on images directly.
    """

    def __init__(self, model: CellClassifier, *, learning_rate: float, pos_weight: float) -> None:
        super().__init__()
        self.model = model
        self.model.freeze_backbone()
        self.learning_rate = learning_rate
        self.loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        self._val_logits: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        features, targets = batch
        logits = self.model.forward_head(features)
        loss = self.loss(logits, targets)
        accuracy = ((logits > 0).float() == targets).float().mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets))
        self.log("train_accuracy", accuracy, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        features, targets = batch
        self._val_logits.append(self.model.forward_head(features).detach().cpu())
        self._val_targets.append(targets.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        logits = torch.cat(self._val_logits)
        targets = torch.cat(self._val_targets)
        self._val_logits.clear()
        self._val_targets.clear()

        metrics = compute_metrics(targets.numpy().astype(int), torch.sigmoid(logits).numpy(), threshold=0.5)
        roc_auc = metrics["roc_auc"]
        self.log_dict(
            {
                "val_loss": self.loss(logits, targets),
                "val_accuracy": metrics["accuracy"],
                "val_balanced_accuracy": metrics["balanced_accuracy"],
                "val_f1_weighted": metrics["f1_weighted"],
                # NaN when validation holds one class; NaN would break checkpoint comparison.
                "val_roc_auc": roc_auc if roc_auc is not None and np.isfinite(roc_auc) else 0.0,
            },
            prog_bar=True,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.head.parameters(), lr=self.learning_rate)

    def on_train_epoch_start(self) -> None:
        # Lightning keeps each submodule's mode as it found it at the start of fit, and feature
        # extraction leaves the whole model in eval mode; the head must train with dropout on,
        # while the frozen backbone keeps its batch-norm statistics fixed.
        self.model.head.train()
        self.model.backbone.eval()
