"""PyTorch datasets over cached preprocessed cells and cached backbone features.

Both index samples as ``image_index * n_views + view``, so that a ``ViewSampler`` draws the
same images in the same views whether the backbone runs live or its features come from the
cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from leukemia.preprocessing.cache import PreprocessCache
from leukemia.preprocessing.views import dihedral_view


def to_batch_tensor(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Convert an (S, S, 3) uint8 RGB image to a normalised (3, S, S) float32 tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_tensor) / std_tensor


class CachedCellDataset(Dataset):
    """Preprocessed cells read one at a time from the cache, so an epoch never keeps them all in memory.

    With ``n_views`` of 8, index ``i`` is image ``i // 8`` in dihedral view ``i % 8``. An
    ``augment`` function (see ``leukemia.training.augment``) jitters each view after it is drawn,
    with torch's random state seeded from ``augment_seed`` and the index. ``ViewSampler``
    numbers the draws of later epochs past ``len()``, so every draw gets its own jitter, and
    a resumed run jitters exactly as one never interrupted.
    """

    def __init__(
        self,
        cache: PreprocessCache,
        keys: list[str],
        labels: list[int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        n_views: int = 1,
        augment: Callable[[np.ndarray], np.ndarray] | None = None,
        augment_seed: int = 0,
    ) -> None:
        self.cache = cache
        self.keys = keys
        self.labels = labels
        self.mean = mean
        self.std = std
        self.n_views = n_views
        self.augment = augment
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.keys) * self.n_views

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_index, view = divmod(index % len(self), self.n_views)
        image = dihedral_view(self.cache.load(self.keys[image_index]), view)
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.augment_seed * 1_000_003 + index)
                image = self.augment(image)
        return to_batch_tensor(image, self.mean, self.std), torch.tensor(float(self.labels[image_index]))


class FeatureDataset(Dataset):
    """Pooled backbone features, (N, V, D) float32 for N images in V views, with float targets."""

    def __init__(self, features: torch.Tensor, labels: list[int]) -> None:
        if features.ndim == 2:
            features = features.unsqueeze(1)
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        self.features = features
        self.n_views = features.shape[1]
        self.targets = torch.tensor(labels, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.targets) * self.n_views

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_index, view = divmod(index % len(self), self.n_views)
        return self.features[image_index, view], self.targets[image_index]


class ViewSampler(Sampler[int]):
    """Each epoch, every image once, in shuffled order and in one view drawn at random.

    The draw depends only on the seed and the epoch (Lightning calls ``set_epoch``), so two
    runs with the same seed see the same views in the same order.

    With several processes (``world_size`` > 1), every process draws the same permutation
    and takes every ``world_size``-th position from ``rank``, so the processes see disjoint
    shares of the images. The permutation is padded to a multiple of ``world_size`` by
    repeating its first positions, so that every process gets the same number of samples and
    of batches. A few images then count twice in an epoch, as with PyTorch's
    ``DistributedSampler``, so use it for training only: validation and test must see each
    image exactly once.
    """

    def __init__(
        self,
        n_images: int,
        n_views: int,
        seed: int,
        shuffle: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for a world of {world_size} processes; use 0 to {world_size - 1}")
        self.n_images = n_images
        self.n_views = n_views
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n_images / self.world_size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n_images, generator=generator) if self.shuffle else torch.arange(self.n_images)
        views = torch.randint(0, self.n_views, (self.n_images,), generator=generator)
        if not self.shuffle:
            views.zero_()
        # Draws of epoch e are numbered from e * n_images * n_views. The datasets take them modulo
        # their length, so a jittering dataset can seed each draw from its number.
        indices = (order * self.n_views + views + self.epoch * self.n_images * self.n_views).tolist()

        # Pad to the same share for every process. The loop repeats the whole list when it is shorter than the padding.
        total = len(self) * self.world_size
        while indices and len(indices) < total:
            indices += indices[:total - len(indices)]
        return iter(indices[self.rank:total:self.world_size])
