"""``kind = "dicom"``: DICOM files the tests write with pydicom, from real MedMNIST pixels.

Every file is a :class:`pydicom.dataset.FileDataset` with the minimal tags (SOP class and
instance, patient, image pixel module) and pixel data taken from the shared
``pneumoniamnist_28.npz`` (28 x 28 uint8 chest X-rays), or derived from it for CT (stored
values mapped to Hounsfield units through RescaleSlope / RescaleIntercept).
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fedcare.client.errors import (
    DataValidationError,
    LabelError,
    MalformedFileError,
    ManifestError,
    MissingFileError,
    SchemaError,
    ShapeError,
)
from fedcare.client.loaders import load_site_result
from fedcare.client.loaders.dicom_images import voi_window
from fedcare.client.manifest import parse_manifest

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "simulations" / "sites"
PATIENT_NAME = "Doe^Jane-Identifying"

pytestmark = pytest.mark.filterwarnings("ignore:.*min_cohort_size = \\d+ is below the default")


@pytest.fixture(scope="module")
def xrays(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The PneumoniaMNIST training images (uint8 28 x 28) and labels (0/1)."""
    npz = np.load(shared_data / "medmnist" / "pneumoniamnist_28.npz")
    return npz["train_images"], npz["train_labels"][:, 0].astype(int)


def write_dicom(path: Path, pixels: np.ndarray, *, patient: str, photometric: str = "MONOCHROME2",
                ct: bool = False, slope: float = 1.0, intercept: float = 0.0,
                window: tuple[float, float] | None = None) -> str:  # fmt: skip
    """Write one DICOM file (single or multi-frame, grey or RGB); return its SOP Instance UID."""
    uid = generate_uid()
    sop_class = CTImageStorage if ct else SecondaryCaptureImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, patient, "19700101"
    ds.StudyDate, ds.Modality = "20240102", "CT" if ct else "OT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    if ct or slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def write_labels(path: Path, rows: list[tuple[str, Any]], key: str = "filename",
                 label: str = "label") -> Path:  # fmt: skip
    """Write the labels CSV."""
    path.write_text(f"{key},{label}\n" + "".join(f"{k},{v}\n" for k, v in rows))
    return path


def site(tmp_path: Path, split: dict[str, Any] | None = None, **data: Any) -> Any:
    """A DICOM manifest for ``tmp_path/dicom`` and ``tmp_path/labels.csv``."""
    spec = {"kind": "dicom", "folder": str(tmp_path / "dicom"),
            "labels": str(tmp_path / "labels.csv"), "size": [28, 28], **data}  # fmt: skip
    return parse_manifest({"site": "d", "task": "binary", "classes": [0, 1],
                           "min_cohort_size": 1, "split": split or {"val": 0.0, "test": 0.0},
                           "data": spec})  # fmt: skip


def all_images(result: Any) -> np.ndarray:
    """Every image of the site in file order (train holds all of them when val = test = 0)."""
    assert len(result.data.val) == len(result.data.test) == 0
    return result.data.train.inputs[0].numpy()


def xray_folder(tmp_path: Path, xrays: tuple[np.ndarray, np.ndarray], n: int = 4,
                **kwargs: Any) -> list[str]:  # fmt: skip
    """Write ``n`` X-rays as img0.dcm… (one patient each) and their labels by file name."""
    images, labels = xrays
    names = [f"img{i}.dcm" for i in range(n)]
    for i, name in enumerate(names):
        write_dicom(tmp_path / "dicom" / name, images[i], patient=f"P{i:03d}", **kwargs)
    write_labels(tmp_path / "labels.csv", [(names[i], labels[i]) for i in range(n)])
    return names


def test_monochrome2_with_its_window_and_monochrome1_inverted(tmp_path: Path, xrays: Any) -> None:
    # Prepare: the same pixels once as MONOCHROME2 and once as MONOCHROME1, window 128 / 256
    images, labels = xrays
    write_dicom(tmp_path / "dicom" / "a.dcm", images[0], patient="P1", window=(128, 256))
    write_dicom(tmp_path / "dicom" / "b.dcm", images[0], patient="P2", window=(128, 256),
                photometric="MONOCHROME1")  # fmt: skip
    write_labels(tmp_path / "labels.csv", [("a.dcm", 0), ("b.dcm", 1)])
    # Execute
    x = all_images(load_site_result(site(tmp_path)))
    # Assert: DICOM's linear window, and MONOCHROME1 is its negative
    expected = np.clip((images[0].astype(np.float64) - 127.5) / 255 + 0.5, 0, 1)
    np.testing.assert_allclose(x[0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(x[1, 0], 1.0 - expected, atol=1e-6)
    assert x.shape == (2, 1, 28, 28)


def test_ct_rescale_then_manifest_window_else_file_window(tmp_path: Path, xrays: Any) -> None:
    # Prepare: stored values s (uint16); HU = 2 * s - 1024 through the modality LUT
    stored = (xrays[0][1].astype(np.uint16) * 4)
    write_dicom(tmp_path / "dicom" / "ct.dcm", stored, patient="P1", ct=True, slope=2.0,
                intercept=-1024.0, window=(-600.0, 1500.0))  # fmt: skip
    write_labels(tmp_path / "labels.csv", [("ct.dcm", 1)])
    hu = 2.0 * stored.astype(np.float64) - 1024.0
    # Execute
    soft = all_images(load_site_result(site(tmp_path, window_center=40, window_width=400)))
    lung = all_images(load_site_result(site(tmp_path)))
    # Assert
    np.testing.assert_allclose(soft[0, 0], np.clip((hu - 39.5) / 399 + 0.5, 0, 1), atol=1e-6)
    np.testing.assert_allclose(lung[0, 0], np.clip((hu + 600.5) / 1499 + 0.5, 0, 1), atol=1e-6)
    assert soft.min() == 0.0 and soft.max() == 1.0  # the soft-tissue window saturates both ends


def test_voi_window_matches_dicom_examples() -> None:
    # PS3.3 C.11.2.1.2.1: centre 2048 / width 4096 maps 0 -> 0 and 4095 -> 1
    out = voi_window(np.array([0.0, 2047.5, 4095.0, -10.0, 5000.0]), 2048.0, 4096.0)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 1.0], atol=1e-3)


def test_images_without_window_use_their_range_and_are_resized(tmp_path: Path, xrays: Any) -> None:
    # Prepare: a 56 x 56 image, left half 10, right half 200, no window tags
    img = np.full((56, 56), 10, np.uint8)
    img[:, 28:] = 200
    write_dicom(tmp_path / "dicom" / "big.dcm", img, patient="P1")
    write_labels(tmp_path / "labels.csv", [("big.dcm", 0)])
    # Execute
    result = load_site_result(site(tmp_path, size=[14, 20]))
    x = all_images(result)
    # Assert
    assert x.shape == (1, 1, 14, 20)
    assert np.all(x[0, 0, :, 0] == 0.0) and np.all(x[0, 0, :, -1] == 1.0)
    assert any("scaled by their own range" in n for n in result.notes)


def test_rgb_images_need_three_channels(tmp_path: Path, xrays: Any) -> None:
    rgb = np.stack([xrays[0][0]] * 3, axis=-1)
    write_dicom(tmp_path / "dicom" / "rgb.dcm", rgb, patient="P1", photometric="RGB")
    write_labels(tmp_path / "labels.csv", [("rgb.dcm", 0)])
    with pytest.raises(ShapeError, match=r"rgb.dcm is a 3-sample \(RGB\) image but data.channels = 1"):
        load_site_result(site(tmp_path))
    x = all_images(load_site_result(site(tmp_path, channels=3)))
    assert x.shape == (1, 3, 28, 28)
    np.testing.assert_allclose(x[0, 1], xrays[0][0] / 255.0, atol=1e-6)


def test_multi_frame_refused_unless_a_frame_is_chosen(tmp_path: Path, xrays: Any) -> None:
    # Prepare: three frames, the second of which is image 5
    frames = np.stack([xrays[0][4], xrays[0][5], xrays[0][6]])
    write_dicom(tmp_path / "dicom" / "cine.dcm", frames, patient="P1", window=(128, 256))
    write_labels(tmp_path / "labels.csv", [("cine.dcm", 1)])
    # Execute / Assert
    with pytest.raises(ShapeError) as info:
        load_site_result(site(tmp_path))
    assert "cine.dcm is a multi-frame image (3 frames)" in str(info.value)
    assert "data.frame" in str(info.value)
    x = all_images(load_site_result(site(tmp_path, frame=1)))
    expected = np.clip((xrays[0][5].astype(np.float64) - 127.5) / 255 + 0.5, 0, 1)
    np.testing.assert_allclose(x[0, 0], expected, atol=1e-6)
    with pytest.raises(ShapeError, match="has 3 frame"):
        load_site_result(site(tmp_path, frame=3))


def test_labels_by_sop_uid_or_patient_and_split_by_patient(tmp_path: Path, xrays: Any) -> None:
    # Prepare: 12 patients with 2 images each; labels keyed by SOP Instance UID, then by patient
    images, labels = xrays
    uids, by_patient = [], []
    for p in range(12):
        for k in range(2):
            uid = write_dicom(tmp_path / "dicom" / f"p{p}" / f"{k}.dcm", images[2 * p + k],
                              patient=f"MRN{p:04d}")  # fmt: skip
            uids.append((uid, labels[2 * p]))
        by_patient.append((f"MRN{p:04d}", labels[2 * p]))
    write_labels(tmp_path / "labels.csv", uids, key="uid")
    split = {"val": 0.25, "test": 0.25, "seed": 1}
    # Execute
    by_uid = load_site_result(site(tmp_path, split, key="sop_instance_uid", key_column="uid"))
    write_labels(tmp_path / "labels.csv", by_patient, key="mrn")
    by_pid = load_site_result(site(tmp_path, split, key="patient_id", key_column="mrn"))
    # Assert: 12 patients, their two images always in the same split, groups opaque
    for result in (by_uid, by_pid):
        assert (result.patients, result.unit, result.example_unit) == (12, "patients", "images")
        sets = [set(getattr(result.data, s).groups) for s in ("train", "val", "test")]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert all(g.startswith("patient") and "MRN" not in g for g in set().union(*sets))
        assert sum(len(s) for s in sets) == 12
    assert torch_equal(by_uid, by_pid)


def torch_equal(a: Any, b: Any) -> bool:
    """Whether two loads hold the same targets in every split."""
    return all(
        bool((getattr(a.data, s).targets == getattr(b.data, s).targets).all())
        for s in ("train", "val", "test")
    )


def test_example_manifest_reads_a_dicom_folder(tmp_path: Path, xrays: Any) -> None:
    # Prepare: simulations/sites/dicom_chest_xray.toml pointed at 30 files (one patient each), 15
    # normal and 15 pneumonia X-rays
    images, labels = xrays
    pick = np.concatenate([np.flatnonzero(labels == 0)[:15], np.flatnonzero(labels == 1)[:15]])
    images, labels = images[pick], labels[pick]
    folder = tmp_path / "export"
    rows = []
    for i in range(30):
        photometric = "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2"
        uid = write_dicom(folder / f"{i:03d}.dcm", images[i], patient=f"A{i}", window=(128, 256),
                          photometric=photometric)  # fmt: skip
        rows.append((uid, labels[i]))
    raw = tomllib.loads((SITES / "dicom_chest_xray.toml").read_text())
    write_labels(folder / "labels.csv", rows, key=raw["data"]["key_column"],
                 label=raw["data"]["label_column"])  # fmt: skip
    text = (SITES / "dicom_chest_xray.toml").read_text().replace(
        "${FEDCARE_DATA_ROOT}/dicom/chest_xray", str(folder)
    )
    manifest = tmp_path / "site.toml"
    manifest.write_text(text)
    # Execute
    from fedcare.client.check import check_site_file

    report = check_site_file(manifest)
    # Assert
    assert (report.patients, report.unit, report.example_unit) == (30, "patients", "images")
    assert report.input_shape == (1, 28, 28)
    assert [sum(s.class_counts[c] for s in report.splits) for c in ("0", "1")] == [15, 15]
    assert all(min(s.class_counts.values()) > 0 for s in report.splits)


# --- bad input ---------------------------------------------------------------------------


def expect(error: type[DataValidationError], m: Any, *fragments: str) -> str:
    """Load ``m``; check the error type, the fragments, and that no patient tag leaks."""
    with pytest.raises(error) as info:
        load_site_result(m)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for secret in (PATIENT_NAME, "Doe", "19700101", "20240102", "P000", "MRN"):
        assert secret not in message
    return message


def test_a_file_without_label(tmp_path: Path, xrays: Any) -> None:
    names = xray_folder(tmp_path, xrays, n=3)
    write_labels(tmp_path / "labels.csv", [(names[0], 0), (names[2], 1)])
    expect(LabelError, site(tmp_path), "1 DICOM file(s) have no label in labels.csv",
           "img1.dcm", "add their rows")  # fmt: skip


def test_a_missing_label_by_patient_never_names_the_patient(
    tmp_path: Path, xrays: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: labels keyed by patient id, one patient missing
    xray_folder(tmp_path, xrays, n=3)
    write_labels(tmp_path / "labels.csv", [("P000", 0), ("P002", 1)], key="pid")
    caplog.set_level(logging.DEBUG)
    # Execute / Assert
    message = expect(LabelError, site(tmp_path, key="patient_id", key_column="pid"),
                     "img1.dcm", "Patient ID")  # fmt: skip
    assert "P001" not in message
    assert "P00" not in caplog.text and PATIENT_NAME not in caplog.text


def test_a_corrupt_file(tmp_path: Path, xrays: Any) -> None:
    names = xray_folder(tmp_path, xrays, n=2)
    (tmp_path / "dicom" / names[1]).write_text("a report saved with the wrong extension\n")
    expect(MalformedFileError, site(tmp_path), "img1.dcm is not a readable DICOM file")
    (tmp_path / "dicom" / names[1]).write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    expect(MalformedFileError, site(tmp_path), "img1.dcm", "narrow data.pattern")


def test_a_truncated_pixel_data(tmp_path: Path, xrays: Any) -> None:
    names = xray_folder(tmp_path, xrays, n=2)
    path = tmp_path / "dicom" / names[0]
    path.write_bytes(path.read_bytes()[:-300])
    expect(MalformedFileError, site(tmp_path), "img0.dcm")


def test_a_label_row_without_file(tmp_path: Path, xrays: Any) -> None:
    names = xray_folder(tmp_path, xrays, n=2)
    write_labels(tmp_path / "labels.csv", [(names[0], 0), (names[1], 1), ("gone.dcm", 1)])
    expect(MissingFileError, site(tmp_path), "names 1 image(s) not in", "'gone.dcm'")


def test_missing_folder_labels_column_and_no_files(tmp_path: Path, xrays: Any) -> None:
    expect(MissingFileError, site(tmp_path), "data.folder")
    xray_folder(tmp_path, xrays, n=2)
    expect(SchemaError, site(tmp_path, label_column="diagnosis"), "no column 'diagnosis'",
           "data.label_column")  # fmt: skip
    expect(MissingFileError, site(tmp_path, pattern="*.ima"), "no file matching",
           "data.pattern")  # fmt: skip


def test_missing_patient_id_with_a_patient_split(tmp_path: Path, xrays: Any) -> None:
    xray_folder(tmp_path, xrays, n=2)
    write_dicom(tmp_path / "dicom" / "img1.dcm", xrays[0][1], patient="")
    expect(SchemaError, site(tmp_path), "img1.dcm has no PatientID", "split.by = 'image'")
    result = load_site_result(site(tmp_path, {"val": 0.0, "test": 0.0, "by": "image"}))
    assert (result.patients, result.unit) == (2, "images")


def test_manifest_refusals(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="give both window_center and window_width"):
        site(tmp_path, window_center=40)
    with pytest.raises(ManifestError, match="image sites are classification sites"):
        parse_manifest({"site": "d", "task": "regression", "data": {
            "kind": "dicom", "folder": "f", "labels": "l.csv", "size": [8, 8]}})  # fmt: skip


def test_node_check_output_never_shows_patient_tags(
    tmp_path: Path, xrays: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a site that loads, then the same site with one file's label missing
    from typer.testing import CliRunner

    from fedcare.client.cli import node_app

    images, labels = xrays
    pick = np.concatenate([np.flatnonzero(labels == 0)[:6], np.flatnonzero(labels == 1)[:6]])
    rows = []
    for i, j in enumerate(pick):
        write_dicom(tmp_path / "dicom" / f"{i}.dcm", images[j], patient=f"MRN{i:05d}",
                    window=(128, 256))  # fmt: skip
        rows.append((f"MRN{i:05d}", labels[j]))
    write_labels(tmp_path / "labels.csv", rows, key="mrn")
    manifest = tmp_path / "site.toml"
    manifest.write_text(
        'site = "d"\ntask = "binary"\nclasses = [0, 1]\nmin_cohort_size = 1\n'
        "[split]\nval = 0.25\ntest = 0.25\nseed = 0\n"
        f'[data]\nkind = "dicom"\nfolder = "{tmp_path / "dicom"}"\n'
        f'labels = "{tmp_path / "labels.csv"}"\nkey = "patient_id"\nkey_column = "mrn"\n'
        "size = [28, 28]\n"
    )
    caplog.set_level(logging.DEBUG)
    # Execute
    ok = CliRunner().invoke(node_app, ["check", "--site", str(manifest)])
    write_labels(tmp_path / "labels.csv", rows[:5] + rows[6:], key="mrn")
    bad = CliRunner().invoke(node_app, ["check", "--site", str(manifest)])
    # Assert
    assert ok.exit_code == 0, ok.output
    assert "12 (min_cohort_size 1)" in ok.stdout and "patients" in ok.stdout
    assert bad.exit_code == 1 and "LabelError" in bad.stderr and "5.dcm" in bad.stderr
    shown = ok.stdout + ok.stderr + bad.stdout + bad.stderr + caplog.text
    for secret in ("MRN", "Doe", PATIENT_NAME, "19700101", "20240102"):
        assert secret not in shown
