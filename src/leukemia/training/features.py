"""Pooled features of a frozen backbone, computed once per cell and cached on disk.

A frozen backbone in eval mode maps each cell to the same vector in every epoch, so running
it once and training the head on the stored vectors gives the same model as running it live,
at a fraction of the cost. Entries are keyed by the backbone's weight digest and the cell's
cache key (which already includes the image bytes and the preprocessing settings).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cache import PreprocessCache, write_atomically
from leukemia.training.datasets import CachedCellDataset

logger = logging.getLogger(__name__)


class FeatureCache:
    """Feature vectors stored as ``root/features/<backbone digest>/<ab>/<cell key>.pt``."""

    def __init__(self, root: Path, backbone_digest: str) -> None:
        self.folder = root / "features" / backbone_digest[:16]

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError):
            logger.warning("ignoring unreadable feature cache entry %s", path)
            return None

    def store(self, key: str, features: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save(features.clone(), buffer)
        write_atomically(self.path(key), buffer.getvalue())


@torch.no_grad()
def extract_features(
    model: CellClassifier,
    cell_cache: PreprocessCache,
    keys: list[str],
    feature_cache: FeatureCache,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Return (N, D) float32 features for the cells, computing only those not yet cached."""
    cached = {key: feature_cache.load(key) for key in dict.fromkeys(keys)}
    missing = [key for key, value in cached.items() if value is None]

    # The fork keeps the global random state as it was, so a run that finds every feature in
    # the cache trains exactly like one that computed them (DataLoader draws a seed).
    if missing:
        with torch.random.fork_rng(devices=[]):
            _compute_missing(
                model, cell_cache, missing, feature_cache, cached, batch_size, num_workers, device, progress
            )
    logger.info("features: %d computed, %d from the cache", len(missing), len(cached) - len(missing))
    return torch.stack([cached[key] for key in keys]) if keys else torch.empty(0, model.spec.feature_dim)


def _compute_missing(
    model: CellClassifier,
    cell_cache: PreprocessCache,
    missing: list[str],
    feature_cache: FeatureCache,
    cached: dict[str, torch.Tensor | None],
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    progress: bool,
) -> None:
    """Run the backbone over the missing cells, storing each vector in both caches."""
    model.eval().to(device)
    dataset = CachedCellDataset(cell_cache, missing, [0] * len(missing), model.spec.mean, model.spec.std)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    position = 0
    for batch, _ in tqdm(loader, desc="features", unit="batch", disable=not progress):
        features = model.forward_features(batch.to(device)).float().cpu()
        for row in features:
            key = missing[position]
            feature_cache.store(key, row)
            cached[key] = row
            position += 1
