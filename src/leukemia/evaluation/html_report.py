"""A self-contained HTML page of an evaluation report, for reading a run in a browser.

``write_html_report`` reads the files that ``evaluation.report.write_report`` put into a run or
report folder and writes ``report.html`` next to them. Every figure and cell image is embedded
as a base64 PNG data URI and the styles are inline, so the page opens alone, offline, and can be
mailed or archived as one file. Every section has a stable ``id`` (``notice``, ``notes``,
``metrics``, ``confusion-matrix``, ``roc``, ``training-curves``, ``per-subject``, ``errors``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from leukemia import CLASS_NAMES
from leukemia.data.images import ImageReadError, read_image
from leukemia.models.classifier import CellClassifier
from leukemia.preprocessing.cache import write_atomically
from leukemia.preprocessing.cell import BlankImageError, PreprocessConfig, preprocess_cell

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
NOTICE = "For research use only. Not for diagnosis."
MAX_ERRORS = 8
# Side in pixels of gallery images that are shown without preprocessing.
PREVIEW_SIZE = 224

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 62em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.notice { background: #fff4d6; border: 1px solid #e0b84c; padding: 0.6em 1em; font-weight: bold; }
.note { background: #fde2e2; border: 1px solid #d77; padding: 0.6em 1em; }
.meta { color: #555; font-size: 0.92em; }
.figures img { max-width: 48%; margin-right: 1%; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; padding: 0.5em; }
figure img { width: 160px; height: 160px; object-fit: contain; background: #000; }
figcaption { font-size: 0.85em; max-width: 330px; overflow-wrap: anywhere; }
"""


@dataclass
class GalleryItem:
    """One wrong prediction of the gallery, with the images to show (RGB uint8) or why there are none."""

    file: str
    subject: str
    label: int
    probability: float
    cell: np.ndarray | None = None
    overlay: np.ndarray | None = None
    problem: str | None = None


def write_html_report(
    report_dir: Path,
    *,
    model: CellClassifier | None = None,
    preprocess: PreprocessConfig | None = None,
    max_errors: int = MAX_ERRORS,
    title: str = "leukemia evaluation report",
) -> Path:
    """Write ``report.html`` into a folder that ``write_report`` filled; return its path.

    Args:
        report_dir: the run or report folder, with ``metrics.json`` and, where present,
            ``predictions.csv``, ``per_subject.csv`` and the PNG figures.
        model: the evaluated classifier; with ``preprocess`` the error gallery gets a Grad-CAM
            overlay of the ALL logit per cell. It is not changed.
        preprocess: the model's preprocessing settings; the gallery shows each cell as the
            model saw it. Without them it shows the original image.
        max_errors: most wrong predictions in the gallery, the most confident first.
        title: the page's heading.

    Raises:
        FileNotFoundError: ``report_dir`` has no ``metrics.json``.
        ValueError: ``model`` is given without ``preprocess``.
    """
    report_dir = Path(report_dir)
    metrics_path = report_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found; write_report (or `leukemia train`/`evaluate`) "
                                "writes it, then the HTML report can be made from that folder")
    if model is not None and preprocess is None:
        raise ValueError("Grad-CAM needs the model's preprocessing settings; pass preprocess=... with model=...")

    # Inputs: the report files, then the cells of the most confident errors.
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    predictions = _read_csv(report_dir / "predictions.csv")
    errors = most_confident_errors(predictions, limit=max_errors)
    gallery = _gallery_items(errors, model, preprocess)

    # The page: one section per part of the report, notice and notes first.
    sections = [
        f'<section id="notice"><p class="notice">{_text(NOTICE)}</p></section>',
        _notes_section(metrics.get("notes", [])),
        _metrics_section(metrics),
        _figure_section("confusion-matrix", "Confusion matrix (test)", [report_dir / "confusion_matrix.png"]),
        _figure_section("roc", "ROC curve (test, ALL positive)", [report_dir / "roc.png"]),
        _figure_section("training-curves", "Training curves",
                        [report_dir / "accuracy.png", report_dir / "loss.png"]),
        _per_subject_section(report_dir / "per_subject.csv"),
        _errors_section(gallery, n_wrong=sum(1 for row in predictions if _is_wrong(row)), gradcam=model is not None),
    ]
    page = _page(title, _run_line(metrics), sections)
    path = report_dir / REPORT_FILE
    write_atomically(path, page.encode("utf-8"))
    logger.info("HTML report: %s", path)
    return path


def most_confident_errors(rows: list[dict], *, limit: int = MAX_ERRORS) -> list[dict]:
    """Return the wrong rows of ``predictions.csv`` with the largest |probability - label|, at most ``limit``.

    Ties are broken by file name so the choice is reproducible.
    """
    wrong = [row for row in rows if _is_wrong(row)]
    wrong.sort(key=lambda row: (-abs(float(row["probability"]) - int(row["label"])), row["file"]))
    return wrong[:limit]


def image_data_uri(image: np.ndarray) -> str:
    """Encode an (H, W, 3) uint8 RGB image as a ``data:image/png;base64,...`` URI."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV failed to encode an image of shape {image.shape} and dtype {image.dtype} as PNG")
    return _png_uri(encoded.tobytes())


def _gallery_items(
    errors: list[dict], model: CellClassifier | None, preprocess: PreprocessConfig | None
) -> list[GalleryItem]:
    items = []
    for row in errors:
        item = GalleryItem(row["file"], row.get("subject", ""), int(row["label"]), float(row["probability"]))
        try:
            image = read_image(row["file"])
            item.cell = preprocess_cell(image, preprocess).output if preprocess is not None else _preview(image)
        except ImageReadError as error:
            item.problem = f"image unavailable: {error.reason}"
        except BlankImageError as error:
            item.problem = f"no cell found: {error}"
        items.append(item)

    with_cells = [item for item in items if item.cell is not None]
    if model is None or not with_cells:
        return items
    # Imported here so that reports without Grad-CAM do not load pytorch_grad_cam.
    from leukemia.explain.gradcam import gradcam_overlays

    try:
        overlays = gradcam_overlays(model, [item.cell for item in with_cells])
    except (ValueError, RuntimeError) as error:
        logger.warning("no Grad-CAM in the HTML report: %s", error)
        return items
    for item, overlay in zip(with_cells, overlays):
        item.overlay = overlay
    return items


def _notes_section(notes: list[str]) -> str:
    if not notes:
        return ""
    paragraphs = "".join(f'<p class="note">{_text(note)}</p>' for note in notes)
    return f'<section id="notes"><h2>Notes</h2>{paragraphs}</section>'


def _metrics_section(metrics: dict) -> str:
    splits = {name: _metric_values(metrics[name]) for name in ("test", "validation") if name in metrics}
    labels = list(next(iter(splits.values()), {}))
    header = "".join(f"<th>{_text(name)}</th>" for name in splits)
    body = "".join(
        f"<tr><td>{_text(label)}</td>" + "".join(f"<td>{_text(values[label])}</td>" for values in splits.values())
        + "</tr>"
        for label in labels
    )
    return f'<section id="metrics"><h2>Metrics</h2><table><tr><th>metric</th>{header}</tr>{body}</table></section>'


def _metric_values(split: dict) -> dict[str, str]:
    """Return the table rows of one split of metrics.json, as {row label: formatted value}."""
    values = {
        "images": str(split["n_images"]),
        "threshold on P(ALL)": f"{split['threshold']:.3f}",
        "accuracy": _number(split["accuracy"]),
        "weighted F1 (challenge metric)": _number(split["f1_weighted"]),
        "balanced accuracy": _number(split["balanced_accuracy"]),
        "ROC AUC": _number(split["roc_auc"]),
        "sensitivity (ALL recall)": _number(split["sensitivity"]),
        "specificity (HEM recall)": _number(split["specificity"]),
    }
    for name in reversed(CLASS_NAMES):
        per_class = split["per_class"][name]
        for measure in ("precision", "recall", "f1"):
            values[f"{name} {measure}"] = _number(per_class[measure])
        values[f"{name} images / subjects"] = f"{per_class.get('n_images', '?')} / {per_class.get('n_subjects', '?')}"
    confusion = split["confusion_matrix"]
    for key, meaning in (("tp", "ALL called ALL"), ("fn", "ALL called HEM"), ("tn", "HEM called HEM"),
                         ("fp", "HEM called ALL")):
        values[f"{meaning} ({key.upper()})"] = str(confusion[key])
    return values


def _figure_section(section_id: str, heading: str, paths: list[Path]) -> str:
    present = [path for path in paths if path.is_file()]
    if not present:
        names = ", ".join(path.name for path in paths)
        content = f"<p>Not available: {_text(names)} is not in this folder.</p>"
    else:
        content = "".join(f'<img src="{_png_uri(path.read_bytes())}" alt="{_text(path.stem)}">' for path in present)
    return f'<section id="{section_id}" class="figures"><h2>{_text(heading)}</h2>{content}</section>'


def _per_subject_section(path: Path) -> str:
    rows = _read_csv(path)
    if not rows:
        return '<section id="per-subject"><h2>Per subject (test)</h2><p>No per-subject results.</p></section>'
    columns = list(rows[0])
    header = "".join(f"<th>{_text(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td>{_text(row[column])}</td>" for column in columns) + "</tr>" for row in rows)
    explanation = ("<p>Each subject has one class, so a subject's accuracy is the share of its cells called "
                   "correctly; no per-subject ROC AUC exists.</p>")
    return (f'<section id="per-subject"><h2>Per subject (test)</h2>{explanation}'
            f"<table><tr>{header}</tr>{body}</table></section>")


def _errors_section(items: list[GalleryItem], *, n_wrong: int, gradcam: bool) -> str:
    heading = "<h2>Most confident errors (test)</h2>"
    if not items:
        return f'<section id="errors">{heading}<p>No wrong predictions.</p></section>'
    explanation = f"<p>{len(items)} of {n_wrong} wrong predictions, the most confident first."
    if gradcam:
        explanation += (" Right of each cell: Grad-CAM of the ALL logit. Red marks the regions that raise the "
                        "probability of ALL, and an all-blue map means that no region does.")
    figures = "".join(_gallery_figure(item) for item in items)
    return f'<section id="errors">{heading}{explanation}</p><div class="gallery">{figures}</div></section>'


def _gallery_figure(item: GalleryItem) -> str:
    images = ""
    if item.cell is not None:
        images += f'<img src="{image_data_uri(item.cell)}" alt="cell">'
    if item.overlay is not None:
        images += f'<img src="{image_data_uri(item.overlay)}" alt="Grad-CAM overlay">'
    lines = [
        Path(item.file).name,
        f"subject {item.subject or 'unknown'}",
        f"true {CLASS_NAMES[item.label]}, called {CLASS_NAMES[1 - item.label]}, P(ALL) = {item.probability:.3f}",
    ]
    if item.problem:
        lines.append(item.problem)
    caption = "<br>".join(_text(line) for line in lines)
    return f"<figure>{images}<figcaption>{caption}</figcaption></figure>"


def _run_line(metrics: dict) -> str:
    parts = []
    if "checkpoint" in metrics:
        parts.append(f"model: {metrics['checkpoint']}")
    if "data" in metrics and "path" in metrics["data"]:
        parts.append(f"data: {metrics['data']['path']}")
    if "training" in metrics:
        parts.append(f"training: {metrics['training']['recipe']}")
    if "split" in metrics and "rule" in metrics["split"]:
        parts.append(f"split: {metrics['split']['rule']}")
    skipped = metrics.get("data", {}).get("skipped_images")
    if skipped is not None:
        parts.append(f"skipped images: {skipped}")
    return " | ".join(parts)


def _page(title: str, run_line: str, sections: list[str]) -> str:
    body = "\n".join(section for section in sections if section)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_text(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_text(title)}</h1>\n<p class=\"meta\">{_text(run_line)}</p>\n{body}\n</body>\n</html>\n"
    )


def _preview(image: np.ndarray) -> np.ndarray:
    scale = PREVIEW_SIZE / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _is_wrong(row: dict) -> bool:
    return int(row["label"]) != int(row["prediction"])


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _number(value: float | None) -> str:
    return "undefined (one class only)" if value is None else f"{value:.4f}"


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)
