"""Reproduce the accuracy tables of docs/ACCURACY.md on the real cells in ../shared/data.

    python benchmarks/accuracy_on_subset.py --out runs/accuracy     # about 30 minutes on 2 CPU cores

Runs `leukemia cv` (official folds, offline EfficientNet-Lite0) six times, as a user would:

- the frozen baseline of the main job and the challenge recipe (configs/cnmc-challenge.yaml,
  frozen + fine-tuned) on cnmc-subset-jpeg, where one encoding for every cell keeps the file
  format from standing in for the label;
- both again with --image-level-split, to measure the leakage gap;
- both on the mixed-encoding cnmc-subset, reported per encoding.

Then prints the Markdown tables. A finished cross-validation is kept, so rerunning prints
the tables again at once; an interrupted one continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RECIPE = REPO / "configs" / "cnmc-challenge.yaml"
BASELINE: list[str] = []
FINETUNED = ["--config", str(RECIPE)]
METRICS = ("roc_auc", "balanced_accuracy", "f1_weighted", "accuracy", "sensitivity", "specificity")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "accuracy", help="folder for the six runs")
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder holding cnmc-subset and cnmc-subset-jpeg")
    args = parser.parse_args()

    runs = {
        "jpeg-frozen": (args.shared / "cnmc-subset-jpeg", BASELINE),
        "jpeg-recipe": (args.shared / "cnmc-subset-jpeg", FINETUNED),
        "mixed-frozen": (args.shared / "cnmc-subset", BASELINE),
        "mixed-recipe": (args.shared / "cnmc-subset", FINETUNED),
        "jpeg-frozen-imagelevel": (args.shared / "cnmc-subset-jpeg", BASELINE + ["--image-level-split"]),
        "jpeg-recipe-imagelevel": (args.shared / "cnmc-subset-jpeg", FINETUNED + ["--image-level-split"]),
    }
    for name, (data, options) in runs.items():
        command = ["leukemia", "cv", "--data", str(data), "--out", str(args.out / name),
                   "--backbone", "efficientnet_lite0", *options]
        print("$", " ".join(command), file=sys.stderr)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    summaries = {name: json.loads((args.out / name / "cv_summary.json").read_text()) for name in runs}
    comparison = subprocess.run(["leukemia", "compare", str(args.out / "jpeg-frozen"), str(args.out / "jpeg-recipe")],
                                check=True, capture_output=True, text=True).stdout
    print(recipe_table(summaries))
    print("Paired difference, recipe - frozen, on the same subject resamples:\n")
    print(comparison)
    print(leakage_table(summaries))
    print(encoding_table(summaries))
    return 0


def recipe_table(summaries: dict) -> str:
    lines = ["| metric (cnmc-subset-jpeg, 3 official folds) | frozen: pooled [95 % CI] | frozen: fold mean ± sd | "
             "frozen + fine-tuned: pooled [95 % CI] | frozen + fine-tuned: fold mean ± sd |", "|---|---|---|---|---|"]
    for metric in METRICS:
        cells = []
        for name in ("jpeg-frozen", "jpeg-recipe"):
            summary = summaries[name]
            cells += [_interval(summary["pooled"][metric]), f"{summary['mean'][metric]:.3f} ± {summary['std'][metric]:.3f}"]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def leakage_table(summaries: dict) -> str:
    lines = ["| recipe (cnmc-subset-jpeg, 3 folds) | metric | split by subject | split by image (leaky) | gap |",
             "|---|---|---|---|---|"]
    for recipe, honest, leaky in (("frozen", "jpeg-frozen", "jpeg-frozen-imagelevel"),
                                  ("frozen + fine-tuned", "jpeg-recipe", "jpeg-recipe-imagelevel")):
        for metric in ("roc_auc", "balanced_accuracy", "accuracy"):
            subject = summaries[honest]["pooled"][metric]
            image = summaries[leaky]["pooled"][metric]
            lines.append(f"| {recipe} | {metric} | {_interval(subject)} | {_interval(image)} | "
                         f"{image['value'] - subject['value']:+.3f} |")
    return "\n".join(lines) + "\n"


def encoding_table(summaries: dict) -> str:
    lines = []
    for name in ("mixed-frozen", "mixed-recipe"):
        encodings = summaries[name]["per_encoding"]
        lines += [f"| {name} (cnmc-subset) | all cells | "
                  + " | ".join(f"{e}: {v['n_images']} cells, {v['n_all']} ALL" for e, v in encodings.items()) + " |",
                  "|---" * (len(encodings) + 2) + "|"]
        for metric in METRICS:
            values = [_interval(encodings[e].get(metric)) for e in encodings]
            lines.append(f"| {metric} | {_interval(summaries[name]['pooled'][metric])} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def _interval(values: dict | None) -> str:
    if values is None:
        return "n/a (one class)"
    return f"{values['value']:.3f} [{values['low']:.3f}, {values['high']:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
