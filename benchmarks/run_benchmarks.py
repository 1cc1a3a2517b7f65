"""Measure the speed and memory targets of the tool in one run, each as a ratio to a named baseline.

    python benchmarks/run_benchmarks.py                 # everything, about 12 minutes on 2 cores
    python benchmarks/run_benchmarks.py --only inference

Measurements:

- training: end-to-end ``train()`` on the real subset, frozen ResNet50, the same epochs
  (early stopping off), head and split: cached features vs the live backbone every epoch,
  without augmentation and with the 8 dihedral views.
- preprocessing: cells per second with one worker process per core vs one process.
- inference: ResNet50 at 224x224, batch 32: the default engine vs plain float32 eager
  PyTorch, plus ONNX Runtime; the rate as a fraction of the measured dense GEMM rate.
- memory: peak resident memory of frozen training on a 10,000-image tree made by linking or
  copying the real images under new names.

Random ResNet50 weights are used where only speed is measured (the cost does not depend on
the values), so the script runs offline.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cnmc-subset"
RESNET50_MACS = 4.1e9  # multiply-adds per 224x224 image, as usually quoted for ResNet50
RESULTS: list[tuple[str, str, str, str]] = []  # (measurement, value, baseline, ratio)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real C-NMC cells (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs for both modes (default: 30)")
    parser.add_argument("--memory-images", type=int, default=10_000, help="images in the memory test tree")
    parser.add_argument("--only", choices=("training", "preprocessing", "inference", "memory"), action="append",
                        help="run only these measurements (repeatable)")
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error(f"data folder not found: {args.data}")
    os.environ.setdefault("TQDM_DISABLE", "1")

    selected = args.only or ["preprocessing", "inference", "training", "memory"]
    with tempfile.TemporaryDirectory(prefix="leukemia-bench-") as scratch:
        scratch = Path(scratch)
        if "preprocessing" in selected:
            bench_preprocessing(args.data, scratch)
        if "inference" in selected:
            bench_inference(scratch)
        if "training" in selected:
            bench_training(args.data, scratch, args.epochs)
        if "memory" in selected:
            bench_memory(args.data, scratch, args.memory_images)

    print_table()
    return 0


def bench_training(data: Path, scratch: Path, epochs: int) -> None:
    from leukemia.training.config import TrainConfig
    from leukemia.training.run import train

    def run(name: str, **options) -> tuple[float, dict]:
        config = TrainConfig(
            data=data, out=scratch / name, backbone="resnet50", weights="none", epochs=epochs,
            patience=epochs + 1, cache_dir=scratch / f"cache-{name}", progress=False, **options,
        )
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
        print(f"training {name}: {seconds:.1f} s, test ROC AUC {result.metrics['test']['roc_auc']}", flush=True)
        return seconds, result.metrics

    for views in (1, 8):
        cached_seconds, cached = run(f"cached-views{views}", views=views)
        live_seconds, live = run(f"live-views{views}", views=views, live_backbone=True)
        label = "no augmentation" if views == 1 else "8 dihedral views"
        record(
            f"frozen ResNet50 training, {epochs} epochs, {label}: cached features",
            f"{cached_seconds:.1f} s",
            f"live backbone every epoch: {live_seconds:.1f} s",
            live_seconds / cached_seconds,
        )
        print(f"  validation ROC AUC cached {cached['validation']['roc_auc']:.4f}, "
              f"live {live['validation']['roc_auc']:.4f}", flush=True)


def bench_preprocessing(data: Path, scratch: Path) -> None:
    from leukemia.data.discovery import discover
    from leukemia.preprocessing.cache import PreprocessCache, preprocess_files
    from leukemia.preprocessing.cell import PreprocessConfig

    paths = [sample.path for sample in discover(data).samples]
    cores = os.cpu_count() or 1

    def rate(workers: int) -> float:
        best = 0.0
        for attempt in range(3):
            cache = PreprocessCache(scratch / f"pre-{workers}-{attempt}", PreprocessConfig())
            start = time.perf_counter()
            preprocess_files(paths, cache, workers=workers, progress=False)
            best = max(best, len(paths) / (time.perf_counter() - start))
        return best

    single = rate(1)
    parallel = rate(cores)
    record(f"preprocessing, {cores} worker processes ({len(paths)} cells, best of 3)",
           f"{parallel:.0f} cells/s", f"one process: {single:.0f} cells/s", parallel / single)


def bench_inference(scratch: Path) -> None:
    import torch

    from leukemia.inference.engine import Engine
    from leukemia.models.backbones import create_backbone
    from leukemia.models.classifier import CellClassifier

    torch.manual_seed(0)
    backbone, spec = create_backbone("resnet50", weights=None)
    model = CellClassifier(backbone, spec).eval()
    batch = torch.randn(32, 3, 224, 224)

    def torch_rate(engine: Engine) -> float:
        prepared = engine.prepare(model)
        inputs = engine.prepare_batch(batch)

        def step() -> None:
            with torch.inference_mode(), engine.autocast():
                prepared(inputs)

        return images_per_second(step, len(batch))

    baseline = torch_rate(Engine.create("cpu", "float32", channels_last=False))
    default_engine = Engine.create("cpu", "auto")
    default = torch_rate(default_engine)
    gemm = gemm_rate(default_engine.precision)
    record(
        f"ResNet50 inference, batch 32, default path ({default_engine.precision}, channels-last)",
        f"{default:.1f} img/s ({default * RESNET50_MACS / 1e9:.0f} GMAC/s, "
        f"{default * RESNET50_MACS / gemm:.0%} of the {gemm / 1e9:.0f} GMAC/s dense GEMM rate)",
        f"float32 eager: {baseline:.1f} img/s",
        default / baseline,
    )

    onnx = onnx_rate(model, batch, scratch)
    if onnx is not None:
        record("ResNet50 inference, batch 32, ONNX Runtime float32", f"{onnx:.1f} img/s",
               f"float32 eager: {baseline:.1f} img/s", onnx / baseline)


def onnx_rate(model, batch, scratch: Path) -> float | None:
    try:
        import onnxruntime
        import torch
    except ImportError:
        print("ONNX Runtime not installed; skipping its measurement (pip install 'leukemia[onnx]')")
        return None
    path = scratch / "resnet50.onnx"
    torch.onnx.export(model, (batch[:1],), str(path), input_names=["image"], output_names=["logit"],
                      dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {"image": batch.numpy()}
    return images_per_second(lambda: session.run(None, inputs), len(batch))


def gemm_rate(precision: str) -> float:
    """Return multiply-adds per second of a large square matrix product, a practical CPU peak."""
    import torch

    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    size = 2048
    left, right = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return images_per_second(lambda: torch.mm(left, right), 1) * size**3


def bench_memory(data: Path, scratch: Path, n_images: int) -> None:
    tree = scratch / "synthetic"
    make_synthetic_tree(data, tree, n_images)
    command = [
        sys.executable, "-c",
        "import sys, resource; from leukemia.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
        "train", "--data", str(tree), "--out", str(scratch / "memory-run"), "--backbone", "resnet50",
        "--weights", "none", "--epochs", "3", "--cache-dir", str(scratch / "cache-memory"),
    ]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    if completed.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{completed.stderr[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in completed.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    notebook_gb = n_images * 224 * 224 * 3 * 4 / 1e9
    record(
        f"peak memory (RSS) of frozen training on {n_images:,} images ({time.perf_counter() - start:.0f} s)",
        f"{peak_kb / 1e6:.2f} GB (largest process of the run: {children_kb / 1e6:.2f} GB)",
        f"whole set as float32 in memory: {notebook_gb:.1f} GB",
        notebook_gb / (peak_kb / 1e6),
    )


def make_synthetic_tree(data: Path, tree: Path, n_images: int) -> None:
    """Fill all/ and hem/ with ``n_images`` links (or copies) of the real cells under new names.

    Each copy keeps its subject, so the subject split still works; the image number is made
    unique. Identical bytes share one preprocessing cache entry, so this measures memory of
    the run over 10,000 samples, not the time to preprocess 10,000 distinct cells.
    """
    from leukemia.data.discovery import discover

    samples = discover(data).labeled
    for index in range(n_images):
        sample = samples[index % len(samples)]
        class_name = "all" if sample.label == 1 else "hem"
        name = f"UID_{sample.subject}_{9000 + index}_1_{class_name}{sample.path.suffix}"
        target = tree / class_name / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(sample.path, target)
        except OSError:
            shutil.copyfile(sample.path, target)


def images_per_second(step: Callable[[], object], images_per_step: int, seconds: float = 8.0) -> float:
    step()  # warm-up: kernel selection and memory allocation
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += images_per_step
    return count / (time.perf_counter() - start)


def record(measurement: str, value: str, baseline: str, ratio: float) -> None:
    RESULTS.append((measurement, value, baseline, f"{ratio:.2f}x"))
    print(f"{measurement}: {value} vs {baseline} -> {ratio:.2f}x", flush=True)


def print_table() -> None:
    import torch

    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    print("| measurement | value | baseline | ratio |")
    print("| --- | --- | --- | --- |")
    for row in RESULTS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
