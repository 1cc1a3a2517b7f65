"""The main job: discover data, preprocess, split by subject, train, evaluate, write the report."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import pickle
import shutil
import socket
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from torch.utils.data import DataLoader

from leukemia import distributed
from leukemia.data.discovery import DataSet, Sample, discover
from leukemia.data.splits import LEAKAGE_WARNING, Split, check_subject_disjoint, make_fold_split, make_split
from leukemia.evaluation.html_report import write_html_report
from leukemia.evaluation.report import Predictions, write_report
from leukemia.evaluation.thresholds import choose_threshold
from leukemia.inference.checkpoint import save_checkpoint
from leukemia.inference.engine import Engine, resolve_device
from leukemia.models.backbones import BackboneSpec, check_backbone_name, count_stages, create_backbone, weights_digest
from leukemia.models.classifier import CellClassifier
from leukemia.pipeline import PreparedCells, environment_record, prepare_cells, write_skipped
from leukemia.preprocessing.views import N_DIHEDRAL_VIEWS
from leukemia.preprocessing.cache import PreprocessCache, default_cache_dir, write_atomically
from leukemia.training.augment import build_augmentation
from leukemia.training.config import TrainConfig, load_settings
from leukemia.training.datasets import CachedCellDataset, FeatureDataset, ViewSampler
from leukemia.training.features import FeatureCache, compute_features, extract_features
from leukemia.training.module import MONITOR_MODES, FineTuneModule, FrozenBackboneModule

logger = logging.getLogger(__name__)

# Created with O_EXCL while a run writes into its directory. It contains the PID and the host name.
LOCK_FILE = "run.lock"
# The resolved settings, in the form that --config reads back.
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class Stage:
    """The folders inside the run directory where a training stage keeps its checkpoints and history.

    The frozen stage trains the head on a frozen backbone; the optional fine-tuning stage then
    trains the head and the backbone's last stages together.
    """

    name: str
    checkpoint_dir: str
    log_version: str

    def last_checkpoint(self, run_dir: Path) -> Path:
        return run_dir / self.checkpoint_dir / "last.ckpt"

    def history(self, run_dir: Path) -> Path:
        return run_dir / "logs" / self.log_version / "metrics.csv"

    def earlier_history(self, run_dir: Path) -> Path:
        """Return the file that keeps the history logged before a resume until the resumed run merges it back."""
        suffix = f"_{self.log_version}" if self.log_version else ""
        return run_dir / f"history_before_resume{suffix}.csv"


FROZEN = Stage("frozen", "checkpoints", "")
FINETUNE = Stage("finetune", "checkpoints/finetune", "finetune")


class RunDirectoryLockedError(RuntimeError):
    """Another run writes into the run directory, or an interrupted one left its lock behind."""


_TRAINING_PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


class ResumePoint(NamedTuple):
    """The start of a resumed run: a checkpoint (None: the first epoch) and an epoch limit.

    ``max_epochs`` is set when early stopping had already ended the run in the checkpoint's
    epoch, because Lightning keeps the stop decision itself out of its checkpoints.
    """

    checkpoint: Path | None
    max_epochs: int | None = None


@dataclass
class TrainResult:
    """The outputs of a finished run and its test metrics."""

    run_dir: Path
    model_path: Path
    metrics: dict


def train(config: TrainConfig) -> TrainResult:
    """Run the whole job into ``config.out``; see the README for the files it writes.

    The run directory is locked while the run writes into it (``run.lock``).

    Raises:
        FileExistsError: the run directory already contains files.
        RunDirectoryLockedError: another run writes into the directory, or an interrupted
            run left its lock (continue it with ``resume_training``).
        ValueError: the data set lacks a class, or cannot be split by subject; or
            ``config.devices`` and ``config.num_nodes`` request another number of processes
            than the launcher (torchrun, srun) started.
    """
    _join_processes(config)
    run_dir = distributed.on_main(_create_run_dir, config.out)
    try:
        return _train(config, run_dir, resuming=False)
    except BaseException:
        # A run that failed before its first checkpoint (a wrong path, an unknown backbone, a
        # data set without a class) leaves nothing to resume. Removing its setup files lets
        # the user rerun the same command once the cause is fixed.
        if distributed.is_main():
            _remove_unstarted_run(run_dir)
        raise
    finally:
        _release_lock(run_dir)


def _remove_unstarted_run(run_dir: Path) -> None:
    if (run_dir / "checkpoints").exists():
        return
    for name in (RUN_CONFIG, "skipped.csv", "split.csv"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "logs", ignore_errors=True)


def resume_training(
    run_dir: Path,
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> TrainResult:
    """Continue an interrupted run from its last checkpoint with the settings in its config.yaml.

    Data, split and features are prepared again as the first time (the caches make this
    quick), and training continues after the last saved epoch. With the same data, the
    results equal those of a run never interrupted. Without a checkpoint, training starts
    from the first epoch. A run interrupted in fine-tuning continues from
    ``checkpoints/finetune/last.ckpt``. Resuming a finished run writes its report again.

    Args:
        run_dir: the ``--out`` folder of the interrupted run.
        cache_dir: the cache folder, when it moved since the run started.
        workers: preprocessing processes; they do not change the results.

    Raises:
        FileNotFoundError: ``run_dir`` contains no config.yaml, or the recorded data is gone.
        RunDirectoryLockedError: another run is still writing into ``run_dir``.
        RuntimeError: last.ckpt is damaged.
    """
    run_dir = Path(run_dir)
    config = _stored_config(run_dir, cache_dir=cache_dir, workers=workers)
    _join_processes(config)
    distributed.on_main(_acquire_lock, run_dir, replace_stale=True)
    try:
        return _train(config, run_dir, resuming=True)
    finally:
        _release_lock(run_dir)


def _train(config: TrainConfig, run_dir: Path, *, resuming: bool) -> TrainResult:
    L.seed_everything(config.seed, workers=True)
    # Rank 0 alone writes into the run directory and shows progress bars.
    main = distributed.is_main()
    if main:
        write_atomically(run_dir / RUN_CONFIG, config.to_yaml().encode("utf-8"))
    else:
        config = replace(config, progress=False)

    # A misspelt backbone fails here, before the data is read and preprocessed.
    check_backbone_name(config.backbone)

    # Data: discovery, preprocessing into the cache, then the split.
    dataset = discover(config.data)
    logger.info("found %s: %s (layout: %s)", config.data, dataset.counts(), dataset.layout)
    cache = PreprocessCache(config.cache_dir or default_cache_dir(), config.preprocess)
    cells = prepare_cells(dataset.labeled, cache, workers=config.workers, progress=config.progress)
    if main:
        write_skipped(run_dir / "skipped.csv", cells.skipped)
    split = _make_split(config, cells.samples)
    _check_split(split)
    if main:
        split.write_csv(run_dir / "split.csv")
    _log_split(split)

    # Model and features: the frozen backbone runs once per cell and view, never per epoch.
    weights = None if config.weights == "none" else config.weights
    backbone, spec = create_backbone(config.backbone, weights=weights)
    _check_finetune_stages(config, backbone)
    model = CellClassifier(backbone, spec, hidden=config.hidden, dropout=config.dropout)
    model.freeze_backbone()
    engine = Engine.create(distributed.local_device(config.device), config.precision)
    logger.info("backbone %s on %s in %s", spec.name, engine.device, engine.precision)
    keys = _keys_by_split(split, cells)
    if config.live_backbone:
        inputs = None
    else:
        feature_cache = _feature_cache(model, cache, engine)
        inputs = {
            name: extract_features(model, cache, split_keys, feature_cache, engine,
                                   n_views=config.views if name == "train" else 1, batch_size=config.batch_size,
                                   num_workers=config.loader_workers, progress=config.progress)
            for name, split_keys in keys.items()
        }

    # Frozen stage: Lightning runs the loop, keeps the best and last checkpoints, stops early.
    module = FrozenBackboneModule(
        model, learning_rate=config.learning_rate, pos_weight=_pos_weight(config, split.train),
        live_backbone=config.live_backbone, engine=engine, seed=config.seed,
    )
    trainer, checkpoint_callback = _build_trainer(config, run_dir, engine, FROZEN)
    loaders = _loaders(config, split, keys, cache, spec, inputs, engine, augment=config.live_backbone)
    _fit(trainer, module, loaders, run_dir, FROZEN,
         distributed.on_main(_resume_point, run_dir, FROZEN) if resuming else None)
    _restore_best(module, checkpoint_callback)

    # Fine-tuning stage: the head and the backbone's last stages train together on the images.
    if config.finetune_epochs:
        module, checkpoint_callback = _finetune(config, run_dir, model, split, keys, cache, engine, resuming=resuming)
        inputs = None  # the cached features are those of the backbone before fine-tuning

    metrics = distributed.on_main(
        _evaluate_and_save, config, run_dir, module.model, checkpoint_callback,
        inputs=inputs, keys=keys, cache=cache, engine=engine, dataset=dataset, split=split, cells=cells,
    )
    return TrainResult(run_dir, run_dir / "model.pt", metrics)


def _check_finetune_stages(config: TrainConfig, backbone: torch.nn.Module) -> None:
    """Reject a stage count the backbone does not have, before any training."""
    if not config.finetune_epochs or config.finetune_stages == "all":
        return
    available = count_stages(backbone)
    if config.finetune_stages > available:
        raise ValueError(f"invalid finetune_stages {config.finetune_stages}: {config.backbone} has {available} stages; "
                         f"use 1 to {available}, or all")


def _make_split(config: TrainConfig, samples: list[Sample]) -> Split:
    """Return the split the settings ask for: a cross-validation fold, or the main job's split."""
    if config.cv_fold is not None:
        return make_fold_split(samples, fold=config.cv_fold, n_folds=config.cv_folds,
                               val_fraction=config.val_fraction, image_level=config.image_level_split,
                               seed=config.seed)
    return make_split(samples, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                      image_level=config.image_level_split, seed=config.seed)


def _finetune(
    config: TrainConfig,
    run_dir: Path,
    model: CellClassifier,
    split: Split,
    keys: dict[str, list[str]],
    cache: PreprocessCache,
    engine: Engine,
    *,
    resuming: bool,
) -> tuple[FineTuneModule, ModelCheckpoint]:
    """Train the head and the backbone's last stages from the frozen stage's best weights.

    Returns the module with the best fine-tuned weights restored, and its checkpoint callback.
    """
    steps_per_epoch = math.ceil(math.ceil(len(split.train) / distributed.world_size()) / config.batch_size)
    module = FineTuneModule(
        model, learning_rate=config.finetune_lr, pos_weight=_pos_weight(config, split.train),
        weight_decay=config.weight_decay, warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        total_steps=config.finetune_epochs * steps_per_epoch,
        stages=None if config.finetune_stages == "all" else int(config.finetune_stages),
        freeze_batch_norm=config.batch_norm == "frozen", engine=engine, seed=config.seed,
    )
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("fine-tuning %s stage(s) of the backbone and the head: %d trainable parameters, batch norm %s",
                config.finetune_stages, trained, config.batch_norm)
    trainer, checkpoint_callback = _build_trainer(config, run_dir, engine, FINETUNE)
    loaders = _loaders(config, split, keys, cache, model.spec, None, engine, augment=True)
    _fit(trainer, module, loaders, run_dir, FINETUNE,
         distributed.on_main(_resume_point, run_dir, FINETUNE) if resuming else None)
    _restore_best(module, checkpoint_callback)
    return module, checkpoint_callback


def _evaluate_and_save(
    config: TrainConfig,
    run_dir: Path,
    model: CellClassifier,
    checkpoint_callback: ModelCheckpoint,
    *,
    inputs: dict[str, torch.Tensor] | None,
    keys: dict[str, list[str]],
    cache: PreprocessCache,
    engine: Engine,
    dataset: DataSet,
    split: Split,
    cells: PreparedCells,
) -> dict:
    """Write model.pt and the report on the test split from the model's best weights; return the metrics.

    In a job of several processes rank 0 alone runs this, on every test and validation image
    once, with no sampler padding.
    """
    fine_tuned = bool(config.finetune_epochs)
    if config.tta and not fine_tuned:
        # Test-time augmentation: every view of each validation and test cell, averaged below.
        feature_cache = _feature_cache(model, cache, engine)
        inputs = {name: extract_features(model, cache, keys[name], feature_cache, engine, n_views=N_DIHEDRAL_VIEWS,
                                         batch_size=config.batch_size, progress=config.progress)
                  for name in ("val", "test")}
    elif inputs is None or config.tta:
        # Evaluation below reads features. A live or fine-tuned backbone computes them once now,
        # outside the feature cache: a fine-tuned backbone is used once, so caching would only fill the disk.
        n_views = N_DIHEDRAL_VIEWS if config.tta else 1
        inputs = {name: compute_features(model, cache, keys[name], engine, n_views=n_views,
                                         batch_size=config.batch_size, progress=config.progress)
                  for name in ("val", "test")}

    # Threshold: chosen on validation only, so the test split stays unseen until the report.
    validation = _predict_features(model, split.val, inputs["val"], 0.5)
    choice = choose_threshold(validation.targets, validation.probs, rule=config.threshold_rule,
                              target_sensitivity=config.target_sensitivity)
    validation.threshold = choice.threshold
    logger.info("threshold %.4f: %s", choice.threshold, choice.rule)

    # Evaluation and the self-contained model file.
    model_path = run_dir / "model.pt"
    save_checkpoint(
        model_path, model, preprocess=config.preprocess, threshold=choice.threshold,
        threshold_rule=choice.rule, train_config=config.to_dict(),
    )
    extra = _run_record(config, dataset, split, cells, checkpoint_callback)
    extra["threshold"] = {"value": choice.threshold, "rule": choice.rule}
    metrics = write_report(
        run_dir,
        _predict_features(model, split.test, inputs["test"], choice.threshold),
        validation=validation,
        header_lines=() if split.subject_level else (LEAKAGE_WARNING,),
        extra=extra,
        history_csvs=[stage.history(run_dir) for stage in (FROZEN, FINETUNE)],
    )
    write_html_report(run_dir, model=model, preprocess=config.preprocess)
    return metrics


def _create_run_dir(path: Path) -> Path:
    path = Path(path)
    if (path / LOCK_FILE).exists():
        _raise_locked(path, _lock_owner(path / LOCK_FILE))
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"the run directory {path} already contains files; choose a new --out so runs never mix"
        )
    path.mkdir(parents=True, exist_ok=True)
    _acquire_lock(path, replace_stale=False)
    return path


def _join_processes(config: TrainConfig) -> distributed.World:
    """Check that the settings request as many processes as the launcher started, then join them.

    Raises:
        ValueError: the numbers differ, or the settings request several processes without a launcher.
    """
    world = distributed.launcher_world()
    devices = _devices_per_node(config, world)
    requested = devices * config.num_nodes
    if world.size == 1 and requested > 1:
        raise ValueError(
            f"--devices {devices} --num-nodes {config.num_nodes} requests {requested} training processes, but this "
            "process was not started by a launcher (torchrun or srun), and the train job does not start processes "
            f"itself; run `torchrun --nproc-per-node {devices} -m leukemia.cli train ...` (with --nnodes and "
            "--node-rank on each node for several nodes), or leave out --devices for a single process"
        )
    if world.size > 1 and requested != world.size:
        raise ValueError(
            f"{world.launcher} started {world.size} processes ({world.local_size} on each of {world.num_nodes} "
            f"node(s)), but --devices {devices} --num-nodes {config.num_nodes} requests {requested}; pass "
            f"--devices {world.local_size} --num-nodes {world.num_nodes}"
        )
    return distributed.init_distributed(device_type=resolve_device(config.device).type)


def _devices_per_node(config: TrainConfig, world: distributed.World) -> int:
    """Return the Trainer's devices: the processes the launcher started per node for "auto"."""
    return world.local_size if config.devices == "auto" else int(config.devices)


def _stored_config(run_dir: Path, *, cache_dir: Path | None, workers: int | None) -> TrainConfig:
    """Read the settings of the run in ``run_dir``, with the options that may change on resume."""
    config_path = run_dir / RUN_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{RUN_CONFIG} not found in {run_dir}, so it is no run directory of `leukemia train`; pass the "
            "--out folder of the run to continue, or start a new run"
        )
    config = TrainConfig.from_dict(load_settings(config_path))
    config.out = run_dir
    if cache_dir is not None:
        config.cache_dir = cache_dir
    if workers is not None:
        config.workers = workers
    if not config.data.exists():
        raise FileNotFoundError(
            f"the data path {config.data} recorded in {config_path} was not found; a relative path counts "
            "from the folder where the run started, so resume from there"
        )
    return config


def _acquire_lock(run_dir: Path, *, replace_stale: bool) -> None:
    """Create ``run_dir/run.lock`` with this process's PID; raise if a live run already has it."""
    lock = run_dir / LOCK_FILE
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if not replace_stale or _owner_alive(owner):
                _raise_locked(run_dir, owner)
            logger.warning("removing the lock %s left by run PID %s, which no longer runs", lock, owner[0])
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(f"{os.getpid()}\n{socket.gethostname()}\n")
        return
    raise RunDirectoryLockedError(f"could not lock {run_dir}: another run created {lock} at the same moment")


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """Return (PID, host) from a lock file, or None while it is being written or unreadable."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split("\n")[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _owner_alive(owner: tuple[int, str] | None) -> bool:
    """Return whether the lock's process still runs; a lock of another host counts as alive."""
    if owner is None or owner[1] != socket.gethostname():
        return True
    try:
        os.kill(owner[0], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_locked(run_dir: Path, owner: tuple[int, str] | None) -> None:
    lock = run_dir / LOCK_FILE
    if owner is None or _owner_alive(owner):
        who = "another run" if owner is None else f"another run (PID {owner[0]} on {owner[1]})"
        raise RunDirectoryLockedError(
            f"{who} is writing into {run_dir}; wait for it to end or choose another --out. If no run is "
            f"active there, delete {lock}"
        )
    raise RunDirectoryLockedError(
        f"{run_dir} is locked by run PID {owner[0]}, which no longer runs, so that run was interrupted; "
        f"continue it with `leukemia train --resume {run_dir}`, or choose a new --out"
    )


def _release_lock(run_dir: Path) -> None:
    """Remove the lock if this process owns it."""
    lock = run_dir / LOCK_FILE
    owner = _lock_owner(lock)
    if owner is not None and owner == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


def _fit(
    trainer: L.Trainer,
    module: FrozenBackboneModule,
    loaders: tuple[DataLoader, DataLoader],
    run_dir: Path,
    stage: Stage,
    resume_from: ResumePoint | None,
) -> None:
    """Train one stage, from its last checkpoint when resuming; keep the history of the epochs before it."""
    checkpoint = resume_from.checkpoint if resume_from is not None else None
    if resume_from is not None and resume_from.max_epochs is not None:
        trainer.fit_loop.max_epochs = resume_from.max_epochs
    history_path = stage.history(run_dir)
    earlier: list[dict[str, str]] = []
    if checkpoint is not None:
        # Lightning's CSV logger empties logs/ when the resumed run starts, so the epochs
        # logged so far are kept beside it until the resumed run has merged them back. A run
        # interrupted again keeps them for the next resume.
        earlier = _merge_rows(_read_history(stage.earlier_history(run_dir)), _read_history(history_path))
        if earlier and distributed.is_main():
            _write_history(stage.earlier_history(run_dir), earlier)
    try:
        trainer.fit(module, *loaders, ckpt_path=checkpoint)
    except SystemExit as error:
        # Lightning handles Ctrl+C with a graceful stop and then calls sys.exit(1) inside fit.
        if not trainer.interrupted:
            raise
        logger.warning("training was interrupted; continue it with `leukemia train --resume %s`", run_dir)
        raise KeyboardInterrupt from error
    if earlier and distributed.is_main():
        _write_history(history_path, _merge_rows(earlier, _read_history(history_path)))
        stage.earlier_history(run_dir).unlink(missing_ok=True)


def _resume_point(run_dir: Path, stage: Stage) -> ResumePoint:
    """Return the stage's last.ckpt (written after every epoch) to continue from, after checking that it loads."""
    path = stage.last_checkpoint(run_dir)
    if not path.is_file():
        logger.warning("no last.ckpt found in %s; the %s stage starts from its first epoch", path.parent, stage.name)
        # A best.ckpt without last.ckpt would make Lightning save the new best as best-v1.ckpt.
        for stale in path.parent.glob("*.ckpt"):
            stale.unlink()
        return ResumePoint(None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise RuntimeError(
            f"{path} is damaged and cannot be loaded ({error}); delete it and resume again to train from "
            "the first epoch, or start a new run with a new --out"
        ) from error

    if _relocate_checkpoint_paths(state, Path(os.path.realpath(path.parent))):
        logger.info("the run directory moved since %s was written; updating its file paths", path)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(path, buffer.getvalue())

    stopped = [value.get("stopped_epoch", 0) for key, value in state.get("callbacks", {}).items()
               if key.startswith("EarlyStopping") and isinstance(value, dict)]
    logger.info("resuming from %s, saved after epoch %d", path, int(state["epoch"]) + 1)
    return ResumePoint(path, int(state["epoch"]) + 1 if any(stopped) else None)


def _relocate_checkpoint_paths(state: dict, checkpoint_dir: Path) -> bool:
    """Point the checkpoint callback's file paths into ``checkpoint_dir``; return whether any moved.

    Lightning restores the best checkpoint's score only when the folder is unchanged, so a
    run directory that was moved or copied would lose track of its best epoch.
    """
    moved = False
    for key, value in state.get("callbacks", {}).items():
        if not key.startswith("ModelCheckpoint") or not isinstance(value, dict):
            continue
        if not value.get("dirpath") or Path(value["dirpath"]) == checkpoint_dir:
            continue

        def inside(old: str | None) -> str | None:
            return str(checkpoint_dir / Path(old).name) if old else old

        value["dirpath"] = str(checkpoint_dir)
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            value[name] = inside(value.get(name))
        value["best_k_models"] = {inside(old): score for old, score in value.get("best_k_models", {}).items()}
        moved = True
    return moved


def _read_history(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _merge_rows(earlier: list[dict[str, str]], later: list[dict[str, str]]) -> list[dict[str, str]]:
    """Put history rows logged before a resume in front of the new ones.

    A row of the interrupted run is kept unless the resumed run logged the same epoch and
    step with the same columns filled.
    """
    seen = {_history_key(row) for row in later}
    return [row for row in earlier if _history_key(row) not in seen] + later


def _write_history(path: Path, rows: list[dict[str, str]]) -> None:
    columns = sorted({column for row in rows for column in row})
    buffer = io.StringIO()
    # The line ends of csv.DictWriter's default dialect, which Lightning's CSV logger writes too.
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue().encode("utf-8"))


def _history_key(row: dict[str, str]) -> tuple:
    return row.get("epoch"), row.get("step"), tuple(sorted(k for k, v in row.items() if v not in ("", None)))


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file next to it, then renames it into place.

    Lightning stages checkpoints in the system's temporary folder and moves them into place.
    When that folder is on another file system, the move is a copy, not an atomic rename, so a
    kill during the copy would leave a truncated last.ckpt. A kill before the move leaves a
    stray file of the checkpoint's size in the temporary folder.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(Path(path), buffer.getvalue())


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


def _build_trainer(
    config: TrainConfig, run_dir: Path, engine: Engine, stage: Stage
) -> tuple[L.Trainer, ModelCheckpoint]:
    fine_tuning = stage is FINETUNE
    checkpoint_callback = ModelCheckpoint(
        dirpath=run_dir / stage.checkpoint_dir,
        filename="best",
        monitor=config.monitor,
        mode=MONITOR_MODES[config.monitor],
        save_top_k=1,
    )
    # Written after every epoch, so a resumed run repeats no finished epoch. Lightning's save_last
    # writes last.ckpt only together with a new best checkpoint.
    last_callback = ModelCheckpoint(dirpath=run_dir / stage.checkpoint_dir, filename="last", monitor=None,
                                    save_top_k=1, enable_version_counter=False)
    early_stopping = EarlyStopping(monitor="val_loss", mode="min", patience=config.patience)
    # The frozen backbone is in eval mode on purpose (its batch-norm statistics stay fixed).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # On resume Lightning warns that the logs and checkpoints folders are not empty and that old
    # logs "will be deleted". _fit saves the earlier history before fit and merges it back after.
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    # Every process validates on the whole validation set, so its validation metrics are already
    # those of the whole set and need no averaging across processes.
    warnings.filterwarnings("ignore", message=r".*self\.log\('val_\w+', \.\.\., sync_dist=True\).*")
    live = config.live_backbone or fine_tuning
    trainer = L.Trainer(
        max_epochs=config.finetune_epochs if fine_tuning else config.epochs,
        # The head alone is too small to gain from a GPU; a live backbone, and the processes of
        # a distributed run (one per GPU), run where the engine is.
        accelerator=engine.device.type if live or distributed.world_size() > 1 else "cpu",
        # Fine-tuning trains the backbone in the engine's precision, as mixed precision: the
        # weights stay float32 (float16 on CUDA adds loss scaling).
        precision=_TRAINING_PRECISION[engine.precision] if fine_tuning else "32-true",
        devices=_devices_per_node(config, distributed.launcher_world()),
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        # ViewSampler shares out the training cells itself; validation is not shared out, so every
        # process computes the validation metrics over the whole validation set.
        use_distributed_sampler=False,
        callbacks=[checkpoint_callback, last_callback, early_stopping],
        # Flushed at every logging step, so a killed run has written every finished epoch.
        logger=CSVLogger(run_dir, name="logs", version=stage.log_version, flush_logs_every_n_steps=1),
        # Some CUDA kernels of a backbone's backward pass have no deterministic version; they warn.
        deterministic="warn" if fine_tuning and engine.device.type == "cuda" else True,
        log_every_n_steps=1,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        plugins=[_AtomicCheckpointIO()],
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
    *,
    augment: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Return train and validation loaders of cached features, or of cached cells in live mode.

    Both kinds index ``image * views + view`` and draw through the same ``ViewSampler``, so
    the same seed gives the same cells in the same views and order. With ``augment``, the
    training cells get the scale and colour jitter of the settings; validation cells never do.
    """
    train_labels = [sample.label for sample in split.train]
    val_labels = [sample.label for sample in split.val]
    if features is None:
        jitter = build_augmentation(config.scale_jitter, config.color_jitter) if augment else None
        train = CachedCellDataset(cache, keys["train"], train_labels, spec.mean, spec.std, config.views, jitter,
                                  augment_seed=config.seed)
        val = CachedCellDataset(cache, keys["val"], val_labels, spec.mean, spec.std)
    else:
        train = FeatureDataset(features["train"], train_labels)
        val = FeatureDataset(features["val"][:, :1], val_labels)

    options = dict(num_workers=config.loader_workers, pin_memory=engine.pin_memory and features is None,
                   persistent_workers=config.loader_workers > 0)
    sampler = ViewSampler(len(split.train), config.views, config.seed,
                          rank=distributed.rank(), world_size=distributed.world_size())
    return (
        DataLoader(train, batch_size=config.batch_size, sampler=sampler, **options),
        DataLoader(val, batch_size=config.batch_size if features is None else 256, **options),
    )


def _restore_best(module: L.LightningModule, checkpoint_callback: ModelCheckpoint) -> None:
    """Load the best checkpoint's weights into the module (the last epoch's are in it now)."""
    best_path = checkpoint_callback.best_model_path
    if not best_path:
        logger.warning("no best checkpoint was saved; keeping the last epoch's weights")
        return
    state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    logger.info("restored the best weights (%s = %.4f) from %s",
                checkpoint_callback.monitor, float(checkpoint_callback.best_model_score), best_path)


def _feature_cache(model: CellClassifier, cache: PreprocessCache, engine: Engine) -> FeatureCache:
    return FeatureCache(cache.root, weights_digest(model.backbone) + cache.config.digest(), engine)


@torch.no_grad()
def _predict_features(
    model: CellClassifier, samples: list[Sample], features: torch.Tensor, threshold: float
) -> Predictions:
    """Return predictions from (N, V, D) features; with several views the probabilities are averaged."""
    model.eval()
    if len(samples):
        n_images, n_views, width = features.shape
        logits = model.forward_head(features.reshape(n_images * n_views, width)).view(n_images, n_views)
        probs = torch.sigmoid(logits).mean(dim=1).numpy()
    else:
        probs = np.empty(0)
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
        "training": {"recipe": config.describe(), "backbone": config.backbone, "weights": config.weights},
        "best_checkpoint": {
            "stage": FINETUNE.name if config.finetune_epochs else FROZEN.name,
            "monitor": checkpoint_callback.monitor,
            "score": None if checkpoint_callback.best_model_score is None else float(checkpoint_callback.best_model_score),
        },
        "environment": environment_record(),
    }
