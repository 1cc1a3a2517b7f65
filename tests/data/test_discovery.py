"""Tests of data discovery: the C-NMC layouts, CSV manifests and subject parsing."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from leukemia.data import discover, parse_subject

PRELIM_LABELS_HEADER = "Patient_ID,new_names,labels\n"


def touch(root: Path, *relative_paths: str) -> list[Path]:
    """Create empty files, which is enough because discovery reads file names, never pixels."""
    paths = []
    for relative in relative_paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        paths.append(path)
    return paths


def by_name(dataset) -> dict:
    return {sample.path.name: sample for sample in dataset.samples}


# Layouts


def test_kaggle_layout_labels_and_groups(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    touch(
        root,
        "training_data/fold_0/all/UID_11_10_1_all.bmp",
        "training_data/fold_1/hem/UID_H10_43_1_hem.bmp",
        "validation_data/C-NMC_test_prelim_phase_data/1.bmp",
        "validation_data/C-NMC_test_prelim_phase_data/2.bmp",
        "testing_data/C-NMC_test_final_phase_data/1.bmp",
    )
    (root / "validation_data/C-NMC_test_prelim_phase_data_labels.csv").write_text(
        PRELIM_LABELS_HEADER + "UID_57_29_1_all.bmp,1.bmp,1\nUID_H49_35_1_hem.bmp,2.bmp,0\n"
    )

    dataset = discover(root)
    found = {(s.path.relative_to(root).as_posix(), s.label, s.subject, s.group) for s in dataset.samples}

    assert dataset.layout == "C-NMC Kaggle release"
    assert found == {
        ("training_data/fold_0/all/UID_11_10_1_all.bmp", 1, "11", "fold_0"),
        ("training_data/fold_1/hem/UID_H10_43_1_hem.bmp", 0, "H10", "fold_1"),
        ("validation_data/C-NMC_test_prelim_phase_data/1.bmp", 1, "57", "prelim_test"),
        ("validation_data/C-NMC_test_prelim_phase_data/2.bmp", 0, "H49", "prelim_test"),
        ("testing_data/C-NMC_test_final_phase_data/1.bmp", None, None, "final_test"),
    }
    assert dataset.warnings == []


def test_tcia_layout_labels_and_groups(tmp_path):
    touch(
        tmp_path,
        "C-NMC_training_data/fold_0/all/UID_1_1_1_all.bmp",
        "C-NMC_training_data/fold_2/hem/UID_H3_1_1_hem.bmp",
        "C-NMC_test_prelim_phase_data/7.bmp",
        "C-NMC_test_final_phase_data/1.bmp",
    )
    (tmp_path / "C-NMC_test_prelim_phase_data_labels.csv").write_text(
        PRELIM_LABELS_HEADER + "UID_H20_1_1_hem.bmp,7.bmp,0\n"
    )

    dataset = discover(tmp_path)
    found = {(s.path.name, s.label, s.subject, s.group) for s in dataset.samples}

    assert dataset.layout == "C-NMC TCIA package"
    assert found == {
        ("UID_1_1_1_all.bmp", 1, "1", "fold_0"),
        ("UID_H3_1_1_hem.bmp", 0, "H3", "fold_2"),
        ("7.bmp", 0, "H20", "prelim_test"),
        ("1.bmp", None, None, "final_test"),
    }


def test_class_folders_any_nesting_and_case(tmp_path):
    touch(
        tmp_path,
        "all/UID_5_1_1_all.png",
        "hem/UID_H7_1_1_hem.png",
        "site_a/batch_1/ALL/cell_a.png",
        "site_b/HEM/deeper/still/cell_b.bmp",
        "Hem/cell_c.jpg",
    )

    dataset = discover(tmp_path)
    samples = by_name(dataset)

    assert dataset.layout == "class folders (all/, hem/)"
    assert dataset.counts() == {"ALL": 2, "HEM": 3, "unlabeled": 0}
    assert samples["cell_a.png"].label == 1
    assert samples["cell_b.bmp"].label == 0
    assert samples["cell_c.jpg"].label == 0
    assert samples["UID_5_1_1_all.png"].subject == "5"
    assert samples["cell_a.png"].subject is None
    assert {sample.group for sample in dataset.samples} == {"train"}


def test_innermost_class_folder_wins(tmp_path):
    touch(tmp_path, "all/hem/cell.png", "hem/all/other.png")

    samples = by_name(discover(tmp_path))

    assert samples["cell.png"].label == 0
    assert samples["other.png"].label == 1


def test_unlabeled_images_give_warning(tmp_path):
    touch(tmp_path, "all/a.png", "hem/b.png", "unsorted/c.png")

    dataset = discover(tmp_path)

    assert by_name(dataset)["c.png"].label is None
    assert dataset.counts()["unlabeled"] == 1
    assert len(dataset.warnings) == 1
    assert "1 images" in dataset.warnings[0]
    assert "not in an all/ or hem/ folder" in dataset.warnings[0]


def test_sample_in_repository(sample_dir):
    dataset = discover(sample_dir)

    assert dataset.layout == "C-NMC Kaggle release"
    assert dataset.counts() == {"ALL": 24, "HEM": 24, "unlabeled": 0}
    assert dataset.warnings == []


@pytest.mark.parametrize(
    "name",
    ["a.BMP", "b.Png", "c.JPEG", "d.tif", "e.TIFF", "f.jpg", "g.JpG", "h.bmp"],
)
def test_extension_any_case(tmp_path, name):
    touch(tmp_path, f"all/{name}")

    dataset = discover(tmp_path)

    assert [sample.path.name for sample in dataset.samples] == [name]


def test_other_files_ignored(tmp_path):
    touch(tmp_path, "all/cell.png", "all/notes.txt", "all/.hidden.png", "hem/Thumbs.db", "hem/cell.gif")

    dataset = discover(tmp_path)

    assert [sample.path.name for sample in dataset.samples] == ["cell.png"]


def test_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found"):
        discover(tmp_path / "nowhere")


def test_folder_without_images_raises(tmp_path):
    touch(tmp_path, "all/readme.txt")

    with pytest.raises(ValueError, match="no images found"):
        discover(tmp_path)


def test_non_csv_file_raises(tmp_path):
    (path,) = touch(tmp_path, "list.txt")

    with pytest.raises(ValueError, match=r"CSV manifest \(\.csv\)"):
        discover(path)


# Subject parsing


@pytest.mark.parametrize(
    ("file_name", "subject"),
    [
        ("UID_11_10_1_all.bmp", "11"),
        ("UID_H10_43_1_hem.bmp", "H10"),
        ("UID_h3_10_1_hem.bmp", "H3"),
        ("UID_1_2_3_all.jpg", "1"),
        ("1105.bmp", None),
        ("cell_0001.png", None),
        ("UID_X1_2_3_hem.bmp", None),
    ],
)
def test_parse_subject_cases(file_name, subject):
    assert parse_subject(file_name) == subject


def test_h3_spellings_one_subject(tmp_path):
    touch(tmp_path, "hem/UID_h3_1_1_hem.bmp", "hem/UID_H3_2_1_hem.bmp")

    dataset = discover(tmp_path)

    assert {sample.subject for sample in dataset.samples} == {"H3"}


# Preliminary test set


def test_prelim_renamed_image_from_csv(tmp_path):
    touch(tmp_path, "validation_data/C-NMC_test_prelim_phase_data/1105.bmp")
    (tmp_path / "validation_data/C-NMC_test_prelim_phase_data_labels.csv").write_text(
        PRELIM_LABELS_HEADER + "UID_53_4_8_all.bmp,1105.bmp,1\n"
    )

    (sample,) = discover(tmp_path).samples

    assert sample.label == 1
    assert sample.subject == "53"
    assert sample.group == "prelim_test"


def test_prelim_converted_image_matches_stem(tmp_path):
    touch(tmp_path, "validation_data/C-NMC_test_prelim_phase_data/12.png")
    (tmp_path / "validation_data/C-NMC_test_prelim_phase_data_labels.csv").write_text(
        PRELIM_LABELS_HEADER + "UID_H14_2_1_hem.bmp,12.bmp,0\n"
    )

    dataset = discover(tmp_path)
    (sample,) = dataset.samples

    assert sample.label == 0
    assert sample.subject == "H14"
    assert dataset.warnings == []


def test_prelim_missing_images_warning(tmp_path, caplog):
    touch(tmp_path, "validation_data/C-NMC_test_prelim_phase_data/1.bmp")
    (tmp_path / "validation_data/C-NMC_test_prelim_phase_data_labels.csv").write_text(
        PRELIM_LABELS_HEADER
        + "UID_57_29_1_all.bmp,1.bmp,1\nUID_57_22_2_all.bmp,2.bmp,1\nUID_H49_35_1_hem.bmp,3.bmp,0\n"
    )

    with caplog.at_level(logging.WARNING, logger="leukemia.data.discovery"):
        dataset = discover(tmp_path)

    assert dataset.counts() == {"ALL": 1, "HEM": 0, "unlabeled": 0}
    assert len(dataset.warnings) == 1
    assert "2 of 3 images" in dataset.warnings[0]
    assert "2 of 3 images" in caplog.text


def test_prelim_image_not_in_csv(tmp_path):
    touch(tmp_path, "validation_data/C-NMC_test_prelim_phase_data/99.bmp")
    (tmp_path / "validation_data/C-NMC_test_prelim_phase_data_labels.csv").write_text(PRELIM_LABELS_HEADER)

    (sample,) = discover(tmp_path).samples

    assert sample.label is None
    assert sample.group == "prelim_test"


def test_prelim_csv_invalid_label(tmp_path):
    touch(tmp_path, "validation_data/C-NMC_test_prelim_phase_data/1.bmp")
    (tmp_path / "validation_data/C-NMC_test_prelim_phase_data_labels.csv").write_text(
        PRELIM_LABELS_HEADER + "UID_57_29_1_all.bmp,1.bmp,2\n"
    )

    with pytest.raises(ValueError, match=r"line 2: invalid label '2'"):
        discover(tmp_path)


def test_real_subset_counts(cnmc_subset):
    dataset = discover(cnmc_subset)
    prelim = [sample for sample in dataset.samples if sample.group == "prelim_test"]

    assert dataset.layout == "C-NMC Kaggle release"
    assert dataset.counts() == {"ALL": 298, "HEM": 94, "unlabeled": 0}
    assert [(s.path.name, s.label, s.subject) for s in prelim] == [("1105.bmp", 1, "53")]
    assert len(dataset.warnings) == 1
    assert "1866 of 1867 images" in dataset.warnings[0]


def test_real_subset_jpeg_counts(cnmc_subset_jpeg):
    dataset = discover(cnmc_subset_jpeg)

    assert dataset.counts() == {"ALL": 298, "HEM": 94, "unlabeled": 0}
    assert {sample.path.suffix for sample in dataset.samples} == {".jpg"}


# Every file name of the Kaggle release


@pytest.fixture(scope="module")
def release_tree(release_listing, tmp_path_factory) -> tuple[Path, list[dict]]:
    """An empty file for every image of the release listing, and the real labels CSV."""
    with open(release_listing, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    root = tmp_path_factory.mktemp("release")
    labels_csv = release_listing.parent / "cnmc-subset/validation_data/C-NMC_test_prelim_phase_data_labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"labels CSV not found at {labels_csv}")

    made_dirs: set[Path] = set()
    for row in rows:
        path = root / row["path"]
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        if path.suffix == ".csv":
            shutil.copyfile(labels_csv, path)
        else:
            path.touch()
    return root / "C-NMC_Leukemia", rows


def test_release_listing_rows(release_tree):
    _, rows = release_tree
    suffixes = Counter(Path(row["path"]).suffix for row in rows)

    assert suffixes == {".bmp": 15114, ".csv": 1}


def test_release_labels_csv_is_official(release_tree):
    root, rows = release_tree
    (csv_row,) = [row for row in rows if row["path"].endswith(".csv")]
    copied = root.parent / csv_row["path"]

    assert hashlib.sha256(copied.read_bytes()).hexdigest() == csv_row["sha256"]


def test_release_tree_counts(release_tree):
    root, _ = release_tree

    dataset = discover(root)
    per_group = Counter(
        ("folds" if sample.group.startswith("fold_") else sample.group, sample.label) for sample in dataset.samples
    )

    assert dataset.layout == "C-NMC Kaggle release"
    assert per_group == {
        ("folds", 1): 7272,
        ("folds", 0): 3389,
        ("prelim_test", 1): 1219,
        ("prelim_test", 0): 648,
        ("final_test", None): 2586,
    }
    assert sum(1 for s in dataset.samples if s.group == "prelim_test" and s.label is not None) == 1867
    assert dataset.warnings == []


def test_release_tree_every_subject(release_tree):
    root, _ = release_tree

    dataset = discover(root)
    without_subject = [s.path.name for s in dataset.samples if s.label is not None and s.subject is None]

    assert without_subject == []


# CSV manifests


def write_manifest(folder: Path, text: str, *, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path = folder / "manifest.csv"
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


@pytest.mark.parametrize(
    ("written", "label"),
    [("1", 1), ("0", 0), ("ALL", 1), ("HEM", 0), ("all", 1), ("hem", 0), (" Hem ", 0)],
)
def test_manifest_label_spellings(tmp_path, written, label):
    touch(tmp_path, "img/a.bmp")
    manifest = write_manifest(tmp_path, f"path,label\nimg/a.bmp,{written}\n")

    (sample,) = discover(manifest).samples

    assert sample.label == label


def test_manifest_bom_and_crlf(tmp_path):
    touch(tmp_path, "img/UID_4_1_1_all.bmp", "img/b.png")
    text = "path,label,subject\nimg/UID_4_1_1_all.bmp,ALL,\nimg/b.png,hem,P2\n"
    manifest = write_manifest(tmp_path, text, encoding="utf-8-sig", newline="\r\n")

    dataset = discover(manifest)
    samples = by_name(dataset)

    assert dataset.layout == "CSV manifest"
    assert samples["UID_4_1_1_all.bmp"].label == 1
    assert samples["UID_4_1_1_all.bmp"].subject == "4"
    assert samples["b.png"].label == 0
    assert samples["b.png"].subject == "P2"
    assert {sample.group for sample in dataset.samples} == {"manifest"}


def test_manifest_absolute_paths(tmp_path):
    (image,) = touch(tmp_path, "elsewhere/cell.png")
    folder = tmp_path / "lists"
    folder.mkdir()
    manifest = write_manifest(folder, f"path,label\n{image},1\n")

    (sample,) = discover(manifest).samples

    assert sample.path == image


def test_manifest_header_any_case(tmp_path):
    touch(tmp_path, "img/a.bmp")
    manifest = write_manifest(tmp_path, " Path , LABEL \nimg/a.bmp,1\n")

    (sample,) = discover(manifest).samples

    assert sample.label == 1


def test_manifest_subject_header_any_case(tmp_path):
    touch(tmp_path, "img/a.bmp")
    manifest = write_manifest(tmp_path, "Path,Label,Subject\nimg/a.bmp,1,P7\n")

    (sample,) = discover(manifest).samples

    assert sample.subject == "P7"


@pytest.mark.parametrize("missing", ["path", "label"])
def test_manifest_missing_column(tmp_path, missing):
    touch(tmp_path, "img/a.bmp")
    columns = {"path": "img/a.bmp", "label": "1", "subject": "P1"}
    del columns[missing]
    manifest = write_manifest(tmp_path, ",".join(columns) + "\n" + ",".join(columns.values()) + "\n")

    with pytest.raises(ValueError, match=f"missing column\\(s\\) {missing}"):
        discover(manifest)


def test_manifest_duplicate_row(tmp_path):
    touch(tmp_path, "img/a.bmp", "img/b.bmp")
    manifest = write_manifest(tmp_path, "path,label\nimg/a.bmp,1\nimg/b.bmp,0\nimg/a.bmp,1\n")

    with pytest.raises(ValueError, match=r"line 4: img/a.bmp is listed again \(first on line 2\)"):
        discover(manifest)


def test_manifest_missing_image_skipped(tmp_path, caplog):
    touch(tmp_path, "img/a.bmp")
    manifest = write_manifest(tmp_path, "path,label\nimg/a.bmp,1\nimg/gone.bmp,0\n")

    with caplog.at_level(logging.WARNING, logger="leukemia.data.discovery"):
        dataset = discover(manifest)

    assert [sample.path.name for sample in dataset.samples] == ["a.bmp"]
    assert len(dataset.warnings) == 1
    assert "line 3: image not found" in dataset.warnings[0]
    assert "gone.bmp" in caplog.text


def test_manifest_invalid_label(tmp_path):
    touch(tmp_path, "img/a.bmp")
    manifest = write_manifest(tmp_path, "path,label\nimg/a.bmp,maybe\n")

    with pytest.raises(ValueError, match=r"line 2: invalid label 'maybe'"):
        discover(manifest)


def test_manifest_without_rows(tmp_path):
    manifest = write_manifest(tmp_path, "path,label\n")

    with pytest.raises(ValueError, match="header but no rows"):
        discover(manifest)


def test_manifest_every_image_missing(tmp_path):
    manifest = write_manifest(tmp_path, "path,label\nimg/a.bmp,1\n")

    with pytest.raises(ValueError, match="none of the 1 listed images exists"):
        discover(manifest)


def test_manifest_empty_file(tmp_path):
    manifest = write_manifest(tmp_path, "")

    with pytest.raises(ValueError, match="the CSV file is empty"):
        discover(manifest)


def test_name_disagrees_with_folder_warns(tmp_path):
    touch(tmp_path, "hem/UID_H1_1_1_hem.bmp")
    touch(tmp_path, "hem/UID_5_1_1_all.bmp")
    touch(tmp_path, "all/UID_6_1_1_all.bmp")

    dataset = discover(tmp_path)

    warnings = [message for message in dataset.warnings if "named as the other class" in message]
    assert len(warnings) == 1
    assert "UID_5_1_1_all.bmp" in warnings[0]
    assert "UID_6_1_1_all.bmp" not in warnings[0]
    assert [s.label for s in dataset.samples if s.path.name == "UID_5_1_1_all.bmp"] == [0]
