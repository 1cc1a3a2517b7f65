"""Turning uploaded cell images into results for the web app, with no web framework involved.

The probability of ALL comes from ``Predictor.predict_files``, the same call ``leukemia
predict`` makes, so the app and the command give the same number for the same file, model,
device and precision.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from leukemia import CLASS_NAMES
from leukemia.data.images import IMAGE_EXTENSIONS, is_image_file, read_image
from leukemia.inference.predictor import CellPrediction, Predictor
from leukemia.preprocessing.cell import preprocess_cell
from leukemia.preprocessing.figure import draw_steps

logger = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024
TABLE_HEADERS = ("file", "probability of ALL", "prediction", "threshold", "error")

# Takes preprocessed (S, S, 3) uint8 RGB cells, returns one (S, S, 3) uint8 RGB overlay per cell.
Explainer = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class UploadLimits:
    """How many files one analysis accepts, and how large each may be.

    Attributes:
        max_files: files per analysis. More are rejected as a whole.
        max_file_mb: largest accepted file in MB (1 MB = 1,048,576 bytes). Larger files get an error.
    """

    max_files: int = 20
    max_file_mb: float = 20.0

    def __post_init__(self) -> None:
        if self.max_files < 1:
            raise ValueError(f"invalid max_files {self.max_files}; it must be 1 or more")
        if self.max_file_mb <= 0:
            raise ValueError(f"invalid max_file_mb {self.max_file_mb}; it must be more than 0")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * BYTES_PER_MB)


@dataclass
class CellReport:
    """The result the app shows for one uploaded file.

    Attributes:
        name: the file name as uploaded.
        probability: probability of ALL in [0, 1], or None when the file could not be classified.
        prediction: "ALL" or "HEM" at the model's threshold, or None.
        error: why the file could not be classified, or None.
        steps: figure of the preprocessing steps, (H, W, 3) uint8 RGB, or None.
        overlay: Grad-CAM overlay on the preprocessed cell, (S, S, 3) uint8 RGB, or None.
    """

    name: str
    probability: float | None = None
    prediction: str | None = None
    error: str | None = None
    steps: np.ndarray | None = None
    overlay: np.ndarray | None = None


@dataclass
class Analysis:
    """The results of one upload: a report per file, in upload order, and notes for the page."""

    threshold: float
    cells: list[CellReport] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def rows(self) -> list[list[str]]:
        """Return one table row per file (see ``TABLE_HEADERS``); the probability has 4 decimals."""
        return [
            [
                cell.name,
                "" if cell.probability is None else f"{cell.probability:.4f}",
                cell.prediction or "",
                f"{self.threshold:g}",
                cell.error or "",
            ]
            for cell in self.cells
        ]


def analyze_uploads(
    paths: Sequence[Path | str],
    predictor: Predictor,
    *,
    limits: UploadLimits,
    explainer: Explainer | None = None,
) -> Analysis:
    """Classify uploaded cell images and draw their preprocessing steps and explanations.

    Files that are too large, not images, or cannot be decoded get an error in their report;
    the other files are still classified. Too many files are rejected as a whole.

    Args:
        paths: the uploaded files; their names are shown as they are.
        predictor: the loaded model, with the preprocessing settings and threshold it was trained with.
        limits: the largest number and size of files.
        explainer: draws Grad-CAM overlays (see ``load_explainer``); None shows no overlays.

    Returns:
        The analysis. Its ``messages`` are the problems to show above the results.
    """
    analysis = Analysis(threshold=predictor.threshold)
    paths = [Path(path) for path in paths]
    if not paths:
        analysis.messages.append("Upload one or more cell images (BMP, PNG, JPEG or TIFF).")
        return analysis
    if len(paths) > limits.max_files:
        analysis.messages.append(
            f"{len(paths)} files were uploaded, but one analysis takes at most {limits.max_files}; "
            f"remove {len(paths) - limits.max_files} and try again."
        )
        return analysis

    # Reject files by type and size before reading any of them.
    analysis.cells = [CellReport(path.name, error=_upload_problem(path, limits)) for path in paths]
    accepted = [(cell, path) for cell, path in zip(analysis.cells, paths) if cell.error is None]

    # Probabilities exactly as `leukemia predict` computes them.
    predictions = predictor.predict_files([path for _, path in accepted])
    for (cell, _), prediction in zip(accepted, predictions):
        _fill_prediction(cell, prediction)

    # Steps figures and explanations for the classified cells.
    classified = [(cell, path) for cell, path in accepted if cell.error is None]
    cells = _draw_steps(classified, predictor)
    if explainer is not None and cells:
        _explain(classified, cells, explainer, analysis.messages)

    analysis.messages.extend(f"{cell.name}: {cell.error}" for cell in analysis.cells if cell.error)
    logger.info("analysed %d uploaded files, %d with errors", len(paths),
                sum(1 for cell in analysis.cells if cell.error))
    return analysis


def load_explainer(predictor: Predictor) -> tuple[Explainer | None, str | None]:
    """Return a Grad-CAM explainer for the predictor's model, or None and the reason.

    Grad-CAM needs the PyTorch model, so ONNX models get no explanations, and neither does
    an installation without the ``leukemia.explain`` package or its dependencies.
    """
    if predictor.model is None:
        return None, "Grad-CAM explanations unavailable: the model runs with ONNX Runtime, not PyTorch."
    try:
        from leukemia.explain import gradcam_overlays
    except ImportError as error:
        return None, f"Grad-CAM explanations unavailable: {error}."

    def explain(images: list[np.ndarray]) -> list[np.ndarray]:
        return gradcam_overlays(predictor.model, images)

    return explain, None


def find_checkpoints(checkpoint: Path, runs: Path | None = None) -> list[Path]:
    """Return the given model file followed by every ``model.pt`` under ``runs``, without repeats.

    Raises:
        FileNotFoundError: ``runs`` is given but is not a folder.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "model.pt"
    found = [checkpoint.resolve()]
    if runs is None:
        return found
    runs = Path(runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"runs folder not found: {runs}; pass a folder that contains run directories")

    for path in sorted(runs.rglob("model.pt")):
        if path.resolve() not in found:
            found.append(path.resolve())
    if len(found) == 1:
        logger.warning("no model.pt found under %s; only %s is offered", runs, checkpoint)
    return found


class PredictorCache:
    """A store of predictors: loads each offered model file on first use and rejects any other file.

    Each model has a lock, held during an analysis, because Grad-CAM changes the model's
    gradient flags for its duration.
    """

    def __init__(self, checkpoints: Sequence[Path], *, device: str = "cpu") -> None:
        self.checkpoints = [Path(path) for path in checkpoints]
        self.device = device
        self._loaded: dict[Path, tuple[Predictor, threading.Lock]] = {}
        self._loading = threading.Lock()

    def get(self, checkpoint: Path | str) -> tuple[Predictor, threading.Lock]:
        """Return the predictor of an offered model file and its lock.

        Raises:
            ValueError: the file is not one of the offered checkpoints.
            FileNotFoundError, CheckpointError: the file cannot be loaded.
        """
        checkpoint = Path(checkpoint)
        if checkpoint not in self.checkpoints:
            raise ValueError(f"{checkpoint} is not one of the offered model files; choose one from the list")
        with self._loading:
            if checkpoint not in self._loaded:
                logger.info("loading %s", checkpoint)
                self._loaded[checkpoint] = (Predictor(checkpoint, device=self.device), threading.Lock())
            return self._loaded[checkpoint]


def _upload_problem(path: Path, limits: UploadLimits) -> str | None:
    if not is_image_file(path):
        return f"unsupported file type {path.suffix or '(none)'!r}; upload {', '.join(IMAGE_EXTENSIONS)} files"
    if not path.is_file():
        return "the upload did not arrive; upload the file again"
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        return (f"{size / BYTES_PER_MB:.1f} MB is over the limit of {limits.max_file_mb:g} MB per file; "
                "upload a smaller image")
    return None


def _fill_prediction(cell: CellReport, prediction: CellPrediction) -> None:
    if prediction.error is not None:
        cell.error = prediction.error
        return
    cell.probability = prediction.probability
    cell.prediction = CLASS_NAMES[prediction.prediction]


def _draw_steps(classified: list[tuple[CellReport, Path]], predictor: Predictor) -> list[np.ndarray]:
    """Draw each cell's steps figure into its report; return the preprocessed cells."""
    outputs = []
    with tempfile.TemporaryDirectory(prefix="leukemia-app-") as folder:
        figure_path = Path(folder) / "steps.png"
        for cell, path in classified:
            result = preprocess_cell(read_image(path), predictor.preprocess)
            draw_steps(result, figure_path, title=cell.name)
            cell.steps = cv2.cvtColor(cv2.imread(str(figure_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            outputs.append(result.output)
    return outputs


def _explain(
    classified: list[tuple[CellReport, Path]],
    cells: list[np.ndarray],
    explainer: Explainer,
    messages: list[str],
) -> None:
    try:
        overlays = explainer(cells)
    except (ValueError, RuntimeError) as error:
        logger.warning("Grad-CAM failed: %s", error)
        messages.append(f"Grad-CAM explanations unavailable for this model: {error}")
        return
    for (cell, _), overlay in zip(classified, overlays):
        cell.overlay = overlay
