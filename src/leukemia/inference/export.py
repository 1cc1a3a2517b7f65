"""Exporting a model file to ONNX, and running the exported model with ONNX Runtime.

The ONNX file maps a normalised (B, 3, S, S) float32 batch to (B,) logits of ALL and carries
the model file's metadata (preprocessing, normalisation, threshold) as JSON in its
``metadata_props``, so that it predicts exactly like the model file it came from.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from leukemia.inference.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

METADATA_KEY = "leukemia"
ONNX_OPSET = 17


def export_onnx(checkpoint: Path | str, out: Path) -> Path:
    """Export a model file to ONNX with a dynamic batch size; return the written path.

    Raises:
        RuntimeError: the ``onnx`` package is missing.
    """
    try:
        import onnx
    except ImportError as error:
        raise RuntimeError("ONNX export needs the onnx extra: pip install 'leukemia[onnx]'") from error

    model, metadata = load_checkpoint(checkpoint)
    size = model.spec.input_size
    example = torch.zeros(1, 3, size, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # NOTE: the TorchScript-based exporter is used because timm's TF-style "same" padding
        # exports with it on torch 2.14; it warns that it is deprecated in favour of dynamo.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), str(out), input_names=["image"], output_names=["logit"],
            dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
        )

    exported = onnx.load(str(out))
    entry = exported.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(_json_metadata(metadata))
    onnx.save(exported, str(out))
    return out


class OnnxRunner:
    """An exported model in an ONNX Runtime CPU session, with the metadata of its model file."""

    def __init__(self, path: Path | str, *, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise RuntimeError("ONNX inference needs the onnx extra: pip install 'leukemia[onnx]'") from error

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        properties = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in properties:
            raise ValueError(f"{path} was not exported by `leukemia export`; it lacks the {METADATA_KEY!r} metadata")
        self.metadata = json.loads(properties[METADATA_KEY])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Return (B,) logits for a normalised (B, 3, S, S) float32 batch."""
        (logits,) = self.session.run(["logit"], {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return logits.reshape(-1)


def _json_metadata(metadata: dict) -> dict:
    values = dict(metadata)
    values["preprocess"] = dict(vars(metadata["preprocess"]))
    return json.loads(json.dumps(values, default=str))
