"""Settings from a YAML file with command-line overrides, and their round trip through a run."""

from pathlib import Path

import pytest

from leukemia.cli import _build_parser, main
from leukemia.training.config import TrainConfig, load_settings
from leukemia.training.options import resolve_config

REPO = Path(__file__).resolve().parents[2]
CHALLENGE = REPO / "configs" / "cnmc-challenge.yaml"


def _resolve(*argv: str) -> TrainConfig:
    return resolve_config(_build_parser().parse_args(["train", *argv]))


def test_challenge_recipe_loads():
    config = _resolve("--config", str(CHALLENGE), "--data", "data", "--out", "run")

    assert config.backbone == "resnet50"
    assert config.finetune_epochs > 0
    assert config.finetune_stages == "all"
    assert config.batch_norm == "frozen"
    assert config.views == 8
    assert config.tta
    assert config.threshold_rule == "f1_weighted"
    assert 0 < config.scale_jitter < 0.5
    assert 0 < config.color_jitter < 1
    assert config.cv_fold is None, "the recipe is the challenge protocol: official folds to train, prelim test to report"


def test_command_line_overrides_the_file():
    config = _resolve("--config", str(CHALLENGE), "--data", "data", "--out", "run", "--backbone", "efficientnet_lite0",
                      "--finetune-epochs", "3", "--no-tta", "--image-size", "160")

    assert config.backbone == "efficientnet_lite0"
    assert config.finetune_epochs == 3
    assert config.tta is False
    assert config.preprocess.output_size == 160
    assert config.preprocess.crop == "bbox", "settings not given keep the file's values"
    assert config.views == 8


def test_defaults_without_a_file():
    config = _resolve("--data", "data", "--out", "run")

    assert config == TrainConfig(data=Path("data"), out=Path("run"))


def test_yaml_round_trip(tmp_path):
    config = _resolve("--config", str(CHALLENGE), "--data", "data", "--out", "run", "--finetune-stages", "2",
                      "--pos-weight", "1.5", "--crop", "fixed")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())

    again = TrainConfig.from_dict(load_settings(path))

    assert again == config
    assert _resolve("--config", str(path)) == config, "a run's config.yaml reruns the run"


def test_unknown_setting_suggests_nearest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("finetune_epoch: 3\n")

    with pytest.raises(ValueError, match=r"typo.yaml: unknown setting finetune_epoch; did you mean finetune_epochs\?"):
        load_settings(path)


def test_unknown_preprocess_setting(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("preprocess:\n  image_size: 160\n")

    with pytest.raises(ValueError, match="unknown setting preprocess.image_size"):
        load_settings(path)


def test_cli_reports_missing_file_and_missing_data(tmp_path, caplog):
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--data", "d", "--out", "o"]) == 2
    assert f"configuration file not found: {tmp_path / 'none.yaml'}" in caplog.text

    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "needs --data and --out" in caplog.text


def test_resume_rejects_a_config_file(tmp_path, caplog):
    assert main(["train", "--resume", str(tmp_path), "--config", str(CHALLENGE)]) == 2
    assert "drop --config" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("epochs: two\n", "invalid setting epochs: 'two' is not a whole number"),
    ("tta: 'false'\n", "invalid setting tta: 'false' is not true or false"),
    ("learning_rate: fast\n", "invalid setting learning_rate: 'fast' is not a number"),
    ("pos_weight: lots\n", "invalid pos_weight 'lots'; use 'auto' or a number above 0"),
    ("preprocess:\n  output_size: big\n", "invalid setting preprocess.output_size: 'big' is not a whole number"),
    ("finetune_epochs: 1\nwarmup_epochs: 5\n", r"warmup_epochs \(5\) exceeds finetune_epochs \(1\)"),
    ("- a\n- b\n", "must hold a mapping of setting names to values, not a list"),
    ("epochs: [1\n", "is not a readable YAML file"),
    ("batch_norm: sometimes\n", "invalid batch_norm 'sometimes'; use one of frozen, train"),
    ("lr: 0.01\n", "unknown setting lr; the file spells it learning_rate"),
])
def test_bad_file_content_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    with pytest.raises(ValueError, match=message):
        _resolve("--config", str(path), "--data", "data", "--out", "run")


def test_too_many_finetune_stages_rejected_before_training(tmp_path, caplog):
    code = main(["train", "--data", str(REPO / "examples" / "cnmc-sample"), "--out", str(tmp_path / "run"),
                 "--backbone", "efficientnet_lite0", "--weights", "none", "--finetune-epochs", "1",
                 "--finetune-stages", "9", "--cache-dir", str(tmp_path / "cache")])

    assert code == 2
    assert "invalid finetune_stages 9: efficientnet_lite0 has 5 stages; use 1 to 5, or all" in caplog.text
    assert not (tmp_path / "run" / "checkpoints").exists()
