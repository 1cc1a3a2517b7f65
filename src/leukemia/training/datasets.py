"""PyTorch datasets over cached preprocessed cells and over cached backbone features."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from leukemia.preprocessing.cache import PreprocessCache


def to_batch_tensor(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Convert an (S, S, 3) uint8 RGB image to a normalised (3, S, S) float32 tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_tensor) / std_tensor


class CachedCellDataset(Dataset):
    """Preprocessed cells read one at a time from the cache, so an epoch never holds them all."""

    def __init__(
        self,
        cache: PreprocessCache,
        keys: list[str],
        labels: list[int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.cache = cache
        self.keys = keys
        self.labels = labels
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.cache.load(self.keys[index])
        return to_batch_tensor(image, self.mean, self.std), torch.tensor(float(self.labels[index]))


class FeatureDataset(Dataset):
    """Pooled backbone features, (N, D) float32, with float targets."""

    def __init__(self, features: torch.Tensor, labels: list[int]) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        self.features = features
        self.targets = torch.tensor(labels, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]
