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
    assert config.finetune_epochs > 0 and config.finetune_stages == "all" and config.batch_norm == "frozen"
    assert config.views == 8 and config.tta and config.threshold_rule == "f1_weighted"
    assert 0 < config.scale_jitter < 0.5 and 0 < config.color_jitter < 1
    assert config.cv_fold is None, "the recipe is the challenge protocol: official folds to train, prelim test to report"


def test_command_line_overrides_the_file():
    config = _resolve("--config", str(CHALLENGE), "--data", "data", "--out", "run", "--backbone", "efficientnet_lite0",
                      "--finetune-epochs", "3", "--no-tta", "--image-size", "160")

    assert config.backbone == "efficientnet_lite0"
    assert config.finetune_epochs == 3
    assert config.tta is False
    assert config.preprocess.output_size == 160
    assert config.preprocess.crop == "bbox" and config.views == 8, "settings not given keep the file's values"


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


def test_unknown_setting_names_the_file_and_the_nearest_name(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("finetune_epoch: 3\n")

    with pytest.raises(ValueError, match=r"typo.yaml: unknown setting finetune_epoch; did you mean finetune_epochs\?"):
        load_settings(path)


def test_unknown_preprocess_setting(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("preprocess:\n  image_size: 160\n")

    with pytest.raises(ValueError, match="unknown setting preprocess.image_size"):
        load_settings(path)


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "must hold a mapping of setting names to values, not a list"),
    ("epochs: [1\n", "is not a readable YAML file"),
])
def test_malformed_file_rejected(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    with pytest.raises(ValueError, match=message):
        load_settings(path)


def test_invalid_value_in_file_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("batch_norm: sometimes\n")

    with pytest.raises(ValueError, match="invalid batch_norm 'sometimes'; use one of frozen, train"):
        _resolve("--config", str(path), "--data", "data", "--out", "run")


def test_cli_reports_missing_file_and_missing_data(tmp_path, caplog):
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--data", "d", "--out", "o"]) == 2
    assert f"configuration file not found: {tmp_path / 'none.yaml'}" in caplog.text

    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "needs --data and --out" in caplog.text


def test_resume_rejects_a_config_file(tmp_path, caplog):
    assert main(["train", "--resume", str(tmp_path), "--config", str(CHALLENGE)]) == 2
    assert "drop --config" in caplog.text
