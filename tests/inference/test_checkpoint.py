import io
import pickle

import pytest
import torch

from leukemia.inference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from leukemia.models.backbones import create_backbone
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cell import PreprocessConfig


@pytest.fixture
def model_file(tmp_path):
    backbone, spec = create_backbone("efficientnet_lite0", weights=None)
    model = CellClassifier(backbone, spec).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(
        path, model, preprocess=PreprocessConfig(crop="fixed", window=300), threshold=0.42,
        threshold_rule="test", train_config={"seed": 1},
    )
    return path, model


def test_round_trip_same_outputs(model_file):
    path, model = model_file
    batch = torch.randn(2, 3, 224, 224)

    loaded, metadata = load_checkpoint(path)

    torch.testing.assert_close(loaded(batch), model(batch))
    assert metadata["threshold"] == 0.42
    assert metadata["preprocess"] == PreprocessConfig(crop="fixed", window=300)


def test_run_directory_accepted(model_file):
    path, _ = model_file

    _, metadata = load_checkpoint(path.parent)

    assert metadata["backbone"]["name"] == "efficientnet_lite0"


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_other_version_names_both(model_file):
    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="version 99.*reads format version 1"):
        load_checkpoint(path)


def test_foreign_file_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)

    with pytest.raises(CheckpointError, match="not a model file"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_not_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "model.pt"
    buffer = io.BytesIO()
    torch.save({"format": "leukemia-classifier", "evil": _Payload(marker)}, buffer, pickle_module=pickle)
    path.write_bytes(buffer.getvalue())

    with pytest.raises(CheckpointError, match="rejected"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_rejected(model_file):
    path, _ = model_file
    path.write_bytes(path.read_bytes()[:1000])

    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
