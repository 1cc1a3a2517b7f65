"""Expanding the inputs of ``leukemia predict`` into a list of image files."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from leukemia.data.images import is_image_file

logger = logging.getLogger(__name__)


def collect_input_files(inputs: list[Path]) -> list[Path]:
    """Expand images, folders (recursively) and CSV files with a ``path`` column into files.

    Files that do not exist are kept in the list, so the output reports them instead of
    dropping them silently.

    Raises:
        ValueError: a CSV has no ``path`` column, or nothing was found.
    """
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                logger.warning("no images found in folder %s", item)
            paths.extend(found)
        elif item.suffix.lower() == ".csv":
            paths.extend(_paths_from_csv(item))
        else:
            paths.append(item)
    if not paths:
        raise ValueError("no input images found; pass image files, folders or a CSV with a 'path' column")
    return paths


def _paths_from_csv(csv_path: Path) -> list[Path]:
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "path" not in columns:
            raise ValueError(f"{csv_path}: missing column 'path'; the header is {', '.join(reader.fieldnames or [])}")
        paths = []
        for row in reader:
            value = (row[columns["path"]] or "").strip()
            if value:
                path = Path(value)
                paths.append(path if path.is_absolute() else csv_path.parent / path)
    return paths
