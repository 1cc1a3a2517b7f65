"""The web app's logic without a browser: uploads of real cells turned into results."""

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from leukemia.app.analysis import (
    PredictorCache,
    UploadLimits,
    analyze_uploads,
    find_checkpoints,
    load_explainer,
)
from leukemia.cli import main
from leukemia.inference.checkpoint import save_checkpoint
from leukemia.inference.predictor import Predictor
from leukemia.models.backbones import create_backbone
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cell import PreprocessConfig

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample"
CELL = SAMPLE / "training_data" / "fold_2" / "hem" / "UID_h3_1_1_hem.jpg"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    backbone, spec = create_backbone("efficientnet_lite0", weights=None)
    path = tmp_path_factory.mktemp("app") / "model.pt"
    save_checkpoint(path, CellClassifier(backbone, spec), preprocess=PreprocessConfig(),
                    threshold=0.4, threshold_rule="test", train_config={})
    return path


@pytest.fixture(scope="module")
def predictor(model_file):
    return Predictor(model_file, device="cpu")


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.bmp"
    path.write_text("this is text, not a bitmap")
    return path


def test_good_file_matches_predictor(predictor):
    analysis = analyze_uploads([CELL], predictor, limits=UploadLimits())

    expected = predictor.predict_files([CELL])[0].probability
    cell = analysis.cells[0]
    assert cell.probability == expected
    assert cell.prediction == ("ALL" if expected >= 0.4 else "HEM")
    assert cell.error is None
    assert analysis.messages == []


def test_good_file_row_has_four_decimals(predictor):
    analysis = analyze_uploads([CELL], predictor, limits=UploadLimits())

    row = analysis.rows()[0]
    assert row[0] == CELL.name
    assert row[1] == f"{analysis.cells[0].probability:.4f}"
    assert row[3] == "0.4"


def test_good_file_draws_steps(predictor):
    analysis = analyze_uploads([CELL], predictor, limits=UploadLimits())

    steps = analysis.cells[0].steps
    assert steps.dtype == np.uint8
    assert steps.ndim == 3
    assert steps.shape[2] == 3


def test_corrupt_file_named_in_messages(predictor, bad_file):
    analysis = analyze_uploads([bad_file, CELL], predictor, limits=UploadLimits())

    assert "not a decodable" in analysis.cells[0].error
    assert analysis.cells[0].probability is None
    assert analysis.messages[0].startswith("bad.bmp: ")
    assert analysis.cells[1].probability is not None


def test_too_many_files_rejected(predictor):
    analysis = analyze_uploads([CELL, CELL, CELL], predictor, limits=UploadLimits(max_files=2))

    assert analysis.cells == []
    assert "3 files were uploaded" in analysis.messages[0]
    assert "at most 2" in analysis.messages[0]


def test_too_large_file_rejected(predictor, tmp_path):
    large = shutil.copy(CELL, tmp_path / "large.jpg")
    limits = UploadLimits(max_file_mb=CELL.stat().st_size / 2 / 1024 / 1024)

    analysis = analyze_uploads([large], predictor, limits=limits)

    assert "over the limit" in analysis.cells[0].error
    assert analysis.cells[0].probability is None
    assert analysis.messages[0].startswith("large.jpg: ")


def test_unsupported_type_rejected(predictor, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("cell notes")

    analysis = analyze_uploads([notes], predictor, limits=UploadLimits())

    assert "unsupported file type '.txt'" in analysis.cells[0].error


def test_no_files_asks_for_upload(predictor):
    analysis = analyze_uploads([], predictor, limits=UploadLimits())

    assert analysis.cells == []
    assert "Upload one or more" in analysis.messages[0]


@pytest.mark.parametrize("limits", [{"max_files": 0}, {"max_file_mb": 0}])
def test_limits_invalid_values(limits):
    with pytest.raises(ValueError):
        UploadLimits(**limits)


def test_explainer_missing_module(predictor, monkeypatch):
    monkeypatch.setitem(sys.modules, "leukemia.explain", None)

    explainer, reason = load_explainer(predictor)

    assert explainer is None
    assert reason.startswith("Grad-CAM explanations unavailable")


def test_explainer_draws_overlays(predictor):
    pytest.importorskip("leukemia.explain")
    explainer, reason = load_explainer(predictor)

    analysis = analyze_uploads([CELL], predictor, limits=UploadLimits(), explainer=explainer)

    size = predictor.preprocess.output_size
    assert reason is None
    assert analysis.cells[0].overlay.shape == (size, size, 3)
    assert analysis.cells[0].overlay.dtype == np.uint8


def test_explainer_keeps_probability(predictor):
    pytest.importorskip("leukemia.explain")
    explainer, _ = load_explainer(predictor)
    before = predictor.predict_files([CELL])[0].probability

    analyze_uploads([CELL], predictor, limits=UploadLimits(), explainer=explainer)

    assert predictor.predict_files([CELL])[0].probability == before


def test_find_checkpoints_lists_runs(model_file, tmp_path):
    other = tmp_path / "runs" / "second" / "model.pt"
    other.parent.mkdir(parents=True)
    shutil.copy(model_file, other)

    found = find_checkpoints(model_file, tmp_path / "runs")

    assert found == [model_file.resolve(), other.resolve()]


def test_find_checkpoints_missing_runs(model_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="runs folder not found"):
        find_checkpoints(model_file, tmp_path / "nowhere")


def test_cache_rejects_unoffered_file(model_file, tmp_path):
    cache = PredictorCache([model_file])

    with pytest.raises(ValueError, match="not one of the offered"):
        cache.get(tmp_path / "other.pt")


def test_cache_loads_once(model_file):
    cache = PredictorCache([model_file])

    assert cache.get(model_file)[0] is cache.get(model_file)[0]


def test_cli_app_without_gradio(model_file, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "gradio", None)
    monkeypatch.delitem(sys.modules, "leukemia.app.server", raising=False)

    with caplog.at_level(logging.ERROR, logger="leukemia"):
        code = main(["app", "--checkpoint", str(model_file)])

    assert code == 2
    assert "pip install 'leukemia[app]'" in caplog.text
