"""The settings of a training run, saved resolved in the run directory and the model file."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from leukemia.evaluation.thresholds import THRESHOLD_RULES
from leukemia.preprocessing.cell import PreprocessConfig
from leukemia.training.module import MONITOR_MODES

# Lightning strategies for processes started by an external launcher (torchrun, srun). Those
# that start processes themselves (ddp_spawn, ddp_fork) would rerun only the training step,
# not the job around it, and sharded ones (fsdp, deepspeed) bring nothing to a small head.
STRATEGIES = ("auto", "ddp")
BATCH_NORM_MODES = ("frozen", "train")


@dataclass
class TrainConfig:
    """Everything ``train`` needs; defaults follow the usual frozen ResNet50 recipe.

    Attributes:
        data: a data folder or CSV manifest.
        out: the run directory to create.
        backbone: "resnet50", "efficientnet_lite0", or a timm model name.
        weights: "imagenet", a local weights file, or "none" (random weights, for tests).
        epochs: maximum epochs; early stopping on validation loss usually ends sooner.
        patience: epochs without a lower validation loss before stopping.
        monitor: the validation metric that picks the best checkpoint.
        pos_weight: weight of ALL in the loss; "auto" is n(HEM) / n(ALL) of the training split.
        image_level_split: split images at random instead of by subject (leaks subjects).
        views: 1 trains on the cells as they are; 8 shows each cell in one of its 8
            dihedral views (rotations and flips), drawn at random every epoch.
        live_backbone: run the frozen backbone on the images at every step instead of
            training on cached features (slower, the same model; for comparison).
        device: "auto" (CUDA when available), "cpu" or "cuda" for the backbone.
        precision: "auto", "float32", "bfloat16" or "float16" for the backbone; "auto" picks
            bfloat16 on CPUs with native support and on recent GPUs, float16 on other GPUs.
        cache_dir: where preprocessed cells and features are cached; None for the default.
        workers: preprocessing processes; None for every core.
        loader_workers: DataLoader processes that decode cached cells for the backbone.
        devices: processes per node for Lightning's Trainer; "auto" is the number the
            launcher (torchrun or srun) started on each node, or 1 without a launcher.
        num_nodes: nodes the launcher started processes on.
        strategy: Lightning's strategy: "auto", or "ddp" (each process trains on its share
            of the training cells each epoch; gradients are averaged across processes).
        threshold_rule: how the decision threshold on the probability of ALL is chosen:
            "fixed" (0.5), "f1_weighted" (maximises weighted F1 on validation) or
            "sensitivity" (the largest threshold with ALL recall >= target_sensitivity on
            validation).
        target_sensitivity: the ALL recall the "sensitivity" rule must reach.
        tta: evaluate with test-time augmentation, averaging the probability over the 8
            dihedral views of each cell; stored in the model file, so predict does the same.
        finetune_epochs: epochs of the fine-tuning stage after the frozen stage; 0 trains the
            head on the frozen backbone only.
        finetune_lr: peak AdamW learning rate of the fine-tuning stage, for the backbone and head.
        finetune_stages: how many of the backbone's last stages fine-tuning trains, or "all".
        warmup_epochs: epochs over which the fine-tuning learning rate rises linearly to its
            peak; a cosine decay to zero follows.
        weight_decay: AdamW's decoupled weight decay in the fine-tuning stage.
        batch_norm: "frozen" keeps the backbone's batch-norm statistics and parameters as
            pretrained during fine-tuning; "train" updates those of the trained stages.
        scale_jitter: largest relative zoom of a training cell (0.1: factor 0.9 to 1.1).
        color_jitter: largest relative change of brightness, contrast and saturation of a
            training cell; the hue moves by a fifth of it. Both jitters apply where the backbone
            runs on the images: fine-tuning and ``live_backbone`` training.
        cv_fold: set by ``leukemia cv``: the fold (0-based) that is this run's test split.
        cv_folds: set by ``leukemia cv``: the number of folds; None takes the official C-NMC
            folds when the data has them, otherwise 5 folds of subjects.
        progress: show progress bars.
    """

    data: Path
    out: Path
    backbone: str = "resnet50"
    weights: str = "imagenet"
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 5
    monitor: str = "val_loss"
    pos_weight: str | float = "auto"
    hidden: int = 256
    dropout: float = 0.5
    seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    image_level_split: bool = False
    views: int = 1
    live_backbone: bool = False
    device: str = "auto"
    precision: str = "auto"
    cache_dir: Path | None = None
    workers: int | None = None
    loader_workers: int = 0
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    threshold_rule: str = "fixed"
    target_sensitivity: float = 0.95
    tta: bool = False
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    finetune_stages: int | str = "all"
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    batch_norm: str = "frozen"
    scale_jitter: float = 0.0
    color_jitter: float = 0.0
    cv_fold: int | None = None
    cv_folds: int | None = None
    progress: bool = True
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if self.monitor not in MONITOR_MODES:
            raise ValueError(f"invalid monitor {self.monitor!r}; use one of {', '.join(MONITOR_MODES)}")
        if not 0 < self.val_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError("val_fraction and test_fraction must be between 0 and 1")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10 % of the data for training")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"invalid threshold rule {self.threshold_rule!r}; use one of {', '.join(THRESHOLD_RULES)}")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"invalid target sensitivity {self.target_sensitivity}; it must be in (0, 1]")
        if self.views not in (1, 8):
            raise ValueError(f"invalid views {self.views}; use 1 (no augmentation) or 8 (dihedral views)")
        if self.precision not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"invalid precision {self.precision!r}; use auto, float32, bfloat16 or float16")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.devices != "auto" and (isinstance(self.devices, bool) or not isinstance(self.devices, int)
                                       or self.devices < 1):
            raise ValueError(f"invalid devices {self.devices!r}; use a whole number of at least 1, or 'auto'")
        if self.num_nodes < 1:
            raise ValueError(f"invalid num_nodes {self.num_nodes}; use 1 or more")
        if self.finetune_epochs < 0 or self.warmup_epochs < 0 or self.weight_decay < 0 or self.finetune_lr <= 0:
            raise ValueError("finetune_epochs, warmup_epochs and weight_decay must be 0 or more, finetune_lr above 0")
        if self.finetune_epochs and self.warmup_epochs > self.finetune_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds finetune_epochs ({self.finetune_epochs}), so "
                             "the learning rate would never reach its peak; lower --warmup-epochs")
        if self.pos_weight != "auto" and (isinstance(self.pos_weight, (bool, str)) or not self.pos_weight > 0):
            raise ValueError(f"invalid pos_weight {self.pos_weight!r}; use 'auto' or a number above 0")
        if self.finetune_stages != "all" and (isinstance(self.finetune_stages, bool)
                                              or not isinstance(self.finetune_stages, int) or self.finetune_stages < 1):
            raise ValueError(f"invalid finetune_stages {self.finetune_stages!r}; use a whole number of at least 1, "
                             "or 'all'")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"invalid batch_norm {self.batch_norm!r}; use one of {', '.join(BATCH_NORM_MODES)}")
        if not 0 <= self.scale_jitter < 0.5 or not 0 <= self.color_jitter < 1:
            raise ValueError("scale_jitter must be in [0, 0.5) and color_jitter in [0, 1)")
        if self.cv_folds is not None and self.cv_folds < 2:
            raise ValueError(f"invalid cv_folds {self.cv_folds}; cross-validation needs at least 2 folds")
        if self.cv_fold is not None and (self.cv_fold < 0 or (self.cv_folds is not None and self.cv_fold >= self.cv_folds)):
            raise ValueError(f"invalid cv_fold {self.cv_fold}; folds are numbered from 0 to cv_folds - 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"invalid strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")

    def to_dict(self) -> dict:
        """Return the settings as plain JSON-compatible values."""
        values = asdict(self)
        for key in ("data", "out", "cache_dir"):
            values[key] = None if values[key] is None else str(values[key])
        return values

    def describe(self) -> str:
        """Return the training recipe in one line, for reports."""
        parts = [f"{self.backbone} ({self.weights} weights)",
                 f"head on the frozen backbone{', 8 views' if self.views == 8 else ''}"]
        if self.finetune_epochs:
            jitter = f", jitter scale {self.scale_jitter:g} colour {self.color_jitter:g}" if (
                self.scale_jitter or self.color_jitter) else ""
            parts.append(f"then {self.finetune_epochs} fine-tuning epochs of {self.finetune_stages} stage(s), "
                         f"batch norm {self.batch_norm}{jitter}")
        parts.append(f"threshold {self.threshold_rule}" + (", TTA over 8 views" if self.tta else ""))
        return "; ".join(parts)

    def to_yaml(self) -> str:
        """Return the settings as YAML that ``load_settings`` and ``--config`` read back."""
        header = "# Resolved settings of a `leukemia train` run; pass this file to --config to rerun it.\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Rebuild the settings written by ``to_dict`` (a run directory's config.json).

        Raises:
            ValueError: a setting is unknown to this version, or invalid.
        """
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; the run was written by another version")
        values = dict(values)
        for key in ("data", "out"):
            if values.get(key) is None:
                raise ValueError(f"the setting {key!r} is missing; give --{key} or set {key} in the configuration file")
        check_types(cls, values)
        if isinstance(values.get("preprocess"), dict):
            check_types(PreprocessConfig, values["preprocess"], section="preprocess.")
        for key in ("data", "out", "cache_dir"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if isinstance(values.get("preprocess"), dict):
            values["preprocess"] = PreprocessConfig.from_dict(values["preprocess"])
        return cls(**values)


def check_types(cls: type, values: dict, *, section: str = "") -> None:
    """Raise ValueError naming the first setting whose value has the wrong type for ``cls``.

    YAML reads ``epochs: two`` as text and ``tta: 'false'`` as a non-empty, so true, string;
    both must fail here, before they reach arithmetic or an if.
    """
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        expected = hints.get(name)
        if expected is None or _matches(value, expected):
            continue
        raise ValueError(f"invalid setting {section}{name}: {value!r} is not {_describe(expected)}")


def _matches(value: object, expected: object) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is Path:
        return isinstance(value, (str, Path))
    if expected is PreprocessConfig:
        return isinstance(value, (dict, PreprocessConfig))
    return isinstance(value, expected)


def _describe(expected: object) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(expected))
    if origin is typing.Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(expected))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text", Path: "a path",
             type(None): "empty (null)", PreprocessConfig: "a mapping of preprocessing settings"}
    return names.get(expected, str(expected))


def load_settings(path: Path, *, aliases: dict[str, str] | None = None) -> dict:
    """Read training settings from a YAML (or JSON) file, checking the names; return them as a dict.

    Keys are the attribute names of ``TrainConfig``; ``preprocess`` contains a mapping of
    ``PreprocessConfig`` names. Any key may be left out, and takes its default or the value
    given on the command line. ``aliases`` maps other names users may write (the command-line
    spelling, such as ``lr``) to the setting, for the error's suggestion.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a YAML mapping, or names an unknown setting (the message
            suggests the nearest known name).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable YAML file: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of setting names to values, not a {type(values).__name__}")
    _check_names(path, values, [f.name for f in fields(TrainConfig)], aliases or {})
    if "preprocess" in values:
        if not isinstance(values["preprocess"], dict):
            raise ValueError(f"{path}: 'preprocess' must be a mapping of preprocessing settings")
        _check_names(path, values["preprocess"], [f.name for f in fields(PreprocessConfig)], aliases or {},
                     section="preprocess.")
    return values


def _check_names(path: Path, values: dict, known: list[str], aliases: dict[str, str], *, section: str = "") -> None:
    for name in values:
        if name in known:
            continue
        if name in aliases:
            hint = f"; the file spells it {aliases[name]}"
        else:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {section}{close[0]}?" if close else f"; known settings: {', '.join(known)}"
        raise ValueError(f"{path}: unknown setting {section}{name}{hint}")
