"""Bad input: every failure raises one DataValidationError naming the file and what is wrong.

Small files are written to tmp_path, most derived from the real shared data (a copied
Cleveland table with one corrupted line, a few PhysioNet patients, a tiny MIT-BIH-like NPZ).
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.client.errors import (
    CohortTooSmallError,
    DataValidationError,
    DtypeError,
    EmptySplitError,
    LabelError,
    MalformedFileError,
    ManifestError,
    MissingFileError,
    MissingValueError,
    OutcomeMismatchError,
    RecordNotFoundError,
    SchemaError,
    ShapeError,
    TimestampError,
    WindowError,
)
from fedcare.client.loaders import load_site_file

COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num"]  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore:.*min_cohort_size = \\d+ is below the default")


def toml_value(value: Any) -> str:
    """Write one TOML value (enough for these tests)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def write_manifest(path: Path, top: dict[str, Any], split: dict[str, Any] | None,
                   data: dict[str, Any]) -> Path:  # fmt: skip
    """Write a manifest TOML with top-level fields, an optional [split] and [data]."""
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items() if v is not None]
    if split is not None:
        lines += ["[split]", *(f"{k} = {toml_value(v)}" for k, v in split.items())]
    lines += ["[data]", *(f"{k} = {toml_value(v)}" for k, v in data.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def expect(error: type[DataValidationError], manifest: Path, *fragments: str) -> str:
    """Load ``manifest``, assert ``error`` is raised and its message holds every fragment."""
    with pytest.raises(error) as info:
        load_site_file(manifest)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- tables: a copy of the real Cleveland file ----------------------------------------------

@pytest.fixture
def cleveland(tmp_path: Path, shared_data: Path) -> Path:
    """A private copy of processed.cleveland.data (303 lines, no header)."""
    dest = tmp_path / "processed.cleveland.data"
    shutil.copy(shared_data / "heart_disease" / "processed.cleveland.data", dest)
    dest.chmod(0o644)
    return dest


def corrupt(path: Path, line: int, column: str | None = None, value: str = "", raw: str | None = None) -> None:
    """Replace one field (or the whole ``raw`` line) at 1-based ``line``."""
    lines = path.read_text().splitlines()
    if raw is not None:
        lines[line - 1] = raw
    else:
        fields = lines[line - 1].split(",")
        fields[COLUMNS.index(column)] = value  # type: ignore[arg-type]
        lines[line - 1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


def heart(tmp_path: Path, data_path: Path, top: dict[str, Any] | None = None,
          split: dict[str, Any] | None = None, **data: Any) -> Path:  # fmt: skip
    """Write the FLamby heart-disease manifest for ``data_path`` with ``data`` overrides."""
    spec: dict[str, Any] = {
        "kind": "table",
        "path": data_path.name,
        "has_header": False,
        "columns": COLUMNS,
        "target": "num",
        "positive_above": 0,
        "drop_columns": ["slope", "ca", "thal"],
        "missing_marker": "?",
        "missing": "drop_rows",
        "categorical": ["cp"],
        "categories": {"cp": [1, 2, 3, 4]},
    }
    spec.update(data)
    spec = {k: v for k, v in spec.items() if v is not None}
    fields = {"site": "cleveland", "task": "binary", "classes": [0, 1, 2, 3, 4], **(top or {})}
    return write_manifest(tmp_path / "site.toml", fields, split, spec)


def test_control_the_uncorrupted_copy_loads(tmp_path: Path, cleveland: Path) -> None:
    data = load_site_file(heart(tmp_path, cleveland))
    assert len(data.train) + len(data.val) + len(data.test) == 303


# 1
def test_manifest_file_missing(tmp_path: Path) -> None:
    expect(MissingFileError, tmp_path / "nowhere.toml", "nowhere.toml", "not found")


# 2
def test_manifest_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('site = "a"\ntask = binary\n')
    expect(ManifestError, path, "broken.toml", "not valid TOML", "line 2")


# 3
def test_unknown_top_level_field(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, top={"hospital": "x"})
    expect(ManifestError, path, "site.toml", "unknown field 'hospital'", "allowed here", "site")


# 4
def test_unknown_data_field_is_named_with_its_table(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, has_headr=False)
    expect(ManifestError, path, "site.toml", "unknown field 'data.has_headr'", "has_header")


# 5
def test_wrong_manifest_type(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, top={"min_cohort_size": "many"})
    expect(ManifestError, path, "site.toml", "'min_cohort_size'", "valid integer", "'many'")


# 6
def test_unknown_data_kind(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "site.toml", {"site": "a", "task": "binary"}, None,
                          {"kind": "spreadsheet", "path": "x.xlsx"})  # fmt: skip
    expect(ManifestError, path, "site.toml", "unknown data kind 'spreadsheet'", "table, images_npz")


# 7
def test_negative_split_fraction(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, split={"val": -0.1})
    expect(ManifestError, path, "site.toml", "'split.val'", "greater than or equal to 0")


# 8
def test_split_fraction_above_one(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, split={"test": 1.5})
    expect(ManifestError, path, "site.toml", "'split.test'", "less than 1")


# 9
def test_split_fractions_leave_no_training_data(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, split={"val": 0.5, "test": 0.6})
    expect(ManifestError, path, "site.toml", "leaves nothing to train on")


# 10
def test_data_file_missing(tmp_path: Path) -> None:
    path = heart(tmp_path, tmp_path / "processed.nowhere.data")
    expect(MissingFileError, path, "processed.nowhere.data", "data.path", "manifest's folder")


# 11
def test_csv_line_with_an_extra_field(tmp_path: Path, cleveland: Path) -> None:
    corrupt(cleveland, 7, raw="57.0,1.0,4.0,140.0,192.0,0.0,0.0,148.0,0.0,0.4,2.0,0.0,6.0,0,9")
    expect(MalformedFileError, heart(tmp_path, cleveland),
           "processed.cleveland.data line 7", "15 fields, expected 14")  # fmt: skip


# 12
def test_csv_line_with_a_missing_field(tmp_path: Path, cleveland: Path) -> None:
    corrupt(cleveland, 120, raw="57.0,1.0,4.0,140.0,192.0,0.0,0.0,148.0,0.0,0.4,2.0,0.0,0")
    expect(MalformedFileError, heart(tmp_path, cleveland),
           "processed.cleveland.data line 120", "13 fields, expected 14")  # fmt: skip


# 13
def test_target_column_absent(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, target="diagnosis", positive_above=0)
    expect(SchemaError, path, "processed.cleveland.data", "'diagnosis'", "columns in the file",
           "'num'")  # fmt: skip


# 14
def test_feature_column_absent(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, features=["age", "bmi"])
    expect(SchemaError, path, "processed.cleveland.data", "features", "'bmi'", "'chol'")


# 15
def test_non_numeric_value_in_numeric_column(tmp_path: Path, cleveland: Path) -> None:
    corrupt(cleveland, 10, "chol", "high")
    message = expect(DtypeError, heart(tmp_path, cleveland),
                     "processed.cleveland.data", "column 'chol'", "line 10", "missing_marker")  # fmt: skip
    assert "high" not in message  # never echo a patient's value


# 16
def test_label_outside_declared_classes(tmp_path: Path, cleveland: Path) -> None:
    corrupt(cleveland, 5, "num", "7")
    expect(LabelError, heart(tmp_path, cleveland),
           "processed.cleveland.data", "'num'", "outside the declared classes", "7", "line 5")  # fmt: skip


# 17
def test_all_missing_column(tmp_path: Path, cleveland: Path) -> None:
    for line in range(1, 304):
        corrupt(cleveland, line, "fbs", "?")
    expect(MissingValueError, heart(tmp_path, cleveland),
           "processed.cleveland.data", "column 'fbs'", "all missing", "drop_columns")  # fmt: skip


# 18
def test_missing_values_refused_by_policy(tmp_path: Path, cleveland: Path) -> None:
    corrupt(cleveland, 42, "trestbps", "?")
    path = heart(tmp_path, cleveland, missing="error", drop_columns=["slope", "ca", "thal"])
    expect(MissingValueError, path, "processed.cleveland.data", "'trestbps'", "line 42",
           "data.missing")  # fmt: skip


# 19
def test_cohort_too_small(tmp_path: Path, cleveland: Path) -> None:
    lines = cleveland.read_text().splitlines()[:15]
    cleveland.write_text("\n".join(lines) + "\n")
    expect(CohortTooSmallError, heart(tmp_path, cleveland),
           "processed.cleveland.data", "15 patients", "min_cohort_size = 20")  # fmt: skip


# 20
def test_empty_validation_split(tmp_path: Path, cleveland: Path) -> None:
    lines = cleveland.read_text().splitlines()[:30]
    cleveland.write_text("\n".join(lines) + "\n")
    path = heart(tmp_path, cleveland, split={"val": 0.01, "test": 0.2, "stratify": False})
    expect(EmptySplitError, path, "processed.cleveland.data", "val split", "is empty",
           "split.val")  # fmt: skip


# 21
def test_category_outside_declared_categories(tmp_path: Path, cleveland: Path) -> None:
    corrupt(cleveland, 33, "cp", "9")
    expect(SchemaError, heart(tmp_path, cleveland),
           "processed.cleveland.data", "column 'cp'", "line 33", "data.categories.cp")  # fmt: skip


# 22
def test_headerless_csv_needs_columns(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, columns=None)
    expect(ManifestError, path, "site.toml", "has_header = false needs columns")


# 23
def test_binary_task_on_a_multiclass_target(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, top={"classes": None}, positive_above=None)
    expect(LabelError, path, "processed.cleveland.data", "exactly 2 classes", "5 distinct labels")


# 24
def test_group_column_absent(tmp_path: Path, cleveland: Path) -> None:
    path = heart(tmp_path, cleveland, split={"by": "patient_id"})
    expect(SchemaError, path, "processed.cleveland.data", "split.by", "'patient_id'")


# 25
def test_regression_target_not_numeric(tmp_path: Path) -> None:
    csv = tmp_path / "ward.csv"
    rows = ["age,los"] + [f"{40 + i},{i % 9}" for i in range(30)]
    rows[12] = "51,long"
    csv.write_text("\n".join(rows) + "\n")
    path = write_manifest(tmp_path / "site.toml", {"site": "w", "task": "regression"}, None,
                          {"kind": "table", "path": "ward.csv", "target": "los"})  # fmt: skip
    expect(DtypeError, path, "ward.csv", "column 'los'", "line 13")


# 26
def test_corrupt_parquet(tmp_path: Path) -> None:
    bad = tmp_path / "table.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    path = write_manifest(tmp_path / "site.toml", {"site": "p", "task": "regression"}, None,
                          {"kind": "table", "path": "table.parquet", "target": "y"})  # fmt: skip
    expect(MalformedFileError, path, "table.parquet", "not a readable Parquet file")


# --- images ---------------------------------------------------------------------------------

def write_npz(path: Path, drop: str | None = None, size: int = 28, labels: np.ndarray | None = None) -> Path:
    """A MedMNIST-like NPZ with 30/10/10 random grey images."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 30), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    if labels is not None:
        arrays["train_labels"] = labels
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return path


def npz_manifest(tmp_path: Path, npz: Path, **data: Any) -> Path:
    return write_manifest(tmp_path / "site.toml", {"site": "img", "task": "binary", "classes": [0, 1]},
                          None, {"kind": "images_npz", "path": npz.name, "expected_shape": [28, 28], **data})  # fmt: skip


# 27
def test_npz_images_of_the_wrong_shape(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "scans.npz", size=32)
    expect(ShapeError, npz_manifest(tmp_path, npz), "scans.npz", "train_images", "(1, 32, 32)",
           "(1, 28, 28)")  # fmt: skip


# 28
def test_npz_missing_a_key(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "scans.npz", drop="val_labels")
    expect(SchemaError, npz_manifest(tmp_path, npz), "scans.npz", "no key 'val_labels'",
           "'val_images'")  # fmt: skip


# 29
def test_npz_not_an_archive(tmp_path: Path) -> None:
    npz = tmp_path / "scans.npz"
    npz.write_text("hello")
    expect(MalformedFileError, npz_manifest(tmp_path, npz), "scans.npz", "not a readable NPZ")


# 30
def test_npz_label_outside_classes(tmp_path: Path) -> None:
    labels = np.zeros(30, np.uint8)
    labels[4] = 3
    npz = write_npz(tmp_path / "scans.npz", labels=labels)
    expect(LabelError, npz_manifest(tmp_path, npz), "scans.npz", "outside the declared classes",
           "train_labels[4]")  # fmt: skip


@pytest.fixture
def png_site(tmp_path: Path, shared_data: Path) -> Path:
    """24 real BreastMNIST images as PNG plus labels.csv; returns the manifest."""
    from PIL import Image

    npz = np.load(shared_data / "medmnist" / "breastmnist_28.npz")
    folder = tmp_path / "png"
    folder.mkdir()
    lines = ["filename,label"]
    for i in range(24):
        Image.fromarray(npz["train_images"][i]).save(folder / f"b{i:02d}.png")
        lines.append(f"b{i:02d}.png,{int(npz['train_labels'][i])}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return write_manifest(tmp_path / "site.toml", {"site": "png", "task": "binary", "classes": [0, 1]},
                          {"val": 0.2, "test": 0.2},
                          {"kind": "images_png", "folder": "png", "labels": "labels.csv",
                           "expected_shape": [28, 28]})  # fmt: skip


def test_control_png_site_loads(png_site: Path) -> None:
    data = load_site_file(png_site)
    assert len(data.train) + len(data.val) + len(data.test) == 24


# 31
def test_png_of_the_wrong_shape(png_site: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((30, 28), np.uint8)).save(png_site.parent / "png" / "b07.png")
    expect(ShapeError, png_site, "b07.png", "(1, 30, 28)", "(1, 28, 28)")


# 32
def test_png_listed_but_absent(png_site: Path) -> None:
    (png_site.parent / "png" / "b05.png").unlink()
    expect(MissingFileError, png_site, "labels.csv line 7", "'b05.png'", "not in")


# 33
def test_png_labels_csv_without_label_column(png_site: Path) -> None:
    labels = png_site.parent / "labels.csv"
    labels.write_text(labels.read_text().replace("filename,label", "filename,class"))
    expect(SchemaError, png_site, "labels.csv", "no column 'label'", "'class'")


# 34
def test_png_file_that_is_not_an_image(png_site: Path) -> None:
    (png_site.parent / "png" / "b03.png").write_text("not an image")
    expect(MalformedFileError, png_site, "b03.png", "not a readable PNG")


# --- time series: a few real PhysioNet patients ---------------------------------------------

N_PATIENTS = 22


@pytest.fixture
def physionet_site(tmp_path: Path, shared_data: Path) -> Path:
    """The first 22 patients of set A as a folder, their outcomes, and a manifest."""
    folder = tmp_path / "set-a"
    folder.mkdir()
    ids = []
    with tarfile.open(shared_data / "physionet2012" / "set-a.tar.gz", "r|gz") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".txt"):
                (folder / Path(member.name).name).write_bytes(archive.extractfile(member).read())  # type: ignore[union-attr]
                ids.append(Path(member.name).stem)
                if len(ids) == N_PATIENTS:
                    break
    outcomes = (shared_data / "physionet2012" / "Outcomes-a.txt").read_text().splitlines()
    keep = [outcomes[0]] + [line for line in outcomes[1:] if line.split(",")[0] in ids]
    (tmp_path / "Outcomes-a.txt").write_text("\n".join(keep) + "\n")
    return write_manifest(tmp_path / "site.toml", {"site": "icu", "task": "binary", "classes": [0, 1]},
                          {"val": 0.2, "test": 0.2, "stratify": False},
                          {"kind": "timeseries_long", "path": "set-a", "outcomes": "Outcomes-a.txt"})  # fmt: skip


def edit_patient(site: Path, line: int, text: str) -> str:
    """Replace 1-based ``line`` of the first patient file; return its name."""
    first = sorted((site.parent / "set-a").glob("*.txt"))[0]
    lines = first.read_text().splitlines()
    lines[line - 1] = text
    first.write_text("\n".join(lines) + "\n")
    return first.name


def test_control_physionet_subset_loads(physionet_site: Path) -> None:
    data = load_site_file(physionet_site)
    assert len(data.train) + len(data.val) + len(data.test) == N_PATIENTS
    assert data.input_shape == (48, 36)


# 35
def test_bad_time_stamp(physionet_site: Path) -> None:
    name = edit_patient(physionet_site, 9, "0a:07,HR,73")
    expect(TimestampError, physionet_site, name, "line 9", "not hh:mm")


# 36
def test_time_series_line_with_wrong_field_count(physionet_site: Path) -> None:
    name = edit_patient(physionet_site, 12, "00:07,HR,73,extra")
    expect(MalformedFileError, physionet_site, name, "line 12", "4 fields, expected 3")


# 37
def test_time_series_value_not_a_number(physionet_site: Path) -> None:
    name = edit_patient(physionet_site, 10, "00:07,HR,abc")
    expect(MalformedFileError, physionet_site, name, "line 10", "'HR'", "not a number")


# 38
def test_time_series_file_without_header(physionet_site: Path) -> None:
    name = edit_patient(physionet_site, 1, "time;parameter;value")
    expect(MalformedFileError, physionet_site, name, "header 'Time,Parameter,Value'")


# 39
def test_outcomes_missing_patients(physionet_site: Path) -> None:
    outcomes = physionet_site.parent / "Outcomes-a.txt"
    lines = outcomes.read_text().splitlines()
    dropped = lines[3].split(",")[0]
    outcomes.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    expect(OutcomeMismatchError, physionet_site, "Outcomes-a.txt", "no row for 1 of the 22",
           dropped)  # fmt: skip


# 40
def test_outcomes_without_the_target_column(physionet_site: Path) -> None:
    outcomes = physionet_site.parent / "Outcomes-a.txt"
    outcomes.write_text(outcomes.read_text().replace("In-hospital_death", "Death"))
    expect(SchemaError, physionet_site, "Outcomes-a.txt", "'In-hospital_death'", "'Death'")


# 41
def test_corrupt_tar_archive(tmp_path: Path, physionet_site: Path) -> None:
    archive = tmp_path / "set-a.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    text = physionet_site.read_text().replace('path = "set-a"', 'path = "set-a.tar.gz"')
    physionet_site.write_text(text)
    expect(MalformedFileError, physionet_site, "set-a.tar.gz", "not a readable tar archive")


# 42
def test_bad_time_stamp_inside_a_tar_archive(tmp_path: Path, physionet_site: Path) -> None:
    name = edit_patient(physionet_site, 20, "25h,HR,80")
    archive = tmp_path / "packed.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted((tmp_path / "set-a").glob("*.txt")):
            tar.add(f, arcname=f"set-a/{f.name}")
    physionet_site.write_text(physionet_site.read_text().replace('path = "set-a"', 'path = "packed.tar.gz"'))
    expect(TimestampError, physionet_site, f"packed.tar.gz:set-a/{name}", "line 20")


# 43
def test_filter_leaves_too_few_patients(physionet_site: Path) -> None:
    text = physionet_site.read_text() + "where = { ICUType = 2 }\n"
    physionet_site.write_text(text)
    expect(CohortTooSmallError, physionet_site, "set-a", "ICUType", "min_cohort_size = 20")


# --- signal windows: a tiny MIT-BIH-like file ----------------------------------------------

def write_signals(path: Path, length: int = 5000) -> Path:
    rng = np.random.default_rng(1)
    arrays: dict[str, Any] = {"records": np.array(["100", "101"]), "fs": np.array(360)}
    for rec in ("100", "101"):
        arrays[f"ecg_{rec}"] = rng.normal(size=length)
        peaks = np.arange(200, length - 200, 300)
        arrays[f"rpeaks_{rec}"] = peaks
        arrays[f"pvc_{rec}"] = peaks[::4]
    np.savez(path, **arrays)
    return path


def signal_manifest(tmp_path: Path, **data: Any) -> Path:
    spec = {"kind": "signal_windows", "path": "ecg.npz", **data}
    return write_manifest(tmp_path / "site.toml",
                          {"site": "ecg", "task": "binary", "min_cohort_size": 1},
                          {"val": 0.2, "test": 0.2}, spec)  # fmt: skip


def test_control_signal_file_loads(tmp_path: Path) -> None:
    write_signals(tmp_path / "ecg.npz")
    data = load_site_file(signal_manifest(tmp_path))
    assert data.input_shape == (252, 1)


# 44
def test_record_not_in_file(tmp_path: Path) -> None:
    write_signals(tmp_path / "ecg.npz")
    expect(RecordNotFoundError, signal_manifest(tmp_path, records=["100", "999"]),
           "ecg.npz", "'999'", "records in the file", "'101'")  # fmt: skip


# 45
def test_window_longer_than_signal(tmp_path: Path) -> None:
    write_signals(tmp_path / "ecg.npz", length=500)
    expect(WindowError, signal_manifest(tmp_path, window_seconds=2.0),
           "ecg.npz", "720 samples", "longer than record 100", "window_seconds")  # fmt: skip


# 46
def test_signal_file_missing_positive_key(tmp_path: Path) -> None:
    path = write_signals(tmp_path / "ecg.npz")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "pvc_101"}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    expect(SchemaError, signal_manifest(tmp_path), "ecg.npz", "no key 'pvc_101'", "positive_key")


# 47
def test_split_by_unknown_group_for_signals(tmp_path: Path) -> None:
    write_signals(tmp_path / "ecg.npz")
    path = signal_manifest(tmp_path)
    path.write_text(path.read_text().replace("[split]", '[split]\nby = "ward"'))
    expect(SchemaError, path, "split.by = 'ward'", "'record'")


def test_every_error_is_a_data_validation_error() -> None:
    for err in (CohortTooSmallError, DtypeError, EmptySplitError, LabelError, MalformedFileError,
                ManifestError, MissingFileError, MissingValueError, OutcomeMismatchError,
                RecordNotFoundError, SchemaError, ShapeError, TimestampError, WindowError):  # fmt: skip
        assert issubclass(err, DataValidationError)


# --- whitespace-aligned text (UCR style) and the NPZ kind pointed at WFDB files --------------

UCR_COLUMNS = ["label", *(f"t{i}" for i in range(96))]


def write_ucr(path: Path, shared_data: Path, rows: int = 40, header: bool = False) -> np.ndarray:
    """Write MIT-BIH record 119 beats UCR-style (label then 96 samples, %16.7e, space-aligned)."""
    with np.load(shared_data / "mitbih" / "mitbih_12records_mlii_360hz.npz") as npz:
        ecg, beats, pvc = npz["ecg_119"], npz["rpeaks_119"][1 : rows + 1], npz["pvc_119"]
    labels = np.where(np.isin(beats, pvc), 1.0, -1.0)
    table = np.column_stack([labels, ecg[beats[:, None] + np.arange(-48, 48)]])
    lines = ["".join(f"{v:16.7e}" for v in row) for row in table]
    head = ["".join(f"{c:>16}" for c in UCR_COLUMNS)] if header else []
    path.write_text("\n".join(head + lines) + "\n")
    return np.array([[float(f"{v:.7e}") for v in row] for row in table])


def ucr_manifest(tmp_path: Path, data_path: Path, header: bool = False, **data: Any) -> Path:
    """A table manifest for the UCR-style file."""
    spec: dict[str, Any] = {"kind": "table", "path": data_path.name, "target": "label",
                            "standardize": False}  # fmt: skip
    spec.update({k: v for k, v in data.items() if v is not None})
    if not header:
        spec.update(has_header=False, columns=UCR_COLUMNS)
    return write_manifest(tmp_path / "ucr.toml", {"site": "ucr", "task": "binary",
                          "classes": [-1, 1], "min_cohort_size": 20},
                          {"val": 0.0, "test": 0.0}, spec)  # fmt: skip


@pytest.mark.parametrize("delimiter", [None, " "])
def test_whitespace_table_read_with_a_wrong_delimiter_says_which_to_set(
    tmp_path: Path, shared_data: Path, delimiter: str | None
) -> None:
    data = tmp_path / "ECG_TRAIN.txt"
    write_ucr(data, shared_data)
    message = expect(MalformedFileError, ucr_manifest(tmp_path, data, delimiter=delimiter),
                     "ECG_TRAIN.txt", "every line has a field count other than the 97 columns",
                     'set delimiter = "whitespace" in [data]')  # fmt: skip
    assert "fix or remove that line" not in message


@pytest.mark.parametrize("delimiter", ["whitespace", "\\s+"])
def test_whitespace_table_loads(tmp_path: Path, shared_data: Path, delimiter: str) -> None:
    data = tmp_path / "ECG_TRAIN.txt"
    table = write_ucr(data, shared_data)
    site = load_site_file(ucr_manifest(tmp_path, data, delimiter=delimiter))
    assert len(site.train) == 40 and site.input_shape == (96,)
    np.testing.assert_allclose(site.train.inputs[0].numpy(), table[:, 1:], rtol=1e-6)
    assert site.train.targets.tolist() == [int(v == 1) for v in table[:, 0]]


def test_whitespace_table_with_header_read_as_csv_suggests_the_delimiter(
    tmp_path: Path, shared_data: Path
) -> None:
    data = tmp_path / "ECG_TRAIN.txt"
    write_ucr(data, shared_data, header=True)
    expect(SchemaError, ucr_manifest(tmp_path, data, header=True), "ECG_TRAIN.txt",
           "The file has one column only", 'set delimiter = "whitespace"')  # fmt: skip


def test_delimiter_of_several_characters_names_the_way_forward(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "site.toml", {"site": "a", "task": "binary"}, None,
                          {"kind": "table", "path": "a.txt", "target": "y", "delimiter": "  "})  # fmt: skip
    expect(ManifestError, path, "delimiter must be one character", '"whitespace"')


def test_npz_kind_pointed_at_a_wfdb_record_names_its_keys_and_the_wfdb_kind(
    tmp_path: Path, shared_data: Path
) -> None:
    import wfdb

    with np.load(shared_data / "mitbih" / "mitbih_12records_mlii_360hz.npz") as npz:
        ecg = npz["ecg_100"][:3600]
    wfdb.wrsamp("100", fs=360, units=["mV"], sig_name=["MLII"], p_signal=ecg[:, None],
                fmt=["212"], adc_gain=[200.0], baseline=[1024], write_dir=str(tmp_path))  # fmt: skip
    expect(MalformedFileError, signal_manifest(tmp_path, path="100.dat"),
           "100.dat is not a readable NPZ archive", "records, fs", "ecg_REC, rpeaks_REC",
           'kind = "wfdb"', f'folder = "{tmp_path}"')  # fmt: skip
