"""Finding labeled cell images in the layouts that C-NMC 2019 users have on disk.

Supported layouts, detected from folder names rather than configured:

- the Kaggle release ``C-NMC_Leukemia/`` with ``training_data/fold_*/{all,hem}``, the renamed
  preliminary-test images in ``validation_data/C-NMC_test_prelim_phase_data/`` labeled by
  ``C-NMC_test_prelim_phase_data_labels.csv``, and the unlabeled ``testing_data/``;
- the TCIA package, which uses ``C-NMC_training_data/fold_*`` and the same test folder names;
- any tree of ``all/`` and ``hem/`` folders;
- a CSV manifest with the columns ``path`` and ``label`` and an optional ``subject``.

Labels are fixed by name (``all`` is 1, ``hem`` is 0), never by the sort order of folders.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from leukemia.data.images import is_image_file

logger = logging.getLogger(__name__)

LABEL_BY_NAME = {"hem": 0, "all": 1}

# "UID_11_10_1_all.bmp" is subject 11, "UID_H10_43_1_hem.bmp" is subject H10; the release
# also writes one healthy subject as "h3", which is the same subject as "H3".
_SUBJECT_PATTERN = re.compile(r"^UID_([Hh]?\d+)_", re.ASCII)
_NAME_LABEL_PATTERN = re.compile(r"_(all|hem)\.[A-Za-z]+$", re.IGNORECASE)
_FOLD_PATTERN = re.compile(r"^fold_(\d+)$", re.IGNORECASE)
_PRELIM_TEST_DIR = "c-nmc_test_prelim_phase_data"
_FINAL_TEST_DIR = "c-nmc_test_final_phase_data"
_PRELIM_LABELS_SUFFIX = "prelim_phase_data_labels.csv"


@dataclass(frozen=True)
class Sample:
    """One cell image and what is known about it.

    Attributes:
        path: the image file.
        label: 1 for ALL, 0 for HEM, None when unlabeled.
        subject: the subject (patient) id, such as "11" or "H10", None when unknown.
        group: where the image came from: "fold_0" ... for the training folds, "train" for
            class folders outside a fold, "prelim_test", "final_test", or "manifest".
    """

    path: Path
    label: int | None
    subject: str | None
    group: str


@dataclass
class DataSet:
    """The images found under one root, with the layout and any problems met on the way."""

    root: Path
    layout: str
    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)

    @property
    def labeled(self) -> list[Sample]:
        return [sample for sample in self.samples if sample.label is not None]

    def counts(self) -> dict[str, int]:
        """Return the number of labeled images per class name and of unlabeled images."""
        counter = Counter(sample.label for sample in self.samples)
        return {"ALL": counter[1], "HEM": counter[0], "unlabeled": counter[None]}

    def file_list_digest(self) -> str:
        """Return a SHA-256 digest of the sorted relative paths, to recognise the same data set."""
        digest = hashlib.sha256()
        for sample in sorted(self.samples, key=lambda s: str(s.path)):
            digest.update(_relative(sample.path, self.root).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()


def parse_subject(file_name: str) -> str | None:
    """Return the subject id in a C-NMC file name, or None when the name has none.

    >>> parse_subject("UID_11_10_1_all.bmp"), parse_subject("UID_h3_10_1_hem.bmp")
    ('11', 'H3')
    """
    match = _SUBJECT_PATTERN.match(file_name)
    if match is None:
        return None
    return match.group(1).upper()


def parse_label(value: str | int, *, where: str) -> int:
    """Parse a label written as 0/1 or as a class name (ALL, HEM, any case).

    Raises:
        ValueError: the value is none of these; ``where`` names the file and row.
    """
    text = str(value).strip().lower()
    if text in LABEL_BY_NAME:
        return LABEL_BY_NAME[text]
    if text in ("0", "1"):
        return int(text)
    raise ValueError(f"{where}: invalid label {value!r}; use 1 or ALL for blasts and 0 or HEM for normal cells")


def discover(root: Path | str) -> DataSet:
    """Find every cell image under a folder, or in a CSV manifest.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: no image was found, or a manifest is invalid.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise ValueError(f"{root}: expected a folder of images or a CSV manifest (.csv)")
        return _read_manifest(root)

    image_paths = _list_image_files(root)
    if not image_paths:
        raise ValueError(
            f"no images found under {root}; expected BMP, PNG, JPEG or TIFF files in all/ and hem/ "
            "folders, the C-NMC_Leukemia release, or a CSV manifest"
        )

    warnings: list[str] = []
    prelim_labels = _read_prelim_labels(root, image_paths, warnings)
    samples = [_sample_from_path(path, root, prelim_labels) for path in image_paths]
    dataset = DataSet(root=root, layout=_detect_layout(samples, root), samples=samples, warnings=warnings)

    unlabeled_outside_tests = sum(1 for s in samples if s.label is None and s.group == "other")
    if unlabeled_outside_tests:
        warnings.append(
            f"{unlabeled_outside_tests} images under {root} are not in an all/ or hem/ folder "
            "nor in a labeled test set; they are not used for training or evaluation"
        )
    warnings.extend(_mixed_label_warnings(samples, root))
    warnings.extend(_name_label_warnings(samples, root))
    for message in warnings:
        logger.warning(message)
    return dataset


def _mixed_label_warnings(samples: list[Sample], where: Path) -> list[str]:
    """Return a warning naming the subjects that have images of both classes, if any.

    A subject is one patient with one diagnosis, so such a subject points to misplaced files
    or wrong labels. The subject split keeps it on one side, with both classes there.
    """
    labels_by_subject: dict[str, set[int]] = {}
    for sample in samples:
        if sample.subject is not None and sample.label is not None:
            labels_by_subject.setdefault(sample.subject, set()).add(sample.label)
    mixed = sorted(subject for subject, labels in labels_by_subject.items() if len(labels) > 1)
    if not mixed:
        return []
    return [
        f"subject(s) {', '.join(mixed)} in {where} have images labeled both ALL and HEM; one subject is "
        "one patient with one diagnosis, so check the folders or labels of these images"
    ]


def _name_label_warnings(samples: list[Sample], where: Path) -> list[str]:
    """Return a warning when C-NMC file names (``..._all.bmp``, ``..._hem.bmp``) disagree with their folder.

    The label comes from the folder; a name that says the other class points to a misplaced file.
    """
    disagreeing = []
    for sample in samples:
        if sample.label is None or sample.group in ("prelim_test", "manifest"):
            continue
        named = _NAME_LABEL_PATTERN.search(sample.path.name)
        if named is not None and LABEL_BY_NAME[named.group(1).lower()] != sample.label:
            disagreeing.append(sample.path)
    if not disagreeing:
        return []
    examples = ", ".join(str(path) for path in disagreeing[:3])
    return [
        f"{len(disagreeing)} images under {where} are named as the other class than their all/ or hem/ "
        f"folder (for example {examples}); the folder decides the label, so check that they are in the right folder"
    ]


def _list_image_files(root: Path) -> list[Path]:
    """List image files under root, following symbolic links once and skipping loops.

    A class folder (all/, hem/) without any image below it is logged, because it usually
    means a copy that went wrong.
    """
    found: list[Path] = []
    visited_dirs: set[str] = set()
    class_dirs: list[Path] = []
    for dir_path, dir_names, file_names in os.walk(root, followlinks=True):
        real_dir = os.path.realpath(dir_path)
        if real_dir in visited_dirs:
            logger.warning("skipping %s: a symbolic link leads back to a folder already listed", dir_path)
            dir_names[:] = []
            continue
        visited_dirs.add(real_dir)
        dir_names.sort()
        if Path(dir_path).name.lower() in LABEL_BY_NAME:
            class_dirs.append(Path(dir_path))
        for name in sorted(file_names):
            path = Path(dir_path) / name
            if is_image_file(path) and not name.startswith("."):
                found.append(path)

    with_images = {parent for path in found for parent in path.parents}
    for class_dir in class_dirs:
        if class_dir not in with_images:
            logger.warning("the class folder %s contains no image file (BMP, PNG, JPEG or TIFF); "
                           "check that its images were copied", class_dir)
    return found


def _sample_from_path(path: Path, root: Path, prelim_labels: dict[str, tuple[int, str | None]]) -> Sample:
    parts = [part.lower() for part in path.relative_to(root).parts[:-1]]
    fold = next((part for part in parts if _FOLD_PATTERN.match(part)), None)

    class_dir = next((part for part in reversed(parts) if part in LABEL_BY_NAME), None)
    if class_dir is not None:
        return Sample(path, LABEL_BY_NAME[class_dir], parse_subject(path.name), fold or "train")

    if any(_PRELIM_TEST_DIR in part for part in parts):
        label, subject = prelim_labels.get(path.name, prelim_labels.get(path.stem, (None, None)))
        return Sample(path, label, subject, "prelim_test")

    if any(_FINAL_TEST_DIR in part for part in parts):
        return Sample(path, None, None, "final_test")
    return Sample(path, None, parse_subject(path.name), "other")


def _read_prelim_labels(
    root: Path, image_paths: list[Path], warnings: list[str]
) -> dict[str, tuple[int, str | None]]:
    """Read the preliminary-test labels CSV: renamed file -> (label, subject).

    The CSV has the columns ``Patient_ID`` (the original file name, which holds the subject),
    ``new_names`` (the renamed file, such as ``1.bmp``) and ``labels`` (1 ALL, 0 HEM). Each
    entry is stored under the full name and the stem, so a set converted to another format
    still matches.
    """
    csv_paths = sorted(p for p in root.rglob("*.csv") if p.name.lower().endswith(_PRELIM_LABELS_SUFFIX))
    if not csv_paths:
        return {}

    present = {path.name for path in image_paths if any(_PRELIM_TEST_DIR in p.lower() for p in path.parts[:-1])}
    present_stems = {Path(name).stem for name in present}
    labels: dict[str, tuple[int, str | None]] = {}
    for csv_path in csv_paths:
        rows = _read_csv_rows(csv_path, required=("Patient_ID", "new_names", "labels"))
        missing = 0
        for line_number, row in rows:
            new_name = row["new_names"].strip()
            entry = (
                parse_label(row["labels"], where=f"{csv_path}, line {line_number}"),
                parse_subject(row["Patient_ID"].strip()),
            )
            labels[new_name] = entry
            labels[Path(new_name).stem] = entry
            if new_name not in present and Path(new_name).stem not in present_stems:
                missing += 1
        if missing:
            warnings.append(
                f"{missing} of {len(rows)} images listed in {csv_path} are missing; "
                "the preliminary test set holds only the images found"
            )
    return labels


def _read_manifest(csv_path: Path) -> DataSet:
    """Read a CSV manifest with the columns path, label and optionally subject.

    Relative paths are taken from the manifest's folder. Labels may be 0/1 or ALL/HEM.
    Rows that list the same file twice are an error, because they would weigh it twice.
    """
    rows = _read_csv_rows(csv_path, required=("path", "label"), optional=("subject",))
    if not rows:
        raise ValueError(f"{csv_path}: the manifest has a header but no rows")

    samples: list[Sample] = []
    seen: dict[Path, int] = {}
    warnings: list[str] = []
    for line_number, row in rows:
        where = f"{csv_path}, line {line_number}"
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            raise ValueError(f"{where}: the path column is empty")
        path = Path(raw_path) if Path(raw_path).is_absolute() else csv_path.parent / raw_path
        if path in seen:
            raise ValueError(f"{where}: {raw_path} is listed again (first on line {seen[path]}); remove the duplicate row")
        seen[path] = line_number
        if not path.is_file():
            warnings.append(f"{where}: image not found: {path}")
            continue
        subject = (row.get("subject") or "").strip() or parse_subject(path.name)
        samples.append(Sample(path, parse_label(row["label"], where=where), subject, "manifest"))

    warnings.extend(_mixed_label_warnings(samples, csv_path))
    for message in warnings:
        logger.warning(message)
    if not samples:
        raise ValueError(f"{csv_path}: none of the {len(rows)} listed images exists; check the paths")
    return DataSet(root=csv_path.parent, layout="CSV manifest", samples=samples, warnings=warnings)


def _read_csv_rows(
    csv_path: Path, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV into (line number, row) pairs keyed by the required and optional column names.

    A byte-order mark, Windows line endings and spaces around values are accepted. Header names
    match in any case; a missing optional column reads as empty strings.

    Raises:
        ValueError: a required column is missing.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path}: the CSV file is empty; expected a header with {', '.join(required)}")
        names = [name.strip() for name in header]
        lookup = {name.lower(): name for name in names}
        missing = [column for column in required if column.lower() not in lookup]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; the header is {', '.join(names)}"
            )

        rows = []
        for line_number, values in enumerate(reader, start=2):
            if not any(value.strip() for value in values):
                continue
            row = {name: value.strip() for name, value in zip(names, values)}
            columns = required + optional
            rows.append((line_number, {column: row.get(lookup.get(column.lower(), ""), "") for column in columns}))
    return rows


def _detect_layout(samples: list[Sample], root: Path) -> str:
    relative_dirs = {_relative(sample.path.parent, root).lower() for sample in samples}
    if any("c-nmc_training_data" in d for d in relative_dirs):
        return "C-NMC TCIA package"
    if any("training_data/fold_" in d for d in relative_dirs):
        return "C-NMC Kaggle release"
    return "class folders (all/, hem/)"


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
