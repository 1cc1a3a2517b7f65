"""The model file (``model.pt``): weights plus everything needed to predict the same way.

A model file stores only tensors, numbers, strings, lists, tuples and dicts, so it loads with
PyTorch's weights-only unpickler and a file from an untrusted source cannot run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import asdict
from pathlib import Path

import torch

from leukemia import CLASS_NAMES, __version__
from leukemia.models.backbones import BackboneSpec, create_backbone
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cache import write_atomically
from leukemia.preprocessing.cell import PreprocessConfig

FORMAT_NAME = "leukemia-classifier"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model file that is not a valid checkpoint of this tool, or is not safe to load."""


def save_checkpoint(
    path: Path,
    model: CellClassifier,
    *,
    preprocess: PreprocessConfig,
    threshold: float,
    threshold_rule: str,
    train_config: dict,
) -> None:
    """Write the model and its prediction settings atomically."""
    head = model.head
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "backbone": asdict(model.spec),
        "head": {"hidden": head[0].out_features, "dropout": head[2].p},
        "preprocess": asdict(preprocess),
        "class_names": list(CLASS_NAMES),
        "threshold": float(threshold),
        "threshold_rule": threshold_rule,
        "train_config": train_config,
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomically(path, buffer.getvalue())


def load_checkpoint(path: Path | str) -> tuple[CellClassifier, dict]:
    """Load a model file into an eval-mode classifier; return it and the file's metadata.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a model file of this tool, has another format
            version, or holds objects other than plain data (which could run code).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; pass a model.pt file or the run directory")

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was rejected: it contains objects other than tensors and plain data, which could "
            f"run code when loaded. Only load model files written by `leukemia train`. Details: {error}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch file (corrupt or truncated?): {error}") from error

    _check_format(path, payload)
    spec = BackboneSpec(**{**payload["backbone"], "mean": tuple(payload["backbone"]["mean"]),
                           "std": tuple(payload["backbone"]["std"])})
    backbone, _ = create_backbone(spec.name, weights=None)
    model = CellClassifier(backbone, spec, hidden=payload["head"]["hidden"], dropout=payload["head"]["dropout"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    metadata = {key: value for key, value in payload.items() if key != "state_dict"}
    metadata["preprocess"] = PreprocessConfig.from_dict(payload["preprocess"])
    metadata["path"] = str(path)
    return model, metadata


def _check_format(path: Path, payload: object) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not a model file of this tool (expected format {FORMAT_NAME!r}); "
            "pass the model.pt that `leukemia train` writes into its run directory"
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has model file format version {version} (written by leukemia "
            f"{payload.get('package_version', 'unknown')}), but this leukemia {__version__} reads "
            f"format version {FORMAT_VERSION}; use the matching version of the tool"
        )
