"""The LightningModule that trains the classifier's head on top of a frozen backbone."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from leukemia.evaluation.metrics import compute_metrics
from leukemia.inference.engine import Engine
from leukemia.models.backbones import parameter_stages
from leukemia.models.classifier import CellClassifier

# Validation metrics logged every epoch; any of them can be named to choose the best checkpoint.
MONITOR_MODES = {
    "val_loss": "min",
    "val_accuracy": "max",
    "val_balanced_accuracy": "max",
    "val_f1_weighted": "max",
    "val_roc_auc": "max",
}


class FrozenBackboneModule(L.LightningModule):
    """Trains ``model.head`` with weighted binary cross-entropy; the backbone stays frozen.

    Batches contain cached backbone features by default. With ``live_backbone=True`` they
    contain images, and the backbone runs on them at every step, as a notebook would. Both give the
    same model for the same views. The backbone stays inside the module either way, so that
    every checkpoint holds the whole classifier.

    With a ``seed``, the random state (dropout) is set from the seed and the step before every
    training step, so a run resumed from a checkpoint trains exactly like one never stopped:
    Lightning's checkpoints do not hold the random state, and on resume the DataLoader draws
    its seed from it at another moment than in an uninterrupted run.
    """

    def __init__(
        self,
        model: CellClassifier,
        *,
        learning_rate: float,
        pos_weight: float,
        live_backbone: bool = False,
        engine: Engine | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.seed = seed
        self.model.freeze_backbone()
        self.learning_rate = learning_rate
        self.live_backbone = live_backbone
        self.engine = engine or Engine.create("cpu", "float32")
        if live_backbone and self.engine.channels_last:
            # Batches arrive in channels-last, so the weights must match or every convolution
            # converts them back; Lightning moves the module to its device itself.
            self.model.backbone.to(memory_format=torch.channels_last)
        self.loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        self._val_logits: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        # Sums over the epoch's training batches: loss x cells, correct cells, cells.
        self._train_sums = torch.zeros(3, dtype=torch.float64)

    def head_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return (B,) logits for a batch of features, or of images in live mode."""
        if self.live_backbone:
            with torch.no_grad(), self.engine.autocast():
                features = self.model.backbone(self.engine.prepare_batch(inputs)).float()
        else:
            features = inputs
        return self.model.forward_head(features)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        inputs, targets = batch
        logits = self.head_logits(inputs)
        loss = self.loss(logits, targets)
        correct = ((logits > 0).float() == targets).sum()
        self._train_sums += torch.stack([loss.detach() * len(targets), correct, torch.tensor(len(targets))]).double().cpu()
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        inputs, targets = batch
        self._val_logits.append(self.head_logits(inputs).detach().cpu())
        self._val_targets.append(targets.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics, and the training metrics of the epoch that just ended.

        Validation ends each training epoch, and Lightning writes the metrics logged here
        before the checkpoint of the epoch, but the metrics of the training epoch's end only
        after it. Logging both here means a run killed between the two cannot resume from a
        checkpoint whose epoch is missing from the history.
        """
        self._log_training_epoch()
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
                "val_balanced_accuracy": metrics["balanced_accuracy"] or 0.0,
                "val_f1_weighted": metrics["f1_weighted"],
                # Undefined when validation contains one class, and NaN would break checkpoint comparison.
                "val_roc_auc": roc_auc if roc_auc is not None and np.isfinite(roc_auc) else 0.0,
            },
            prog_bar=True,
        )

    def _log_training_epoch(self) -> None:
        if self.trainer.sanity_checking or not self._train_sums[2]:
            return
        loss_sum, correct, count = self._train_sums.tolist()
        self._train_sums.zero_()
        # sync_dist averages over DDP ranks; each trains on an equal share of the cells.
        self.log("train_loss", loss_sum / count, prog_bar=True, sync_dist=True)
        self.log("train_accuracy", correct / count, sync_dist=True)
        self.log_epoch_extras()

    def log_epoch_extras(self) -> None:
        """Log further values of the training epoch next to its metrics; none here."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.head.parameters(), lr=self.learning_rate)

    def on_train_epoch_start(self) -> None:
        # Lightning keeps each submodule's mode as it found it at the start of fit, and feature
        # extraction leaves the whole model in eval mode. The head must train with dropout on,
        # while the frozen backbone keeps its batch-norm statistics fixed.
        self.model.head.train()
        self.model.backbone.eval()

    def on_train_batch_start(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        if self.seed is not None:
            # The rank term gives DDP ranks different dropout masks; it is 0 in one process.
            torch.manual_seed(self.seed * 1_000_003 + self.global_step + 7_919 * self.global_rank)


class FineTuneModule(FrozenBackboneModule):
    """Trains the head and the last ``stages`` stages of the backbone on images, after the frozen stage.

    The optimiser is AdamW (decoupled weight decay) at one learning rate for every trained
    parameter, which rises linearly over ``warmup_steps`` and then follows a cosine decay
    to zero at ``total_steps``. A small learning rate and the warm-up keep the first updates
    from wiping out the ImageNet features while the head is still adapting to them.

    With ``freeze_batch_norm`` (the default), every batch-norm layer keeps its ImageNet
    running statistics and affine parameters: batches of a few dozen cells of one stain
    estimate them poorly. Without it, the batch-norm layers of the trained stages update both.
    Stages that are not trained stay in eval mode either way.
    """

    def __init__(
        self,
        model: CellClassifier,
        *,
        learning_rate: float,
        pos_weight: float,
        weight_decay: float,
        warmup_steps: int,
        total_steps: int,
        stages: int | None = None,
        freeze_batch_norm: bool = True,
        engine: Engine | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, learning_rate=learning_rate, pos_weight=pos_weight, live_backbone=True,
                         engine=engine, seed=seed)
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.freeze_batch_norm = freeze_batch_norm
        self.trained_modules = _unfreeze_last_stages(model.backbone, stages, freeze_batch_norm)

    def head_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        # Lightning's precision plugin supplies autocast, and gradients flow into the trained stages.
        features = self.model.backbone(self.engine.prepare_batch(inputs))
        return self.model.forward_head(features).float()

    def configure_optimizers(self):
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.total_steps - warmup)),
            ],
            milestones=[warmup],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        self.model.eval()
        self.model.head.train()
        for module in self.trained_modules:
            module.train()

    def log_epoch_extras(self) -> None:
        """Log the learning rate reached at the end of the epoch."""
        self.log("learning_rate", self.optimizers().param_groups[0]["lr"])


def _unfreeze_last_stages(backbone: nn.Module, stages: int | None, freeze_batch_norm: bool) -> list[nn.Module]:
    """Let gradients into the last ``stages`` stages (all with None); return the modules that train.

    Returns the trained stages' leaf modules other than batch norm when ``freeze_batch_norm``,
    so that putting them in train mode leaves the batch-norm statistics alone.
    """
    if stages is None:
        trained = {name for name, _ in backbone.named_parameters()}
    else:
        numbers = parameter_stages(backbone)
        first = max(numbers.values()) + 1 - stages
        trained = {name for name, number in numbers.items() if number >= first}
    modules = []
    for module_name, module in backbone.named_modules():
        own = [f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters(recurse=False)]
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if not own or not all(name in trained for name in own):
            continue
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(not (is_norm and freeze_batch_norm))
        if not (is_norm and freeze_batch_norm):
            modules.append(module)
    return modules
