"""On-disk cache of preprocessed cells, filled by parallel worker processes.

An entry's key is the SHA-256 of the image file's bytes together with the preprocessing
settings, so a renamed or moved file is still found, an edited file is not, and a changed
setting never returns a stale crop. Entries are lossless PNG files written atomically
(a temporary file, then a rename), so readers never see a half-written entry and a crash
during a write leaves at most a stray temporary file.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from leukemia.data.images import ImageReadError, read_image
from leukemia.preprocessing.cell import BlankImageError, PreprocessConfig, preprocess_cell

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Return ``$LEUKEMIA_CACHE``, else ``$XDG_CACHE_HOME/leukemia``, else ``~/.cache/leukemia``."""
    if os.environ.get("LEUKEMIA_CACHE"):
        return Path(os.environ["LEUKEMIA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "leukemia"


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass
class PreprocessCache:
    """Preprocessed cells stored under ``root/cells/<settings digest>/<ab>/<file digest>.png``."""

    root: Path
    config: PreprocessConfig

    @property
    def folder(self) -> Path:
        return self.root / "cells" / self.config.digest()

    def entry_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.png"

    def load(self, key: str) -> np.ndarray:
        """Return the cached (S, S, 3) uint8 RGB cell for a key returned by ``preprocess_files``."""
        image = cv2.imread(str(self.entry_path(key)), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cache entry missing or unreadable: {self.entry_path(key)}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def store(self, key: str, output: np.ndarray) -> None:
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(output, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for cache entry {key}")
        write_atomically(self.entry_path(key), encoded.tobytes())


@dataclass
class PreprocessOutcome:
    """The cache key of a preprocessed file, or the reason it was skipped."""

    path: Path
    key: str | None
    error: str | None = None
    cached: bool = False


def preprocess_files(
    paths: list[Path],
    cache: PreprocessCache,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> list[PreprocessOutcome]:
    """Preprocess files into the cache, skipping those already there; return one outcome per path.

    Unreadable and blank images are skipped with a warning that names the file; they never
    stop the run. ``workers`` defaults to every core; 0 or 1 runs in this process.
    """
    workers = os.cpu_count() or 1 if workers is None else workers
    jobs = [(Path(path), cache.root, cache.config) for path in paths]
    if workers <= 1 or len(jobs) < 2:
        results = map(_preprocess_one, jobs)
        outcomes = list(tqdm(results, total=len(jobs), desc="preprocess", unit="img", disable=not progress))
    else:
        chunksize = max(1, min(32, len(jobs) // (workers * 4)))
        # Workers are forked with one OpenCV thread each: the processes already use every core,
        # and OpenCV's own threads on top only add contention. The setting must be made before
        # the fork, because changing it inside a forked child can hang on the copied thread pool.
        opencv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_fork_context()) as pool:
                results = pool.map(_preprocess_one, jobs, chunksize=chunksize)
                outcomes = list(tqdm(results, total=len(jobs), desc="preprocess", unit="img", disable=not progress))
        finally:
            cv2.setNumThreads(opencv_threads)

    for outcome in outcomes:
        if outcome.error is not None:
            logger.warning("skipped %s: %s", outcome.path, outcome.error)
    return outcomes


def _fork_context() -> multiprocessing.context.BaseContext | None:
    """Return the fork context where the platform has one (Linux), else the default (spawn)."""
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _preprocess_one(job: tuple[Path, Path, PreprocessConfig]) -> PreprocessOutcome:
    path, root, config = job
    cache = PreprocessCache(root, config)
    try:
        key = file_digest(path)
    except OSError as error:
        return PreprocessOutcome(path, None, f"cannot be read ({error.strerror or error})")
    if cache.entry_path(key).is_file():
        return PreprocessOutcome(path, key, cached=True)

    try:
        result = preprocess_cell(read_image(path), config)
    except ImageReadError as error:
        return PreprocessOutcome(path, None, error.reason)
    except BlankImageError as error:
        return PreprocessOutcome(path, None, f"blank image: {error}")
    cache.store(key, result.output)
    return PreprocessOutcome(path, key)
