"""The main job: discover data, preprocess, split by subject, train, evaluate, write the report."""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from leukemia.data.discovery import DataSet, Sample, discover
from leukemia.data.splits import LEAKAGE_WARNING, Split, check_subject_disjoint, make_split
from leukemia.evaluation.report import Predictions, write_report
from leukemia.inference.checkpoint import save_checkpoint
from leukemia.inference.engine import Engine
from leukemia.models.backbones import BackboneSpec, create_backbone, weights_digest
from leukemia.models.classifier import CellClassifier
from leukemia.pipeline import PreparedCells, environment_record, prepare_cells, write_skipped
from leukemia.preprocessing.cache import PreprocessCache, default_cache_dir, write_atomically
from leukemia.training.config import TrainConfig
from leukemia.training.datasets import CachedCellDataset, FeatureDataset, ViewSampler
from leukemia.training.features import FeatureCache, compute_features, extract_features
from leukemia.training.module import MONITOR_MODES, FrozenBackboneModule

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and its test metrics."""

    run_dir: Path
    model_path: Path
    metrics: dict


def train(config: TrainConfig) -> TrainResult:
    """Run the whole job into ``config.out``; see the README for the files it writes.

    Raises:
        FileExistsError: the run directory already holds files.
        ValueError: the data set lacks a class, or cannot be split by subject.
    """
    run_dir = _create_run_dir(config.out)
    L.seed_everything(config.seed, workers=True)
    _write_json(run_dir / "config.json", config.to_dict())

    # Data: discovery, preprocessing into the cache, then the split.
    dataset = discover(config.data)
    logger.info("found %s: %s (layout: %s)", config.data, dataset.counts(), dataset.layout)
    cache = PreprocessCache(config.cache_dir or default_cache_dir(), config.preprocess)
    cells = prepare_cells(dataset.labeled, cache, workers=config.workers, progress=config.progress)
    write_skipped(run_dir / "skipped.csv", cells.skipped)
    split = make_split(
        cells.samples,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        image_level=config.image_level_split,
        seed=config.seed,
    )
    _check_split(split)
    split.write_csv(run_dir / "split.csv")
    _log_split(split)

    # Model and features: the frozen backbone runs once per cell and view, never per epoch.
    weights = None if config.weights == "none" else config.weights
    backbone, spec = create_backbone(config.backbone, weights=weights)
    model = CellClassifier(backbone, spec, hidden=config.hidden, dropout=config.dropout)
    model.freeze_backbone()
    engine = Engine.create(config.device, config.precision)
    logger.info("backbone %s on %s in %s", spec.name, engine.device, engine.precision)
    keys = _keys_by_split(split, cells)
    if config.live_backbone:
        inputs = None
    else:
        feature_cache = FeatureCache(cache.root, weights_digest(model.backbone) + cache.config.digest(), engine)
        inputs = {
            name: extract_features(model, cache, split_keys, feature_cache, engine,
                                   n_views=config.views if name == "train" else 1, batch_size=config.batch_size,
                                   num_workers=config.loader_workers, progress=config.progress)
            for name, split_keys in keys.items()
        }

    # Training: Lightning runs the loop, keeps the best and last checkpoints, stops early.
    module = FrozenBackboneModule(
        model, learning_rate=config.learning_rate, pos_weight=_pos_weight(config, split.train),
        live_backbone=config.live_backbone, engine=engine,
    )
    trainer, checkpoint_callback = _build_trainer(config, run_dir, engine)
    trainer.fit(module, *_loaders(config, split, keys, cache, spec, inputs, engine))
    _restore_best(module, checkpoint_callback)
    if inputs is None:
        # Evaluation below reads features; the live run computes them once now, view 0 only.
        inputs = {name: compute_features(model, cache, split_keys, engine, batch_size=config.batch_size,
                                         progress=config.progress)
                  for name, split_keys in keys.items() if name != "train"}

    # Evaluation and the self-contained model file.
    threshold = 0.5
    model_path = run_dir / "model.pt"
    save_checkpoint(
        model_path, model, preprocess=config.preprocess, threshold=threshold,
        threshold_rule="fixed at 0.5", train_config=config.to_dict(),
    )
    metrics = write_report(
        run_dir,
        _predict_features(model, split.test, inputs["test"][:, 0], threshold),
        validation=_predict_features(model, split.val, inputs["val"][:, 0], threshold),
        header_lines=() if split.subject_level else (LEAKAGE_WARNING,),
        extra=_run_record(config, dataset, split, cells, checkpoint_callback),
        history_csv=run_dir / "logs" / "metrics.csv",
    )
    return TrainResult(run_dir, model_path, metrics)


def _create_run_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"the run directory {path} already contains files; choose a new --out so runs never mix"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_split(split: Split) -> None:
    if not split.subject_level:
        return
    shared = check_subject_disjoint(split)
    if shared:
        raise RuntimeError(f"internal error: subjects {shared} are in more than one split")


def _log_split(split: Split) -> None:
    logger.info("split rule: %s", split.rule)
    for note in split.notes:
        logger.info("split note: %s", note)
    for name, samples in split.parts().items():
        counts = Counter(sample.label for sample in samples)
        subjects = {sample.subject for sample in samples}
        logger.info("%s: %d images (ALL %d, HEM %d), %d subjects",
                    name, len(samples), counts[1], counts[0], len(subjects))


def _pos_weight(config: TrainConfig, train_samples: list[Sample]) -> float:
    if config.pos_weight != "auto":
        return float(config.pos_weight)
    counts = Counter(sample.label for sample in train_samples)
    return counts[0] / counts[1]


def _keys_by_split(split: Split, cells: PreparedCells) -> dict[str, list[str]]:
    key_by_path = dict(zip((sample.path for sample in cells.samples), cells.keys))
    return {name: [key_by_path[sample.path] for sample in samples] for name, samples in split.parts().items()}


def _build_trainer(config: TrainConfig, run_dir: Path, engine: Engine) -> tuple[L.Trainer, ModelCheckpoint]:
    checkpoint_callback = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=config.monitor,
        mode=MONITOR_MODES[config.monitor],
        save_last=True,
        save_top_k=1,
    )
    early_stopping = EarlyStopping(monitor="val_loss", mode="min", patience=config.patience)
    # The frozen backbone is in eval mode on purpose (its batch-norm statistics stay fixed).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    trainer = L.Trainer(
        max_epochs=config.epochs,
        # The head alone is too small to gain from a GPU; a live backbone runs where the engine is.
        accelerator=engine.device.type if config.live_backbone else "cpu",
        devices=1,
        callbacks=[checkpoint_callback, early_stopping],
        logger=CSVLogger(run_dir, name="logs", version=""),
        deterministic=True,
        log_every_n_steps=1,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
    )
    return trainer, checkpoint_callback


def _loaders(
    config: TrainConfig,
    split: Split,
    keys: dict[str, list[str]],
    cache: PreprocessCache,
    spec: BackboneSpec,
    features: dict[str, torch.Tensor] | None,
    engine: Engine,
) -> tuple[DataLoader, DataLoader]:
    """Return train and validation loaders of cached features, or of cached cells in live mode.

    Both kinds index ``image * views + view`` and draw through the same ``ViewSampler``, so
    the same seed gives the same cells in the same views and order.
    """
    train_labels = [sample.label for sample in split.train]
    val_labels = [sample.label for sample in split.val]
    if features is None:
        train = CachedCellDataset(cache, keys["train"], train_labels, spec.mean, spec.std, config.views)
        val = CachedCellDataset(cache, keys["val"], val_labels, spec.mean, spec.std)
    else:
        train = FeatureDataset(features["train"], train_labels)
        val = FeatureDataset(features["val"], val_labels)

    options = dict(num_workers=config.loader_workers, pin_memory=engine.pin_memory and features is None,
                   persistent_workers=config.loader_workers > 0)
    sampler = ViewSampler(len(split.train), config.views, config.seed)
    return (
        DataLoader(train, batch_size=config.batch_size, sampler=sampler, **options),
        DataLoader(val, batch_size=config.batch_size if features is None else 256, **options),
    )


def _restore_best(module: FrozenBackboneModule, checkpoint_callback: ModelCheckpoint) -> None:
    """Load the best checkpoint's weights into the module (the last epoch's are in it now)."""
    best_path = checkpoint_callback.best_model_path
    if not best_path:
        logger.warning("no best checkpoint was saved; keeping the last epoch's weights")
        return
    state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    logger.info("restored the best weights (%s = %.4f) from %s",
                checkpoint_callback.monitor, float(checkpoint_callback.best_model_score), best_path)


@torch.no_grad()
def _predict_features(
    model: CellClassifier, samples: list[Sample], features: torch.Tensor, threshold: float
) -> Predictions:
    model.eval()
    probs = torch.sigmoid(model.forward_head(features)).numpy() if len(samples) else np.empty(0)
    return Predictions(
        files=[str(sample.path) for sample in samples],
        subjects=[sample.subject for sample in samples],
        targets=np.array([sample.label for sample in samples], dtype=int),
        probs=probs.astype(float),
        threshold=threshold,
    )


def _run_record(
    config: TrainConfig, dataset: DataSet, split: Split, cells: PreparedCells, checkpoint_callback: ModelCheckpoint
) -> dict:
    return {
        "split": {
            "rule": split.rule,
            "subject_level": split.subject_level,
            "notes": split.notes,
            "sizes": {name: len(samples) for name, samples in split.parts().items()},
        },
        "data": {
            "path": str(config.data),
            "layout": dataset.layout,
            "file_count": len(dataset.samples),
            "file_list_sha256": dataset.file_list_digest(),
            "counts": dataset.counts(),
            "skipped_images": len(cells.skipped),
            "warnings": dataset.warnings,
        },
        "best_checkpoint": {
            "monitor": checkpoint_callback.monitor,
            "score": None if checkpoint_callback.best_model_score is None else float(checkpoint_callback.best_model_score),
        },
        "environment": environment_record(),
    }


def _write_json(path: Path, values: dict) -> None:
    write_atomically(path, json.dumps(values, indent=2, default=str).encode("utf-8"))
