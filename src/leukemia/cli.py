"""The ``leukemia`` command: train, evaluate, predict and preprocess.

For research use only; the tool is not a medical device and must not be used for diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
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
        logger.error("interrupted")
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leukemia",
        description=f"Classify single white blood cell images as ALL (blast) or HEM (normal). {DISCLAIMER}",
    )
    parser.add_argument("--version", action="version", version=f"leukemia {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_preprocess(commands)
    _add_export(commands)
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
    parser = commands.add_parser("train", help="the main job: preprocess, split by subject, train, evaluate")
    parser.add_argument("--data", type=Path, required=True, help="data folder (any supported layout) or CSV manifest")
    parser.add_argument("--out", type=Path, required=True, help="run directory to create; must be new or empty")
    parser.add_argument("--backbone", default="resnet50",
                        help="resnet50 (torchvision ImageNet weights, downloaded on first use), "
                             "efficientnet_lite0 (offline ImageNet weights from the [offline] extra), "
                             "or a timm model name (default: resnet50)")
    parser.add_argument("--weights", default="imagenet",
                        help="'imagenet', a local weights file (state dict), or 'none' for random weights")
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs (default: 30)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    parser.add_argument("--patience", type=int, default=5,
                        help="epochs without a lower validation loss before stopping early (default: 5)")
    parser.add_argument("--monitor", default="val_loss",
                        help="validation metric that picks the best checkpoint: val_loss, val_accuracy, "
                             "val_balanced_accuracy, val_f1_weighted or val_roc_auc (default: val_loss)")
    parser.add_argument("--pos-weight", default="auto",
                        help="loss weight of ALL; 'auto' is n(HEM)/n(ALL) in the training split (default: auto)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="validation share of images (default: 0.15)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="test share of images when no labeled test set exists (default: 0.2)")
    parser.add_argument("--views", type=int, choices=(1, 8), default=1,
                        help="8 shows each training cell in one of its 8 rotations/flips per epoch (default: 1)")
    parser.add_argument("--live-backbone", action="store_true",
                        help="run the frozen backbone at every training step instead of on cached features "
                             "(slower, same model; for comparison)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader processes that decode cells for the backbone (default: 0; use 4 or more on a GPU)")
    parser.add_argument("--image-level-split", action="store_true",
                        help="split images at random instead of by subject; leaks subjects across splits, so "
                             "results are optimistic (for showing that effect only)")
    _add_common_data_options(parser)
    _add_engine_options(parser)
    _add_preprocess_options(parser)
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from leukemia.training.config import TrainConfig
    from leukemia.training.run import train

    pos_weight = args.pos_weight if args.pos_weight == "auto" else float(args.pos_weight)
    config = TrainConfig(
        data=args.data, out=args.out, backbone=args.backbone, weights=args.weights, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.lr, patience=args.patience, monitor=args.monitor,
        pos_weight=pos_weight, seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        image_level_split=args.image_level_split, cache_dir=args.cache_dir, workers=args.workers,
        views=args.views, live_backbone=args.live_backbone, device=args.device, precision=args.precision,
        loader_workers=args.loader_workers, preprocess=_preprocess_config(args),
    )
    result = train(config)
    _print_summary(result.run_dir, result.metrics)
    print(f"model file:         {result.model_path}")
    print(f"checkpoints:        {result.run_dir / 'checkpoints'} (best.ckpt, last.ckpt)")
    print(f"training history:   {result.run_dir / 'logs' / 'metrics.csv'}")
    print(f"split:              {result.run_dir / 'split.csv'}")
    return 0


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("evaluate", help="evaluate a model file on a labeled data set")
    parser.add_argument("checkpoint", type=Path, help="model.pt written by `leukemia train`, or its run directory")
    parser.add_argument("--data", type=Path, required=True, help="labeled data folder or CSV manifest")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    _add_common_data_options(parser)
    _add_engine_options(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from leukemia.evaluation.evaluate import evaluate

    metrics = evaluate(args.checkpoint, args.data, args.out, cache_dir=args.cache_dir, workers=args.workers,
                       batch_size=args.batch_size, device=args.device, precision=args.precision)
    _print_summary(args.out, metrics)
    return 0


def _add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("predict", help="predict ALL or HEM for images, folders or a CSV of paths")
    parser.add_argument("checkpoint", type=Path,
                        help="model.pt written by `leukemia train`, its run directory, or an ONNX file from "
                             "`leukemia export` (run with ONNX Runtime)")
    parser.add_argument("inputs", type=Path, nargs="+",
                        help="image files, folders (searched recursively) or CSV files with a 'path' column")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file, .csv or .json (default: CSV on standard output)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    _add_engine_options(parser)
    parser.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from leukemia.inference.inputs import collect_input_files
    from leukemia.inference.predictor import Predictor
    from leukemia.data.discovery import parse_subject

    predictor = Predictor(args.checkpoint, device=args.device, precision=args.precision)
    paths = collect_input_files(args.inputs)
    results = predictor.predict_files(paths, batch_size=args.batch_size)
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
    _write_rows(rows, args.out)
    failed = sum(1 for result in results if result.error)
    logger.info("%d images classified with %s, %d could not be read%s", len(results) - failed,
                predictor.runtime, failed,
                f"; output: {args.out}" if args.out else "")
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="export a model file for fast inference (ONNX)")
    parser.add_argument("checkpoint", type=Path, help="model.pt written by `leukemia train`, or its run directory")
    parser.add_argument("--onnx", type=Path, required=True,
                        help="ONNX file to write; `leukemia predict FILE.onnx ...` runs it with ONNX Runtime")
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from leukemia.inference.export import export_onnx

    path = export_onnx(args.checkpoint, args.onnx)
    print(f"ONNX model: {path}")
    return 0


def _add_preprocess(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("preprocess", help="show the preprocessing steps of an image, or fill the cache")
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
    from leukemia.preprocessing.cell import preprocess_cell
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
    result = preprocess_cell(read_image(args.image), config)
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
    if metrics.get("split"):
        print(f"split rule:         {metrics['split']['rule']}")
    skipped = metrics.get("data", {}).get("skipped_images", 0)
    print(f"skipped images:     {skipped} (see {out_dir / 'skipped.csv'})")
    print(f"report:             {out_dir} (metrics.json, classification_report.txt, predictions.csv, "
          "per_subject.csv, confusion_matrix.png, roc.png)")


def _write_rows(rows: list[dict], out: Path | None) -> None:
    if out is not None and out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return
    handle = open(out, "w", newline="", encoding="utf-8") if out is not None else sys.stdout
    try:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if out is not None:
            handle.close()


def _format(value: float | None) -> str:
    return "undefined (one class only)" if value is None else f"{value:.4f}"


def _setup_logging(verbose: bool) -> None:
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
