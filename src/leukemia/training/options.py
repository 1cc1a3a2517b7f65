"""The command-line options of ``train`` and ``cv``, each mapped onto one ``TrainConfig`` setting.

Settings resolve in three layers: the defaults of ``TrainConfig`` and ``PreprocessConfig``,
then a YAML file given with ``--config``, then the options given on the command line. The
options have no defaults of their own (argparse leaves an option out of the namespace unless
it is given), so the defaults are decided in one place, the config classes.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from leukemia.preprocessing.cell import PreprocessConfig
from leukemia.training.config import TrainConfig, load_settings

_BOOLEAN = argparse.BooleanOptionalAction

def _whole_number_or(word: str):
    """Return an argparse type that accepts ``word`` or a whole number of at least 1."""
    def parse(text: str) -> int | str:
        if text == word:
            return text
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; use a whole number of at least 1, or {word}")
        return int(text)

    return parse


def _auto_or_number(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use auto or a number") from None


# (flag, setting, argparse keywords). "preprocess.NAME" is a PreprocessConfig setting.
TRAIN_OPTIONS: list[tuple[str, str, dict]] = [
    ("--backbone", "backbone", dict(
        help="a torchvision ResNet: resnet18, resnet34, resnet50, resnet101 or resnet152 (ImageNet weights "
             "downloaded on first use); efficientnet_lite0 (offline ImageNet weights from the [offline] extra); or a "
             "timm model name (timm:NAME for timm's model of a torchvision name)")),
    ("--weights", "weights", dict(help="'imagenet', a local weights file (state dict), or 'none' for random weights")),
    ("--epochs", "epochs", dict(type=int, help="maximum epochs of the frozen stage")),
    ("--batch-size", "batch_size", dict(type=int, help="batch size")),
    ("--lr", "learning_rate", dict(type=float, help="Adam learning rate of the frozen stage")),
    ("--patience", "patience", dict(type=int, help="epochs without a lower validation loss before a stage stops")),
    ("--monitor", "monitor", dict(
        help="validation metric that picks the best checkpoint: val_loss, val_accuracy, val_balanced_accuracy, "
             "val_f1_weighted or val_roc_auc")),
    ("--pos-weight", "pos_weight", dict(
        type=_auto_or_number,
        help="loss weight of ALL; 'auto' is n(HEM)/n(ALL) in the training split")),
    ("--seed", "seed", dict(type=int, help="random seed")),
    ("--val-fraction", "val_fraction", dict(type=float, help="validation share of images")),
    ("--test-fraction", "test_fraction", dict(type=float, help="test share of images when no labeled test set exists")),
    ("--views", "views", dict(type=int, choices=(1, 8),
                              help="8 shows each training cell in one of its 8 rotations/flips per epoch")),
    ("--live-backbone", "live_backbone", dict(
        action=_BOOLEAN, help="run the frozen backbone at every training step instead of on cached features "
                              "(slower, same model; for comparison)")),
    ("--loader-workers", "loader_workers", dict(
        type=int, help="DataLoader processes that decode cells for the backbone; use 4 or more on a GPU")),
    ("--image-level-split", "image_level_split", dict(
        action=_BOOLEAN, help="split images at random instead of by subject; leaks subjects across splits, so "
                              "results are optimistic (for showing that effect only)")),
    ("--threshold-rule", "threshold_rule", dict(
        choices=("fixed", "f1_weighted", "sensitivity"),
        help="decision threshold on the probability of ALL: fixed (0.5), f1_weighted (maximises weighted F1 on "
             "validation) or sensitivity (the largest threshold reaching --target-sensitivity on validation); "
             "stored in model.pt")),
    ("--target-sensitivity", "target_sensitivity", dict(
        type=float, help="ALL recall the sensitivity rule must reach on validation")),
    ("--tta", "tta", dict(
        action=_BOOLEAN, help="test-time augmentation: average the probability over the 8 rotations and flips of "
                              "each cell; stored in model.pt, so predict, evaluate and the app do the same")),
    ("--finetune-epochs", "finetune_epochs", dict(
        type=int, help="epochs of fine-tuning after the frozen stage; 0 trains the head only")),
    ("--finetune-lr", "finetune_lr", dict(type=float, help="peak AdamW learning rate of fine-tuning")),
    ("--finetune-stages", "finetune_stages", dict(
        type=_whole_number_or("all"),
        help="how many of the backbone's last stages fine-tuning trains, or 'all'")),
    ("--warmup-epochs", "warmup_epochs", dict(
        type=float, help="epochs of linear learning-rate warm-up before the cosine decay of fine-tuning")),
    ("--weight-decay", "weight_decay", dict(type=float, help="AdamW weight decay of fine-tuning")),
    ("--batch-norm", "batch_norm", dict(
        choices=("frozen", "train"),
        help="frozen keeps the pretrained batch-norm statistics during fine-tuning; train updates them")),
    ("--scale-jitter", "scale_jitter", dict(
        type=float, help="largest relative zoom of a training cell where the backbone sees images (0.1: 0.9-1.1)")),
    ("--color-jitter", "color_jitter", dict(
        type=float, help="largest relative change of brightness, contrast and saturation of a training cell; hue "
                         "moves by a fifth of it")),
    ("--device", "device", dict(help="auto (CUDA when available), cpu or cuda")),
    ("--precision", "precision", dict(
        choices=("auto", "float32", "bfloat16", "float16"),
        help="backbone precision; auto picks bfloat16 on CPUs with native bfloat16 and on recent GPUs, float16 "
             "on other GPUs, else float32")),
    ("--cache-dir", "cache_dir", dict(
        type=Path, help="cache of preprocessed cells and features; unset means $LEUKEMIA_CACHE or ~/.cache/leukemia")),
    ("--workers", "workers", dict(type=int, help="preprocessing processes; unset means every core")),
    ("--crop", "preprocess.crop", dict(
        choices=("bbox", "fixed"),
        help="bbox: crop the cell's bounding box (cell fills the frame); fixed: a window of --window pixels "
             "centred on the cell, which keeps cell size")),
    ("--window", "preprocess.window", dict(type=int, help="side of the fixed crop window in pixels")),
    ("--margin", "preprocess.margin", dict(type=float, help="bbox margin per side as a fraction of the box's longer side")),
    ("--clahe-clip", "preprocess.clahe_clip_limit", dict(type=float, help="CLAHE clip limit")),
    ("--clahe-grid", "preprocess.clahe_tile_grid", dict(type=int, help="CLAHE tiles per axis")),
    ("--image-size", "preprocess.output_size", dict(type=int, help="output side in pixels")),
]

PROCESS_OPTIONS: list[tuple[str, str, dict]] = [
    ("--devices", "devices", dict(
        type=_whole_number_or("auto"),
        help="training processes per node; auto takes the number torchrun or srun started, or 1 without a launcher")),
    ("--num-nodes", "num_nodes", dict(type=int, help="nodes the launcher started processes on")),
    ("--strategy", "strategy", dict(
        choices=("auto", "ddp"),
        help="Lightning strategy; ddp trains each process on its share of the training cells")),
]

# Options that leave a run's results unchanged, so --resume accepts them.
RESUME_OPTIONS = ("cache_dir", "workers")


def add_training_options(parser: argparse.ArgumentParser, *, out_help: str, skip: tuple[str, ...] = ()) -> None:
    """Add --config, --data, --out and one option per setting (except ``skip``); their help shows the defaults."""
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML file of settings (names as in a run's config.yaml); options given here override it")
    parser.add_argument("--data", type=Path, default=argparse.SUPPRESS,
                        help="data folder (any supported layout) or CSV manifest")
    parser.add_argument("--out", type=Path, default=argparse.SUPPRESS, help=out_help)
    group = parser.add_argument_group("training settings")
    for flag, setting, keywords in TRAIN_OPTIONS:
        if flag not in skip:
            _add_option(group, flag, setting, keywords)
    group = parser.add_argument_group(
        "processes", "several processes (CPU processes or GPUs, on one or more nodes) are started by torchrun or "
                     "srun, e.g. torchrun --nproc-per-node 4 -m leukemia.cli train ... --strategy ddp")
    for flag, setting, keywords in PROCESS_OPTIONS:
        _add_option(group, flag, setting, keywords)


def given_settings(args: argparse.Namespace) -> list[str]:
    """Return the flags of the setting options given on the command line."""
    return [flag for flag, setting, _ in TRAIN_OPTIONS + PROCESS_OPTIONS if hasattr(args, _dest(flag))]


def resolve_config(args: argparse.Namespace, **fixed) -> TrainConfig:
    """Return the settings from the defaults, the --config file, the options given, then ``fixed``.

    Raises:
        FileNotFoundError: the --config file does not exist.
        ValueError: the file or an option contains an unknown or invalid setting, or data or
            out is given nowhere.
    """
    aliases = {_dest(flag): setting.removeprefix("preprocess.") for flag, setting, _ in TRAIN_OPTIONS + PROCESS_OPTIONS
               if _dest(flag) != setting.removeprefix("preprocess.")}
    values = load_settings(args.config, aliases=aliases) if hasattr(args, "config") else {}
    preprocess = dict(values.pop("preprocess", None) or {})
    for key in ("data", "out"):
        if hasattr(args, key):
            values[key] = getattr(args, key)
    for flag, setting, _ in TRAIN_OPTIONS + PROCESS_OPTIONS:
        if not hasattr(args, _dest(flag)):
            continue
        value = getattr(args, _dest(flag))
        if setting.startswith("preprocess."):
            preprocess[setting.removeprefix("preprocess.")] = value
        else:
            values[setting] = value
    values.update(fixed)
    values["preprocess"] = preprocess
    return TrainConfig.from_dict(values)


def _add_option(group, flag: str, setting: str, keywords: dict) -> None:
    default = _default(setting)
    if default is None:
        shown = "unset"
    elif isinstance(default, bool):
        shown = str(default).lower()
    else:
        shown = default
    help_text = keywords.get("help", "")
    if "unset means" not in help_text:
        help_text = f"{help_text} (default: {shown})"
    group.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, **{**keywords, "help": help_text})


def _default(setting: str):
    if setting.startswith("preprocess."):
        owner, name = PreprocessConfig, setting.removeprefix("preprocess.")
    else:
        owner, name = TrainConfig, setting
    field = next(f for f in fields(owner) if f.name == name)
    return field.default


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")
