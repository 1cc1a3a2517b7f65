"""Evaluating a model file on any labeled data set, with the report the train job writes."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from leukemia.data.discovery import DataSet, discover
from leukemia.evaluation.html_report import write_html_report
from leukemia.evaluation.report import Predictions, write_report
from leukemia.inference.checkpoint import load_checkpoint
from leukemia.inference.engine import Engine, Precision
from leukemia.pipeline import environment_record, prepare_cells, write_skipped
from leukemia.preprocessing.cache import PreprocessCache, default_cache_dir
from leukemia.preprocessing.views import N_DIHEDRAL_VIEWS
from leukemia.training.features import compute_features

logger = logging.getLogger(__name__)


def evaluate(
    checkpoint: Path,
    data: Path,
    out: Path,
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: Precision = "auto",
    allow_overlap: bool = False,
) -> dict:
    """Classify every labeled image under ``data`` and write the report into ``out``.

    Preprocessing settings, normalisation and threshold come from the model file, never from
    arguments, so evaluation preprocesses exactly as training did.

    When the model's run directory holds split.csv, the subjects of its training and
    validation splits must not appear in ``data``: a model scores better on patients it has
    seen. ``allow_overlap`` evaluates anyway and says so in the report's first line.

    Raises:
        ValueError: ``data`` holds no labeled image, or shares subjects with the model's
            training or validation split and ``allow_overlap`` is False.
    """
    model, metadata = load_checkpoint(checkpoint)
    dataset = discover(data)
    if not dataset.labeled:
        raise ValueError(f"{data} contains no labeled image; evaluation needs images in all/ and hem/ folders "
                         "or a labeled CSV manifest")
    header_lines = _check_subject_overlap(Path(metadata["path"]), dataset, allow_overlap=allow_overlap)
    out.mkdir(parents=True, exist_ok=True)

    cache = PreprocessCache(cache_dir or default_cache_dir(), metadata["preprocess"])
    cells = prepare_cells(dataset.labeled, cache, workers=workers)
    write_skipped(out / "skipped.csv", cells.skipped)
    if not cells.samples:
        raise ValueError(f"none of the {len(dataset.labeled)} labeled images under {data} could be preprocessed; "
                         f"see {out / 'skipped.csv'}")

    labels = [sample.label for sample in cells.samples]
    engine = Engine.create(device, precision)
    # Test-time augmentation, when the model file records it: the mean over the 8 dihedral views.
    n_views = N_DIHEDRAL_VIEWS if metadata.get("train_config", {}).get("tta", False) else 1
    features = compute_features(model, cache, cells.keys, engine, n_views=n_views, batch_size=batch_size)
    with torch.no_grad():
        logits = model.forward_head(features.flatten(0, 1)).view(len(cells.keys), n_views)
        probs = [torch.sigmoid(logits).mean(dim=1).numpy()]

    predictions = Predictions(
        files=[str(sample.path) for sample in cells.samples],
        subjects=[sample.subject for sample in cells.samples],
        targets=np.array(labels, dtype=int),
        probs=np.concatenate(probs).astype(float),
        threshold=float(metadata["threshold"]),
    )
    extra = {
        "checkpoint": str(metadata["path"]),
        "threshold_rule": metadata.get("threshold_rule"),
        "data": {
            "path": str(data),
            "layout": dataset.layout,
            "file_count": len(dataset.samples),
            "file_list_sha256": dataset.file_list_digest(),
            "counts": dataset.counts(),
            "skipped_images": len(cells.skipped),
        },
        "environment": environment_record(),
    }
    metrics = write_report(out, predictions, header_lines=header_lines, extra=extra)
    write_html_report(out, model=model, preprocess=metadata["preprocess"])
    return metrics


def _check_subject_overlap(model_path: Path, dataset: DataSet, *, allow_overlap: bool) -> tuple[str, ...]:
    """Compare the data's subjects with the training and validation subjects in the run's split.csv.

    Returns the report's header lines: a warning when subjects are shared and allowed.
    """
    split_csv = model_path.parent / "split.csv"
    if not split_csv.is_file():
        logger.warning("no split.csv next to %s, so whether its training subjects are in the evaluation data "
                       "cannot be checked", model_path)
        return ()
    with open(split_csv, newline="", encoding="utf-8") as handle:
        seen = {row["subject"] for row in csv.DictReader(handle) if row["split"] in ("train", "val") and row["subject"]}
    shared = sorted(seen & {sample.subject for sample in dataset.labeled if sample.subject})
    if not shared:
        return ()

    listed = ", ".join(shared[:20]) + (f" and {len(shared) - 20} more" if len(shared) > 20 else "")
    if not allow_overlap:
        raise ValueError(
            f"{dataset.root} shares {len(shared)} subject(s) with the training or validation split of {model_path} "
            f"({listed}; see {split_csv}); the model has seen these patients, so its metrics would be optimistic. "
            "Evaluate on subjects the model never saw (such as its test split), or pass --allow-overlap to "
            "evaluate anyway with a warning in the report"
        )
    logger.warning("evaluating on %d subject(s) from the model's training or validation split: %s", len(shared), listed)
    return (
        f"WARNING: {len(shared)} subject(s) of this data set ({listed}) were in the model's training or "
        "validation split; these results are optimistic because the model has seen these patients.",
    )
