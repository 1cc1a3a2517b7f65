"""Run-directory locking: a second run into the same --out is rejected instead of mixing files.

A lock is the file ``run.lock`` that contains the owner's PID and host name. The owners here are real
processes: a live one started for the test, and one that has already ended.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from leukemia.cli import main
from leukemia.training.config import TrainConfig
from leukemia.training.run import RunDirectoryLockedError, resume_training, train

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"
CELL = SAMPLE / "training_data" / "fold_0" / "all" / "UID_14_11_1_all.jpg"


@pytest.fixture
def live_pid():
    """The PID of a process that runs for the whole test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _lock(run_dir: Path, pid: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    lock.write_text(f"{pid}\n{socket.gethostname()}\n")
    return lock


def _run_dir_with_config(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    config = TrainConfig(data=SAMPLE, out=run_dir, backbone="efficientnet_lite0", cache_dir=run_dir.parent / "cache")
    (run_dir / "config.yaml").write_text(config.to_yaml())
    return run_dir


def test_live_lock_rejects_train(tmp_path, live_pid, caplog):
    out = tmp_path / "run"
    lock = _lock(out, live_pid)

    code = main(["train", "--data", str(SAMPLE), "--out", str(out), "--backbone", "efficientnet_lite0"])

    assert code == 2
    assert f"another run (PID {live_pid} on {socket.gethostname()}) is writing into {out}" in caplog.text
    assert sorted(path.name for path in out.iterdir()) == ["run.lock"]
    assert lock.read_text().split()[0] == str(live_pid)


def test_live_lock_error_type(tmp_path, live_pid):
    out = tmp_path / "run"
    _lock(out, live_pid)

    with pytest.raises(RunDirectoryLockedError, match="wait for it to end or choose another --out"):
        train(TrainConfig(data=SAMPLE, out=out, backbone="efficientnet_lite0"))


def test_stale_lock_suggests_resume(tmp_path, dead_pid, caplog):
    out = tmp_path / "run"
    _lock(out, dead_pid)

    code = main(["train", "--data", str(SAMPLE), "--out", str(out), "--backbone", "efficientnet_lite0"])

    assert code == 2
    assert f"{out} is locked by run PID {dead_pid}, which no longer runs" in caplog.text
    assert f"continue it with `leukemia train --resume {out}`" in caplog.text


def test_lock_released_after_failure(tmp_path):
    data = tmp_path / "cells" / "all"
    data.mkdir(parents=True)
    shutil.copy(CELL, data / CELL.name)
    out = tmp_path / "run"
    config = TrainConfig(data=data.parent, out=out, backbone="efficientnet_lite0", cache_dir=tmp_path / "cache",
                         workers=1, progress=False)

    with pytest.raises(ValueError, match="no usable HEM image"):
        train(config)

    assert not (out / "run.lock").exists()
    assert not (out / "config.yaml").exists(), "a run that never trained leaves nothing to resume"


def test_resume_rejects_live_lock(tmp_path, live_pid):
    out = _run_dir_with_config(tmp_path / "run")
    lock = _lock(out, live_pid)

    with pytest.raises(RunDirectoryLockedError, match=f"PID {live_pid}"):
        resume_training(out)

    assert lock.read_text().split()[0] == str(live_pid)


def test_resume_damaged_checkpoint_named(tmp_path, dead_pid):
    out = _run_dir_with_config(tmp_path / "run")
    _lock(out, dead_pid)
    checkpoint = out / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"PK\x03\x04 half a checkpoint")

    with pytest.raises(RuntimeError, match=f"{checkpoint} is damaged and cannot be loaded") as caught:
        resume_training(out)

    assert "delete it and resume again to train from the first epoch" in str(caught.value)
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_two_processes_one_directory(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "leukemia.cli", "train", "--data", str(SAMPLE), "--out", str(out),
               "--backbone", "efficientnet_lite0", "--epochs", "3", "--cache-dir", str(tmp_path / "cache"),
               "--workers", "1"]

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors = [first.communicate(timeout=300)[1], second.communicate(timeout=300)[1]]

    codes = sorted([first.returncode, second.returncode])
    rejected_output = errors[[first.returncode, second.returncode].index(2)] if 2 in codes else ""
    assert codes == [0, 2]
    assert "is writing into" in rejected_output
    assert (out / "metrics.json").is_file()
    assert not (out / "run.lock").exists()
