"""Evaluating a model file on any labeled data set, with the report the train job writes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from leukemia.data.discovery import discover
from leukemia.evaluation.report import Predictions, write_report
from leukemia.inference.checkpoint import load_checkpoint
from leukemia.inference.engine import Engine, Precision
from leukemia.pipeline import environment_record, prepare_cells, write_skipped
from leukemia.preprocessing.cache import PreprocessCache, default_cache_dir
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
) -> dict:
    """Classify every labeled image under ``data`` and write the report into ``out``.

    Preprocessing settings, normalisation and threshold come from the model file, never from
    arguments, so evaluation preprocesses exactly as training did.
    """
    model, metadata = load_checkpoint(checkpoint)
    dataset = discover(data)
    if not dataset.labeled:
        raise ValueError(f"{data} holds no labeled image; evaluation needs images in all/ and hem/ folders "
                         "or a labeled CSV manifest")
    out.mkdir(parents=True, exist_ok=True)

    cache = PreprocessCache(cache_dir or default_cache_dir(), metadata["preprocess"])
    cells = prepare_cells(dataset.labeled, cache, workers=workers)
    write_skipped(out / "skipped.csv", cells.skipped)
    if not cells.samples:
        raise ValueError(f"none of the {len(dataset.labeled)} labeled images under {data} could be preprocessed; "
                         f"see {out / 'skipped.csv'}")

    labels = [sample.label for sample in cells.samples]
    engine = Engine.create(device, precision)
    features = compute_features(model, cache, cells.keys, engine, batch_size=batch_size)[:, 0]
    with torch.no_grad():
        probs = [torch.sigmoid(model.forward_head(features)).numpy()]

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
    return write_report(out, predictions, extra=extra)
