"""Measure images per second on one CUDA GPU: head training on the live backbone, and inference.

    python benchmarks/gpu_throughput.py                       # ResNet50 at 224, batch 128, 8 loader workers
    python benchmarks/gpu_throughput.py --precision float16 --workers 16 --images 8192

Both measurements read preprocessed cells from the on-disk cache through DataLoader worker
processes into pinned memory, as the train job does. They run the backbone in channels-last
memory format under bfloat16 or float16 autocast, as the engine chooses for the GPU unless
--precision is given:

- training: Lightning's Trainer fits the classifier's head with ``live_backbone=True``, the
  frozen backbone running on every batch (the path of ``leukemia train --live-backbone``);
- inference: the backbone and the head on every batch under ``torch.inference_mode``.

The cells are the real sample cells in ``examples/`` (or --data), preprocessed once into a
temporary cache and repeated to --images samples, shown in their 8 dihedral views. The
backbone has random weights, because the speed does not depend on the values and the script
then runs offline. The first --warmup batches are not timed (cuDNN picks its algorithms there).
Without a CUDA GPU the script exits with a message and status 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "examples" / "cnmc-sample"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real C-NMC cells (default: %(default)s)")
    parser.add_argument("--backbone", default="resnet50", help="backbone (default: resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default: 224)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes (default: 8)")
    parser.add_argument("--images", type=int, default=4096, help="samples per measurement (default: 4096)")
    parser.add_argument("--warmup", type=int, default=5, help="batches not timed (default: 5)")
    parser.add_argument("--precision", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="backbone autocast precision (default: auto, bfloat16 where the GPU supports it)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False), and this script measures "
              "GPU throughput only; run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch. "
              "benchmarks/run_benchmarks.py measures the CPU.", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        parser.error(f"data folder not found: {args.data}")
    if args.images < (args.warmup + 1) * args.batch_size:
        parser.error(f"--images {args.images} leaves no timed batch; use at least {(args.warmup + 1) * args.batch_size}")

    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="leukemia-gpu-bench-") as scratch:
        dataset = _cell_dataset(args.data, Path(scratch), args.backbone, args.image_size, args.images)
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.backbone} at "
              f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.workers} loader workers")
        training = _training_rate(dataset, args)
        inference = _inference_rate(dataset, args)
    print(f"training (head on the live backbone): {training:8.0f} images/s")
    print(f"inference (backbone and head):        {inference:8.0f} images/s")
    return 0


def _cell_dataset(data: Path, scratch: Path, backbone: str, image_size: int, n_images: int):
    """Preprocess the real cells into a cache in ``scratch``; return a dataset of ``n_images`` samples."""
    from leukemia.data.discovery import discover
    from leukemia.models.backbones import create_backbone
    from leukemia.preprocessing.cache import PreprocessCache, preprocess_files
    from leukemia.preprocessing.cell import PreprocessConfig
    from leukemia.training.datasets import CachedCellDataset

    cache = PreprocessCache(scratch / "cache", PreprocessConfig(output_size=image_size))
    outcomes = preprocess_files([sample.path for sample in discover(data).samples], cache, progress=False)
    keys = [outcome.key for outcome in outcomes if outcome.key is not None]
    if not keys:
        raise SystemExit(f"none of the images under {data} could be preprocessed")
    _, spec = create_backbone(backbone, weights=None)
    n_cells = -(-n_images // 8)
    repeated = [keys[index % len(keys)] for index in range(n_cells)]
    return CachedCellDataset(cache, repeated, [index % 2 for index in range(n_cells)], spec.mean, spec.std, n_views=8)


def _loader(dataset, args: argparse.Namespace, *, shuffle: bool):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.workers,
                      pin_memory=True, persistent_workers=args.workers > 0, drop_last=True)


def _model(args: argparse.Namespace):
    """Return a classifier with a frozen random backbone, and the engine that runs it on the GPU."""
    from leukemia.inference.engine import Engine
    from leukemia.models.backbones import create_backbone
    from leukemia.models.classifier import CellClassifier

    engine = Engine.create("cuda", args.precision)
    backbone, spec = create_backbone(args.backbone, weights=None)
    model = CellClassifier(backbone, spec)
    model.freeze_backbone()
    engine.prepare(model.backbone)
    return model, engine


def _training_rate(dataset, args: argparse.Namespace) -> float:
    import lightning as L
    import torch

    from leukemia.training.module import FrozenBackboneModule

    class Clock(L.Callback):
        """Times the batches after the warm-up, with the GPU's queue drained at both ends."""

        def __init__(self) -> None:
            self.start = 0.0
            self.seconds = 0.0
            self.timed = 0

        def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
            if batch_index == args.warmup:
                torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
            if batch_index >= args.warmup:
                self.timed += len(batch[1])

        def on_train_epoch_end(self, trainer, module) -> None:
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    model, engine = _model(args)
    module = FrozenBackboneModule(model, learning_rate=1e-3, pos_weight=1.0, live_backbone=True, engine=engine)
    clock = Clock()
    trainer = L.Trainer(accelerator=engine.device.type, devices=1, max_epochs=1, callbacks=[clock], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _loader(dataset, args, shuffle=True))
    return clock.timed / clock.seconds


def _inference_rate(dataset, args: argparse.Namespace) -> float:
    import torch

    model, engine = _model(args)
    model.head.to(engine.device).eval()
    timed, start = 0, 0.0
    with torch.inference_mode():
        for batch_index, (batch, _) in enumerate(_loader(dataset, args, shuffle=False)):
            if batch_index == args.warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with engine.autocast():
                features = model.forward_features(engine.prepare_batch(batch))
            torch.sigmoid(model.forward_head(features.float())).cpu()
            if batch_index >= args.warmup:
                timed += len(batch)
    torch.cuda.synchronize()
    return timed / (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
