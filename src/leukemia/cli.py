"""The ``leukemia`` command: train, evaluate, predict and preprocess.

For research use only; the tool is not a medical device and must not be used for diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import warnings
from pathlib import Path

from leukemia import CLASS_NAMES, __version__

logger = logging.getLogger("leukemia")

DISCLAIMER = "For research use only. Not for diagnosis."


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; finished work is kept: continue a train run with `leukemia train --resume RUN_DIR`, "
                     "a cv run by rerunning the same command")
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="leukemia",
        description=f"Classify single white blood cell images as ALL (blast) or HEM (normal). {DISCLAIMER}",
    )
    parser.add_argument("--version", action="version", version=f"leukemia {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_train(commands)
    _add_cv(commands)
    _add_compare(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_preprocess(commands)
    _add_export(commands)
    _add_app(commands)
    return parser


def _add_preprocess_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("preprocessing")
    group.add_argument("--crop", choices=("bbox", "fixed"), default="bbox",
                       help="bbox: crop the cell's bounding box (cell fills the frame); fixed: a window of "
                            "--window pixels centred on the cell, which keeps cell size (default: bbox)")
    group.add_argument("--window", type=int, default=320, help="side of the fixed crop window in pixels (default: 320)")
    group.add_argument("--margin", type=float, default=0.1,
                       help="bbox margin per side as a fraction of the box's longer side (default: 0.1)")
    group.add_argument("--clahe-clip", type=float, default=3.0, help="CLAHE clip limit (default: 3.0)")
    group.add_argument("--clahe-grid", type=int, default=8, help="CLAHE tiles per axis (default: 8)")
    group.add_argument("--image-size", type=int, default=224, help="output side in pixels (default: 224)")


def _preprocess_config(args: argparse.Namespace):
    from leukemia.preprocessing.cell import PreprocessConfig

    return PreprocessConfig(
        clahe_clip_limit=args.clahe_clip,
        clahe_tile_grid=args.clahe_grid,
        crop=args.crop,
        margin=args.margin,
        window=args.window,
        output_size=args.image_size,
    )


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="backbone precision; auto picks bfloat16 on CPUs with native bfloat16 and on recent "
                             "GPUs, float16 on other GPUs, else float32 (default: auto)")


def _add_common_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache of preprocessed cells and features (default: $LEUKEMIA_CACHE or ~/.cache/leukemia)")
    parser.add_argument("--workers", type=int, default=None,
                        help="preprocessing processes (default: every core; 1 runs in this process)")


def _add_train(commands: argparse._SubParsersAction) -> None:
    from leukemia.training.options import add_training_options

    parser = commands.add_parser(
        "train", allow_abbrev=False, help="the main job: preprocess, split by subject, train, evaluate",
        description="Settings resolve in order: defaults, the --config YAML file, then the options given. The "
                    "resolved settings are saved as config.yaml in the run directory and inside model.pt.")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue an interrupted run from its last checkpoint with the settings in "
                             "RUN_DIR/config.yaml; only --cache-dir and --workers may be given with it")
    add_training_options(parser, out_help="run directory to create; must be new or empty")
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from leukemia import distributed
    from leukemia.training.options import RESUME_OPTIONS, given_settings, resolve_config
    from leukemia.training.run import resume_training, train

    if args.resume is not None:
        # Settings come from the run's config.yaml; only options that leave the results unchanged may differ.
        given = [flag for flag in given_settings(args) if flag.removeprefix("--").replace("-", "_") not in RESUME_OPTIONS]
        given += [f"--{name}" for name in ("config", "data", "out") if hasattr(args, name)]
        if given:
            raise ValueError(f"--resume continues {args.resume} with the settings in its config.yaml; drop "
                             f"{', '.join(given)} (only --cache-dir and --workers may be given with --resume)")
        result = resume_training(args.resume, cache_dir=getattr(args, "cache_dir", None),
                                 workers=getattr(args, "workers", None))
        if distributed.is_main():
            _print_train_summary(result)
        return 0
    if not hasattr(args, "config") and not (hasattr(args, "data") and hasattr(args, "out")):
        raise ValueError("leukemia train needs --data and --out (or a --config file that sets them), or --resume "
                         "RUN_DIR to continue an interrupted run")

    result = train(resolve_config(args))
    if distributed.is_main():
        _print_train_summary(result)
    return 0


def _add_cv(commands: argparse._SubParsersAction) -> None:
    from leukemia.training.options import add_training_options

    parser = commands.add_parser(
        "cv", allow_abbrev=False, help="cross-validation grouped by subject, with bootstrap intervals",
        description="Trains one run per fold into OUT/fold_K (the fold is the test split; validation subjects come "
                    "from the other folds), then pools the held-out predictions into cv_report.md and "
                    "cv_summary.json: each metric per fold, mean and spread, and a 95 % interval from a bootstrap "
                    "over subjects. Rerun the same command to continue an interrupted cross-validation.")
    parser.add_argument("--folds", type=int, default=None, metavar="K",
                        help="number of folds; by default the official C-NMC folds when the data has them, "
                             "otherwise 5 folds of whole subjects")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    # The folds decide the test split, so the main job's test share does not apply.
    add_training_options(parser, out_help="folder for the folds' runs and the summary; new or empty, or that of an "
                                          "interrupted cv with the same settings, which then continues",
                         skip=("--test-fraction",))
    parser.set_defaults(handler=_run_cv)


def _run_cv(args: argparse.Namespace) -> int:
    from leukemia.training.cv import CV_REPORT, cross_validate, format_report
    from leukemia.training.options import resolve_config

    if not hasattr(args, "config") and not (hasattr(args, "data") and hasattr(args, "out")):
        raise ValueError("leukemia cv needs --data and --out, or a --config file that sets them")
    if args.resamples < 100:
        raise ValueError(f"invalid --resamples {args.resamples}; use 100 or more (2000 is usual)")
    config = resolve_config(args, cv_folds=args.folds)
    result = cross_validate(config, n_resamples=args.resamples)
    print(format_report(result.summary))
    print(f"report: {result.out / CV_REPORT}; each fold's run: {result.out}/fold_K")
    return 0


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare", allow_abbrev=False, help="compare two cross-validations of the same data, paired by subject",
        description="Prints each metric of both with its 95 % interval, and the difference SECOND - FIRST with an "
                    "interval from the same subject resamples (paired).")
    parser.add_argument("first", type=Path, help="--out folder of a finished `leukemia cv` (the baseline)")
    parser.add_argument("second", type=Path, help="--out folder of another `leukemia cv` on the same data")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--out", type=Path, default=None, help="also write the comparison to this JSON file")
    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from leukemia.training.cv import compare, format_comparison

    result = compare(args.first, args.second, n_resamples=args.resamples)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(format_comparison(result))
    return 0


def _print_train_summary(result) -> None:
    _print_summary(result.run_dir, result.metrics)
    print(f"model file:         {result.model_path}")
    print(f"checkpoints:        {result.run_dir / 'checkpoints'} (best.ckpt, last.ckpt)")
    print(f"training history:   {result.run_dir / 'logs' / 'metrics.csv'}")
    if (result.run_dir / "logs" / "finetune").is_dir():
        print(f"fine-tuning:        {result.run_dir / 'checkpoints' / 'finetune'}, "
              f"{result.run_dir / 'logs' / 'finetune' / 'metrics.csv'}")
    print(f"split:              {result.run_dir / 'split.csv'}")
    print(f"settings:           {result.run_dir / 'config.yaml'} (rerun with --config)")


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("evaluate", allow_abbrev=False, help="evaluate a model file on a labeled data set")
    parser.add_argument("checkpoint", type=Path, help="model.pt written by `leukemia train`, or its run directory")
    parser.add_argument("--data", type=Path, required=True, help="labeled data folder or CSV manifest")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="evaluate even when the data shares subjects with the model's training or validation "
                             "split (read from split.csv next to the model); the report then says the results "
                             "are optimistic")
    _add_common_data_options(parser)
    _add_engine_options(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from leukemia.evaluation.evaluate import evaluate

    metrics = evaluate(args.checkpoint, args.data, args.out, cache_dir=args.cache_dir, workers=args.workers,
                       batch_size=args.batch_size, device=args.device, precision=args.precision,
                       allow_overlap=args.allow_overlap)
    _print_summary(args.out, metrics)
    return 0


def _add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("predict", allow_abbrev=False, help="predict ALL or HEM for images, folders or a CSV of paths")
    parser.add_argument("checkpoint", type=Path,
                        help="model.pt written by `leukemia train`, its run directory, or an ONNX file from "
                             "`leukemia export` (run with ONNX Runtime)")
    parser.add_argument("inputs", type=Path, nargs="+",
                        help="image files, folders (searched recursively) or CSV files with a 'path' column")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file, .csv or .json (default: CSV on standard output)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--cam", type=Path, default=None, metavar="DIR",
                        help="write a Grad-CAM overlay PNG of the ALL logit per classified image into DIR "
                             "and add its path as a 'cam' column (needs model.pt, not ONNX)")
    _add_engine_options(parser)
    parser.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from leukemia import distributed
    from leukemia.inference.engine import resolve_device
    from leukemia.inference.inputs import collect_input_files
    from leukemia.inference.predictor import Predictor
    from leukemia.data.discovery import parse_subject

    # Under torchrun or srun each process classifies its share of the files; rank 0 writes the output.
    distributed.init_distributed(device_type=resolve_device(args.device).type)
    predictor = Predictor(args.checkpoint, device=distributed.local_device(args.device), precision=args.precision)
    if args.cam is not None and predictor.model is None:
        raise ValueError(f"--cam needs the PyTorch model file; {args.checkpoint} is an ONNX export, so pass "
                         "the model.pt it was exported from")
    paths = collect_input_files(args.inputs)
    mine = predictor.predict_files(distributed.shard(paths), batch_size=args.batch_size)
    results = distributed.gather_shards(mine)
    cams = _write_cams(predictor, results, args.cam) if args.cam is not None else {}
    if not distributed.is_main():
        return 0
    rows = [
        {
            "file": str(result.path),
            "subject": parse_subject(result.path.name) or "",
            "probability_all": None if result.probability is None else round(result.probability, 6),
            "prediction": "" if result.prediction is None else CLASS_NAMES[result.prediction],
            "threshold": predictor.threshold,
            "error": result.error or "",
        }
        for result in results
    ]
    if args.cam is not None:
        for index, row in enumerate(rows):
            row["cam"] = cams.get(index, "")
    _write_rows(rows, args.out)
    summary = _subject_summary(results, [row["subject"] for row in rows])
    if args.out is not None and summary:
        summary_path = args.out.with_name(f"{args.out.stem}_subjects{args.out.suffix}")
        _write_rows(summary, summary_path)
        logger.info("per-subject summary of %d subjects: %s", len(summary), summary_path)
    failed = sum(1 for result in results if result.error)
    logger.info("%d images classified with %s, %d could not be read%s", len(results) - failed,
                predictor.runtime, failed,
                f"; output: {args.out}" if args.out else "")
    return 0


def _write_cams(predictor, results: list, cam_dir: Path) -> dict[int, str]:
    """Write one Grad-CAM overlay per classified image; return {result index: overlay path}."""
    from leukemia import distributed
    from leukemia.explain.gradcam import overlay_file_names, save_overlay

    classified = [index for index, result in enumerate(results) if result.error is None]
    names = overlay_file_names([results[index].path for index in classified])
    # With several processes each draws its share; the names come from the whole list, so they never collide.
    mine = distributed.shard(list(zip(classified, names)))
    overlays = predictor.explain_files([results[index].path for index, _ in mine])
    drawn = {index: str(save_overlay(cam_dir / name, overlay)) for (index, name), overlay in zip(mine, overlays)}
    cams = {index: path for part in distributed.gather_objects(drawn) for index, path in part.items()}
    logger.info("%d Grad-CAM overlays in %s", len(cams), cam_dir)
    return cams


def _subject_summary(results: list, subjects: list[str]) -> list[dict]:
    """Return n_images, mean_probability_all and fraction_called_all per known subject, over classified images."""
    by_subject: dict[str, list] = {}
    for result, subject in zip(results, subjects):
        if subject and result.probability is not None:
            by_subject.setdefault(subject, []).append(result)
    return [
        {
            "subject": subject,
            "n_images": len(cells),
            "mean_probability_all": round(sum(cell.probability for cell in cells) / len(cells), 6),
            "fraction_called_all": round(sum(cell.prediction for cell in cells) / len(cells), 6),
        }
        for subject, cells in sorted(by_subject.items())
    ]


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", allow_abbrev=False, help="export a model file for fast inference (ONNX)")
    parser.add_argument("checkpoint", type=Path, help="model.pt written by `leukemia train`, or its run directory")
    parser.add_argument("--onnx", type=Path, required=True,
                        help="ONNX file to write; `leukemia predict FILE.onnx ...` runs it with ONNX Runtime")
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from leukemia.inference.export import export_onnx

    path = export_onnx(args.checkpoint, args.onnx)
    print(f"ONNX model: {path}")
    return 0


def _add_app(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("app", allow_abbrev=False, help="serve a web page for classifying uploaded cell images (needs the app extra)")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="model.pt written by `leukemia train`, or its run directory; selected at start")
    parser.add_argument("--runs", type=Path, default=None,
                        help="folder searched recursively for more model.pt files to choose from (default: none)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; the page has no login, so keep the default 127.0.0.1 "
                             "unless the network is trusted (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--max-files", type=int, default=20, help="maximum number of files per upload (default: 20)")
    parser.add_argument("--max-file-mb", type=float, default=20.0,
                        help="maximum size of one file in MB, 1 MB = 1,048,576 bytes (default: 20)")
    parser.set_defaults(handler=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    from leukemia.app.analysis import UploadLimits

    limits = UploadLimits(max_files=args.max_files, max_file_mb=args.max_file_mb)
    try:
        from leukemia.app.server import launch
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise RuntimeError("the web app needs Gradio; install it with: pip install 'leukemia[app]'") from error
    # Gradio checks its own server with httpx at start; those requests are not worth a line each.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    print(DISCLAIMER)
    launch(args.checkpoint, runs=args.runs, host=args.host, port=args.port, limits=limits)
    return 0


def _add_preprocess(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("preprocess", allow_abbrev=False, help="show the preprocessing steps of an image, or fill the cache")
    parser.add_argument("image", type=Path, nargs="?", help="one image to preprocess")
    parser.add_argument("--steps", type=Path, default=None, help="save a figure of every step to this PNG")
    parser.add_argument("--out", type=Path, default=None, help="save the preprocessed cell to this PNG")
    parser.add_argument("--data", type=Path, default=None, help="preprocess every image of a data set into the cache")
    _add_common_data_options(parser)
    _add_preprocess_options(parser)
    parser.set_defaults(handler=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> int:
    import cv2

    from leukemia.data.discovery import discover
    from leukemia.data.images import read_image
    from leukemia.preprocessing.cache import PreprocessCache, default_cache_dir, preprocess_files
    from leukemia.preprocessing.cell import BlankImageError, preprocess_cell
    from leukemia.preprocessing.figure import draw_steps

    config = _preprocess_config(args)
    if (args.image is None) == (args.data is None):
        raise ValueError("give either one IMAGE (with --steps or --out) or --data DIR")
    if args.data is not None:
        cache = PreprocessCache(args.cache_dir or default_cache_dir(), config)
        outcomes = preprocess_files([s.path for s in discover(args.data).samples], cache, workers=args.workers)
        failed = sum(1 for outcome in outcomes if outcome.error)
        print(f"{len(outcomes) - failed} images in the cache at {cache.folder}, {failed} skipped")
        return 0

    if args.steps is None and args.out is None:
        raise ValueError("give --steps OUT.png to draw the steps, or --out CELL.png to save the result")
    try:
        result = preprocess_cell(read_image(args.image), config)
    except BlankImageError as error:
        raise ValueError(f"{args.image}: {error}") from error
    if args.steps is not None:
        draw_steps(result, args.steps, title=str(args.image.name))
        print(f"steps: {args.steps}")
    if args.out is not None:
        cv2.imwrite(str(args.out), cv2.cvtColor(result.output, cv2.COLOR_RGB2BGR))
        print(f"preprocessed cell: {args.out}")
    return 0


def _print_summary(out_dir: Path, metrics: dict) -> None:
    test = metrics["test"]
    for note in metrics.get("notes", []):
        print(note)
    print(f"{DISCLAIMER}")
    print(f"test images:        {test['n_images']}")
    print(f"accuracy:           {test['accuracy']:.4f}")
    print(f"weighted F1:        {test['f1_weighted']:.4f}")
    print(f"balanced accuracy:  {_format(test['balanced_accuracy'])}")
    print(f"ROC AUC:            {_format(test['roc_auc'])}")
    if metrics.get("threshold"):
        print(f"threshold:          {metrics['threshold']['value']:.4f} ({metrics['threshold']['rule']})")
    if metrics.get("split"):
        print(f"split rule:         {metrics['split']['rule']}")
    skipped = metrics.get("data", {}).get("skipped_images", 0)
    print(f"skipped images:     {skipped} (see {out_dir / 'skipped.csv'})")
    print(f"report:             {out_dir} (metrics.json, classification_report.txt, predictions.csv, "
          "per_subject.csv, confusion_matrix.png, roc.png)")
    print(f"HTML report:        {out_dir / 'report.html'} (opens offline in a browser)")


def _write_rows(rows: list[dict], out: Path | None) -> None:
    if out is not None and out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return
    handle = open(out, "w", newline="", encoding="utf-8") if out is not None else sys.stdout
    try:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["file"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if out is not None:
            handle.close()


def _format(value: float | None) -> str:
    return "undefined (one class only)" if value is None else f"{value:.4f}"


def _setup_logging(verbose: bool) -> None:
    # Lightning 2.6 triggers this deprecation inside torch's pytree on every fit. The fix belongs
    # to Lightning, and the warning gives a user nothing to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Lightning attaches its own handler to these loggers; keeping them at WARNING avoids
    # every message appearing twice and drops its advertising tips.
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                  "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
