"""The Gradio page of ``leukemia app``: upload cells, see the steps, the probability and Grad-CAM.

This module only lays out the page and wires events; ``leukemia.app.analysis`` does the work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from leukemia.app.analysis import (
    TABLE_HEADERS,
    Analysis,
    CellReport,
    PredictorCache,
    UploadLimits,
    analyze_uploads,
    find_checkpoints,
    load_explainer,
)
from leukemia.data.images import IMAGE_EXTENSIONS
from leukemia.inference.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

DISCLAIMER = "For research use only. Not for diagnosis."
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Caption, steps figure and Grad-CAM overlay (or None) of one classified cell.
Figures = tuple[str, np.ndarray, np.ndarray | None]
# Uploaded files are deleted an hour after upload, checked every hour.
DELETE_CACHE = (3600, 3600)


def build_app(predictors: PredictorCache, *, limits: UploadLimits, runs: Path | None = None) -> gr.Blocks:
    """Lay out the page for the predictors' model files; the first is selected.

    Args:
        predictors: the model files offered in the dropdown, loaded on first use.
        limits: the largest number and size of uploaded files.
        runs: the folder the model files were found in, to show shorter names.
    """
    choices = [(_label(path, runs), str(path)) for path in predictors.checkpoints]

    def on_analyze(files: list[str] | None, checkpoint: str) -> tuple:
        return _render(_analyze(predictors, checkpoint, files or [], limits))

    with gr.Blocks(title="leukemia: ALL vs HEM", analytics_enabled=False, delete_cache=DELETE_CACHE) as app:
        gr.Markdown("# ALL vs HEM classification of single white blood cells")
        gr.Markdown(f"**{DISCLAIMER}** The outputs must not be used to make clinical decisions.",
                    elem_id="research-notice")
        checkpoint = gr.Dropdown(choices=choices, value=choices[0][1], label="Model file", elem_id="checkpoint")
        files = gr.File(
            file_count="multiple",
            file_types=[*IMAGE_EXTENSIONS, *(extension.upper() for extension in IMAGE_EXTENSIONS)],
            label=f"Cell images (BMP, PNG, JPEG, TIFF; at most {limits.max_files} files of "
                  f"{limits.max_file_mb:g} MB each)",
            elem_id="uploads",
        )
        messages = gr.Markdown(elem_id="messages")
        table = gr.Dataframe(headers=list(TABLE_HEADERS), interactive=False, label="Results", elem_id="results")
        figures = gr.State([])

        @gr.render(inputs=figures)
        def show_figures(values: list[Figures]) -> None:
            _figure_rows(values)

        outputs = [messages, table, figures]
        files.change(on_analyze, inputs=[files, checkpoint], outputs=outputs)
        checkpoint.change(on_analyze, inputs=[files, checkpoint], outputs=outputs)
    return app


def launch(
    checkpoint: Path,
    *,
    runs: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    limits: UploadLimits = UploadLimits(),
    block: bool = True,
) -> gr.Blocks:
    """Load the model, build the page and serve it on ``host:port``.

    With ``block=False`` the server runs in a background thread; stop it with ``app.close()``.

    Raises:
        FileNotFoundError: the model file or the runs folder does not exist.
        CheckpointError: the model file is not a valid model file of this tool.
        RuntimeError: the server cannot listen on ``host:port``.
    """
    # Load the default model now, so a bad model file stops the command instead of the first upload.
    predictors = PredictorCache(find_checkpoints(checkpoint, runs), device="cpu")
    predictors.get(predictors.checkpoints[0])
    app = build_app(predictors, limits=limits, runs=runs)
    if host not in LOOPBACK_HOSTS:
        logger.warning("the app has no login: anyone who can reach %s:%d can upload images to it", host, port)

    app.queue(default_concurrency_limit=1)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            max_file_size=limits.max_file_bytes,
            prevent_thread_lock=True,
            show_error=True,
            ssr_mode=False,
            quiet=True,
        )
    except OSError as error:
        logger.debug("Gradio could not start: %s", error)
        raise RuntimeError(f"cannot serve on {host}:{port}: the port is in use or the address is not "
                           "available here; pass another --port or --host") from error
    logger.info("serving %d model file(s) on http://%s:%d", len(predictors.checkpoints), host, port)
    if block:
        app.block_thread()
    return app


def _analyze(predictors: PredictorCache, checkpoint: str, files: list[str], limits: UploadLimits) -> Analysis | str:
    try:
        predictor, lock = predictors.get(checkpoint)
    except (FileNotFoundError, ValueError) as error:
        # CheckpointError is a ValueError: a corrupt model file found under the runs folder.
        kind = "model file rejected" if isinstance(error, CheckpointError) else "model file unavailable"
        logger.warning("%s: %s", kind, error)
        return f"{kind}: {error}"

    with lock:
        explainer, reason = load_explainer(predictor)
        analysis = analyze_uploads([Path(file) for file in files], predictor, limits=limits, explainer=explainer)
    if reason and analysis.cells:
        analysis.messages.append(reason)
    return analysis


def _render(analysis: Analysis | str) -> tuple:
    """Turn an analysis, or a message instead of one, into the messages, table and cell reports."""
    if isinstance(analysis, str):
        return _markdown_list([analysis]), pd.DataFrame(columns=list(TABLE_HEADERS)), []

    table = pd.DataFrame(analysis.rows(), columns=list(TABLE_HEADERS))
    figures = [(_caption(cell, analysis.threshold), cell.steps, cell.overlay)
               for cell in analysis.cells if cell.steps is not None]
    return _markdown_list(analysis.messages), table, figures


def _figure_rows(figures: list[Figures]) -> None:
    """Lay out one row per classified cell: the preprocessing steps, and the Grad-CAM overlay when there is one."""
    # No "share" button: it would post the images to Hugging Face.
    buttons = ["download", "fullscreen"]
    for caption, steps, overlay in figures:
        gr.Markdown(f"**{_escape_markdown(caption)}**")
        with gr.Row(equal_height=True):
            gr.Image(steps, show_label=False, format="png", buttons=buttons, scale=5)
            if overlay is not None:
                gr.Image(overlay, show_label=False, format="png", buttons=buttons, scale=1)


def _caption(cell: CellReport, threshold: float) -> str:
    caption = f"{cell.name}: probability of ALL {cell.probability:.4f}, {cell.prediction} (threshold {threshold:g})"
    if cell.overlay is not None:
        caption += "; right: Grad-CAM, red where the model sees evidence for ALL"
    return caption


def _markdown_list(messages: list[str]) -> str:
    return "\n".join(f"- {_escape_markdown(message)}" for message in messages)


def _escape_markdown(text: str) -> str:
    """Backslash-escape Markdown syntax so file names and errors show as typed."""
    return "".join(f"\\{char}" if char in "\\`*_{}[]()<>#+-.!|~" else char for char in text)


def _label(path: Path, runs: Path | None) -> str:
    if runs is not None and path.is_relative_to(Path(runs).resolve()):
        return str(path.relative_to(Path(runs).resolve()))
    return str(path)
