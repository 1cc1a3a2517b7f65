"""Pooled features of a frozen backbone, computed once per cell and view and cached on disk.

A frozen backbone in eval mode maps each cell to the same vector in every epoch, so running
it once and training the head on the stored vectors gives the same model as running it live,
at a fraction of the cost. An entry is keyed by the backbone's weight digest, the inference
engine's precision, and the cell's cache key (which already covers the image bytes and the
preprocessing settings); it holds a (V, D) float32 tensor for V dihedral views.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from leukemia import distributed
from leukemia.inference.engine import Engine
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cache import PreprocessCache, write_atomically
from leukemia.training.datasets import CachedCellDataset

logger = logging.getLogger(__name__)


class FeatureCache:
    """Feature tensors stored as ``root/features/<backbone and engine>/<ab>/<cell key>.<V>views.pt``."""

    def __init__(self, root: Path, backbone_digest: str, engine: Engine) -> None:
        layout = "channels_last" if engine.channels_last else "contiguous"
        self.folder = root / "features" / f"{backbone_digest[:16]}-{engine.precision}-{layout}"

    def path(self, key: str, n_views: int) -> Path:
        return self.folder / key[:2] / f"{key}.{n_views}views.pt"

    def load(self, key: str, n_views: int) -> torch.Tensor | None:
        path = self.path(key, n_views)
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
        write_atomically(self.path(key, len(features)), buffer.getvalue())


@torch.no_grad()
def extract_features(
    model: CellClassifier,
    cell_cache: PreprocessCache,
    keys: list[str],
    feature_cache: FeatureCache,
    engine: Engine,
    *,
    n_views: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Return (N, V, D) float32 features for the cells, computing only those not yet cached.

    In a job of several processes, each process computes the missing features of its share
    of the distinct keys, then waits for the others and loads their shares from the cache, so
    every process returns all features. The cache folder must then be shared by every node.

    Raises:
        RuntimeError: a feature another process computed is not in the cache here.
    """
    # The shares depend on the key list alone, not on the cache's contents at this moment, so
    # the processes agree on them while others are still writing entries.
    unique = list(dict.fromkeys(keys))
    cached = {key: feature_cache.load(key, n_views) for key in distributed.shard(unique)}
    missing = [key for key, value in cached.items() if value is None]

    # The fork keeps the global random state as it was, so a run that finds every feature in
    # the cache trains exactly like one that computed them (DataLoader draws a seed).
    if missing:
        with torch.random.fork_rng(devices=[]):
            computed = compute_features(
                model, cell_cache, missing, engine, n_views=n_views, batch_size=batch_size,
                num_workers=num_workers, progress=progress,
            )
        for key, features in zip(missing, computed):
            feature_cache.store(key, features)
            cached[key] = features
    logger.info("features: %d cells computed, %d from the cache", len(missing), len(cached) - len(missing))
    distributed.barrier()
    if not keys:
        return torch.empty(0, n_views, model.spec.feature_dim)
    cached.update(_load_shares_of_others(unique, cached, feature_cache, n_views))
    return torch.stack([cached[key] for key in keys])


def _load_shares_of_others(
    keys: list[str], cached: dict[str, torch.Tensor], feature_cache: FeatureCache, n_views: int
) -> dict[str, torch.Tensor]:
    """Load from the cache the features of the keys other processes computed."""
    loaded = {}
    for key in keys:
        if key in cached:
            continue
        features = feature_cache.load(key, n_views)
        if features is None:
            raise RuntimeError(
                f"the features of cell {key} computed by another process are not in {feature_cache.folder}; "
                "with processes on several nodes, --cache-dir must be a folder every node shares"
            )
        loaded[key] = features
    return loaded


@torch.no_grad()
def compute_features(
    model: CellClassifier,
    cell_cache: PreprocessCache,
    keys: list[str],
    engine: Engine,
    *,
    n_views: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Run the backbone over every view of the cells; return (N, V, D) float32 features."""
    backbone = engine.prepare(model.backbone)
    dataset = CachedCellDataset(cell_cache, keys, [0] * len(keys), model.spec.mean, model.spec.std, n_views)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=engine.pin_memory)
    rows = []
    for batch, _ in tqdm(loader, desc="features", unit="batch", disable=not progress):
        with engine.autocast():
            rows.append(backbone(engine.prepare_batch(batch)).float().cpu())
    return torch.cat(rows).view(len(keys), n_views, -1)
