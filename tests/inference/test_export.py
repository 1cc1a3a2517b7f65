"""ONNX export: ONNX Runtime predicts like the model file it came from."""

from pathlib import Path

import numpy as np
import pytest

from leukemia.inference.checkpoint import save_checkpoint
from leukemia.inference.predictor import Predictor
from leukemia.models.backbones import create_backbone
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cell import PreprocessConfig

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    backbone, spec = create_backbone("efficientnet_lite0", weights=None)
    path = tmp_path_factory.mktemp("export") / "model.pt"
    save_checkpoint(path, CellClassifier(backbone, spec), preprocess=PreprocessConfig(crop="fixed"),
                    threshold=0.3, threshold_rule="test", train_config={})
    return path


def test_onnx_matches_float32(model_file, tmp_path):
    from leukemia.inference.export import export_onnx

    onnx_path = export_onnx(model_file, tmp_path / "model.onnx")
    paths = sorted(SAMPLE.rglob("*.jpg"))[:8]

    exported = Predictor(onnx_path).predict_files(paths)
    reference = Predictor(model_file, device="cpu", precision="float32").predict_files(paths)

    np.testing.assert_allclose(
        [r.probability for r in exported], [r.probability for r in reference], atol=1e-4
    )


def test_onnx_carries_settings(model_file, tmp_path):
    from leukemia.inference.export import export_onnx

    predictor = Predictor(export_onnx(model_file, tmp_path / "model.onnx"))

    assert predictor.threshold == 0.3
    assert predictor.preprocess == PreprocessConfig(crop="fixed")
    assert predictor.runtime == "onnxruntime"


def test_foreign_onnx_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logit"])], "plain",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    with pytest.raises(ValueError, match="not exported by `leukemia export`"):
        Predictor(path)
