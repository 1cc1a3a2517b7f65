"""Cross-validation grouped by subject: one training run per fold, then a summary with intervals.

Each fold is a complete ``train`` run in ``OUT/fold_K`` whose test split is fold K (see
``leukemia.data.splits.make_folds``), so every fold has its own report, model file and
resume point. The summary pools the held-out predictions of all folds (every labeled cell
is predicted once, by the model that never saw its subject) and reports:

- each metric per fold, with the mean and standard deviation over folds;
- each metric on the pooled predictions, with a 95 % interval from a bootstrap over subjects;
- the same pooled metrics per file encoding, when the data mixes encodings (a classifier can
  learn compression artefacts that correlate with the class).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from leukemia.data.discovery import discover
from leukemia.data.splits import LEAKAGE_WARNING, make_folds
from leukemia.evaluation.bootstrap import METRIC_NAMES, Interval, binary_metrics, bootstrap_intervals, paired_difference_intervals
from leukemia.pipeline import prepare_cells
from leukemia.preprocessing.cache import PreprocessCache, default_cache_dir, write_atomically
from leukemia.training.config import TrainConfig, load_settings
from leukemia.training.run import RUN_CONFIG, resume_training, train

logger = logging.getLogger(__name__)

CV_CONFIG = "cv_config.yaml"
CV_PREDICTIONS = "cv_predictions.csv"
CV_SUMMARY = "cv_summary.json"
CV_REPORT = "cv_report.md"
# Settings that may differ when an interrupted cross-validation continues: they leave results unchanged.
_FREE_SETTINGS = ("out", "cache_dir", "workers", "progress")


@dataclass
class CVResult:
    """The folder of a finished cross-validation and its summary (as in cv_summary.json)."""

    out: Path
    summary: dict


def cross_validate(config: TrainConfig, *, n_resamples: int = 2000) -> CVResult:
    """Train one run per fold into ``config.out/fold_K``, then write the pooled summary.

    Rerunning the same command on the same ``out`` continues an interrupted cross-validation:
    finished folds are kept, an interrupted fold resumes from its last checkpoint.

    Raises:
        FileExistsError: ``config.out`` contains files of something else, or a cross-validation
            with other settings.
        ValueError: the data cannot be split into the requested folds.
    """
    out = Path(config.out)
    dataset = discover(config.data)
    cache = PreprocessCache(config.cache_dir or default_cache_dir(), config.preprocess)
    # Folds are made from the cells that preprocess, exactly as each fold's run makes them.
    cells = prepare_cells(dataset.labeled, cache, workers=config.workers, progress=config.progress)
    folds = make_folds(cells.samples, n_folds=config.cv_folds, image_level=config.image_level_split, seed=config.seed)
    logger.info("cross-validation: %s", folds.rule)
    for note in folds.notes:
        logger.info("cross-validation note: %s", note)
    _claim_folder(out, config)

    for fold in range(len(folds.parts)):
        fold_config = replace(config, out=out / f"fold_{fold}", cv_fold=fold, cv_folds=len(folds.parts))
        _run_fold(fold_config)

    summary = summarise(out, n_folds=len(folds.parts), rule=folds.rule,
                        notes=folds.notes + ([LEAKAGE_WARNING] if config.image_level_split else []),
                        subject_level=not config.image_level_split, recipe=config.describe(),
                        n_resamples=n_resamples, seed=config.seed)
    return CVResult(out, summary)


def _claim_folder(out: Path, config: TrainConfig) -> None:
    """Create ``out`` with cv_config.yaml, or check that it contains a cross-validation of the same settings."""
    stored = out / CV_CONFIG
    if stored.is_file():
        before = _comparable(load_settings(stored))
        if before != _comparable(config.to_dict()):
            changed = sorted(key for key in set(before) | set(_comparable(config.to_dict()))
                             if before.get(key) != _comparable(config.to_dict()).get(key))
            raise FileExistsError(
                f"{out} contains a cross-validation with other settings (changed: {', '.join(changed)}); rerun it with the "
                f"settings in {stored} to continue it, or choose a new --out"
            )
        logger.info("continuing the cross-validation in %s; finished folds are kept", out)
        return
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already contains files; choose a new --out so runs never mix")
    out.mkdir(parents=True, exist_ok=True)
    header = "# Settings of a `leukemia cv` run; each fold_K/config.yaml adds its fold.\n"
    write_atomically(stored, (header + yaml.safe_dump(config.to_dict(), sort_keys=False)).encode("utf-8"))


def _comparable(values: dict) -> dict:
    """Return the settings that decide the results, with the data path made absolute."""
    values = {key: value for key, value in values.items() if key not in _FREE_SETTINGS}
    values["data"] = str(Path(values["data"]).resolve())
    return values


def _run_fold(config: TrainConfig) -> None:
    """Train one fold, keep it when finished, or resume it when interrupted."""
    run_dir = config.out
    if (run_dir / "model.pt").is_file() and (run_dir / "predictions.csv").is_file():
        logger.info("fold %d: finished earlier, kept (%s)", config.cv_fold, run_dir)
        return
    if (run_dir / RUN_CONFIG).is_file():
        logger.info("fold %d: resuming the interrupted run in %s", config.cv_fold, run_dir)
        resume_training(run_dir, cache_dir=config.cache_dir, workers=config.workers)
        return
    logger.info("fold %d of %d: training into %s", config.cv_fold, config.cv_folds, run_dir)
    train(config)


def summarise(
    out: Path,
    *,
    n_folds: int,
    rule: str,
    notes: list[str],
    subject_level: bool = True,
    recipe: str = "",
    n_resamples: int = 2000,
    seed: int = 42,
) -> dict:
    """Pool the folds' held-out predictions; write cv_predictions.csv, cv_summary.json and cv_report.md."""
    rows = _pooled_rows(out, n_folds)
    _write_rows(out / CV_PREDICTIONS, rows)
    per_fold = [binary_metrics(*_arrays([row for row in rows if row["fold"] == fold])[1:]) for fold in range(n_folds)]
    subjects, targets, probs, preds = _arrays(rows)

    summary = {
        "rule": rule,
        "subject_level": subject_level,
        "recipe": recipe,
        "notes": notes,
        "n_folds": n_folds,
        "n_images": len(rows),
        "n_subjects": len(set(subjects)),
        "per_fold": per_fold,
        "mean": {name: _mean(per_fold, name) for name in METRIC_NAMES},
        "std": {name: _std(per_fold, name) for name in METRIC_NAMES},
        "pooled": _as_dict(bootstrap_intervals(subjects, targets, probs, preds, n_resamples=n_resamples, seed=seed)),
        "bootstrap": {"unit": "subject, resampled within each class", "resamples": n_resamples, "confidence": 0.95},
    }
    encodings = sorted({row["encoding"] for row in rows})
    if len(encodings) > 1:
        summary["per_encoding"] = {}
        for encoding in encodings:
            part = [row for row in rows if row["encoding"] == encoding]
            summary["per_encoding"][encoding] = {
                "n_images": len(part),
                "n_all": int(sum(row["label"] for row in part)),
                **_as_dict(bootstrap_intervals(*_arrays(part), n_resamples=n_resamples, seed=seed)),
            }
    write_atomically(out / CV_SUMMARY, json.dumps(summary, indent=2).encode("utf-8"))
    write_atomically(out / CV_REPORT, format_report(summary).encode("utf-8"))
    return summary


def compare(first: Path, second: Path, *, n_resamples: int = 2000, seed: int = 42) -> dict:
    """Compare two cross-validations of the same cells: each metric of both, and second - first.

    The difference has a paired interval: both are evaluated on the same subject resamples.

    Raises:
        FileNotFoundError: a folder contains no cv_predictions.csv.
        ValueError: the two predicted different cells.
    """
    rows = {}
    for folder in (first, second):
        path = Path(folder) / CV_PREDICTIONS
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass the --out folders of two finished `leukemia cv` runs")
        rows[folder] = sorted(_read_rows(path), key=lambda row: _data_relative(row["file"], Path(folder)))
    if ([_data_relative(row["file"], Path(first)) for row in rows[first]]
            != [_data_relative(row["file"], Path(second)) for row in rows[second]]):
        raise ValueError(f"{first} and {second} predicted different cells, so they cannot be compared pairwise; run "
                         "both on the same data")
    notes = _comparison_notes(Path(first), Path(second))
    subjects, targets, first_probs, first_preds = _arrays(rows[first])
    _, _, second_probs, second_preds = _arrays(rows[second])
    options = dict(n_resamples=n_resamples, seed=seed)
    return {
        "first": str(first),
        "second": str(second),
        "n_images": len(targets),
        "n_subjects": len(set(subjects)),
        "notes": notes,
        "metrics": {
            "first": _as_dict(bootstrap_intervals(subjects, targets, first_probs, first_preds, **options)),
            "second": _as_dict(bootstrap_intervals(subjects, targets, second_probs, second_preds, **options)),
            "difference": _as_dict(paired_difference_intervals(
                subjects, targets, (first_probs, first_preds), (second_probs, second_preds), **options)),
        },
    }


def format_report(summary: dict) -> str:
    """Return the summary as Markdown: per-fold table, mean and spread, pooled values with intervals."""
    blind_to = "its subject" if summary["subject_level"] else "it (but trained on other cells of its subject)"
    lines = ["# Cross-validation", ""]

    # The leakage warning comes first, as in the report of a train run.
    lines += [f"**{note}**\n" for note in summary["notes"] if note == LEAKAGE_WARNING]
    lines += [f"Folds: {summary['rule']}. {summary['n_images']} images of {summary['n_subjects']} subjects, each "
              f"predicted once by the model that did not train on {blind_to}.", ""]
    if summary.get("recipe"):
        lines += [f"Training: {summary['recipe']}.", ""]
    lines += [f"Note: {note}" for note in summary["notes"] if note != LEAKAGE_WARNING]

    lines += ["", "| metric | " + " | ".join(f"fold {k}" for k in range(summary["n_folds"])) + " | mean ± sd | "
              "pooled [95 % CI] |", "|---" * (summary["n_folds"] + 3) + "|"]
    for name in METRIC_NAMES:
        folds = [_cell(fold.get(name)) for fold in summary["per_fold"]]
        pooled = summary["pooled"].get(name)
        lines.append(f"| {name} | " + " | ".join(folds) + f" | {_cell(summary['mean'][name])} ± "
                     f"{_cell(summary['std'][name])} | {_interval(pooled)} |")

    if "per_encoding" in summary:
        encodings = list(summary["per_encoding"])
        lines += ["", "Pooled held-out predictions per file encoding:", "",
                  "| metric | " + " | ".join(f"{e} ({summary['per_encoding'][e]['n_images']} images, "
                                           f"{summary['per_encoding'][e]['n_all']} ALL)" for e in encodings) + " |",
                  "|---" * (len(encodings) + 1) + "|"]
        for name in METRIC_NAMES:
            lines.append(f"| {name} | " + " | ".join(_interval(summary["per_encoding"][e].get(name)) for e in encodings)
                         + " |")

    bootstrap = summary["bootstrap"]
    lines += ["", f"Intervals: {bootstrap['resamples']} bootstrap resamples of subjects within each class; "
              "mean ± sd are over folds. For research use only. Not for diagnosis.", ""]
    return "\n".join(lines)


def _data_relative(file: str, folder: Path) -> str:
    """Return a predicted file's path inside the cross-validation's data folder.

    Two cross-validations of the same data may name the folder differently, by a relative and
    an absolute path or as a copy elsewhere. The path inside the folder identifies the cell.
    """
    config = folder / CV_CONFIG
    if config.is_file():
        data = Path(load_settings(config)["data"])
        if Path(file).is_relative_to(data):
            return Path(file).relative_to(data).as_posix()
    return file


def _comparison_notes(first: Path, second: Path) -> list[str]:
    """Return what differs between two cross-validations besides the recipe: folds, split level."""
    summaries = [json.loads((folder / CV_SUMMARY).read_text(encoding="utf-8")) if (folder / CV_SUMMARY).is_file()
                 else {} for folder in (first, second)]
    notes = [f"{folder}: {summary['recipe']}" for folder, summary in zip((first, second), summaries)
             if summary.get("recipe")]
    if summaries[0].get("rule") != summaries[1].get("rule"):
        notes.append(f"the folds differ ({summaries[0].get('rule')} against {summaries[1].get('rule')}), so the "
                     "difference mixes the recipes with the splits")
    return notes


def format_comparison(result: dict) -> str:
    """Return a comparison from ``compare`` as a Markdown table."""
    metrics = result["metrics"]
    lines = [f"{result['n_images']} images of {result['n_subjects']} subjects; first: {result['first']}, second: "
             f"{result['second']}", *[f"Note: {note}" for note in result.get("notes", [])], "",
             "| metric | first [95 % CI] | second [95 % CI] | second - first [95 % CI] |",
             "|---|---|---|---|"]
    for name in METRIC_NAMES:
        if name in metrics["difference"]:
            lines.append(f"| {name} | {_interval(metrics['first'][name])} | {_interval(metrics['second'][name])} | "
                         f"{_interval(metrics['difference'][name], signed=True)} |")
    return "\n".join(lines) + "\n"


def _pooled_rows(out: Path, n_folds: int) -> list[dict]:
    rows = []
    for fold in range(n_folds):
        for row in _read_rows(out / f"fold_{fold}" / "predictions.csv"):
            row["fold"] = fold
            rows.append(row)
    return rows


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["label"] = int(row["label"])
        row["prediction"] = int(row["prediction"])
        row["probability"] = float(row["probability"])
        row["fold"] = int(row["fold"]) if row.get("fold") not in (None, "") else None
        row["encoding"] = row.get("encoding") or Path(row["file"]).suffix.lower().lstrip(".").replace("jpeg", "jpg")
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "subject", "label", "probability", "prediction", "fold", "encoding"])
    for row in rows:
        writer.writerow([row["file"], row["subject"], row["label"], f"{row['probability']:.6f}", row["prediction"],
                         row["fold"], row["encoding"]])
    write_atomically(path, buffer.getvalue().encode("utf-8"))


def _arrays(rows: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    # A cell without a subject is its own subject.
    subjects = [row["subject"] or f"file:{row['file']}" for row in rows]
    return (subjects, np.array([row["label"] for row in rows], dtype=int),
            np.array([row["probability"] for row in rows], dtype=float),
            np.array([row["prediction"] for row in rows], dtype=int))


def _as_dict(intervals: dict[str, Interval]) -> dict:
    return {name: {"value": i.value, "low": i.low, "high": i.high} for name, i in intervals.items()}


def _mean(per_fold: list[dict], name: str) -> float | None:
    values = [fold[name] for fold in per_fold if name in fold]
    return float(np.mean(values)) if values else None


def _std(per_fold: list[dict], name: str) -> float | None:
    values = [fold[name] for fold in per_fold if name in fold]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(values: dict | None, *, signed: bool = False) -> str:
    if values is None:
        return "n/a"
    number = "{:+.3f}" if signed else "{:.3f}"
    return f"{number.format(values['value'])} [{number.format(values['low'])}, {number.format(values['high'])}]"
