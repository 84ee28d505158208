"""``kind = "wfdb"``: native WFDB records written with ``wfdb`` from the real MIT-BIH NPZ.

Each test writes records (``.hea`` / ``.dat`` format 212 at 200 adu/mV, as PhysioNet ships
MIT-BIH, and ``.atr`` with ``N`` / ``V`` beats plus non-beat ``+`` / ``~`` annotations) into
``tmp_path`` from ``mitbih_12records_mlii_360hz.npz``; the 200 adu/mV round trip is exact for
these signals, so the loader must give the NPZ kind's windows and labels bit for bit.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import wfdb

from fedcare.client.check import check_site_file
from fedcare.client.errors import (
    DataValidationError,
    LabelError,
    MalformedFileError,
    ManifestError,
    MissingFileError,
    RecordNotFoundError,
    SchemaError,
)
from fedcare.client.loaders import load_site_result
from fedcare.client.manifest import parse_manifest

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "simulations" / "sites"
NPZ_NAME = "mitbih_12records_mlii_360hz.npz"
ADU_PER_MV = 200.0

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*min_cohort_size = \\d+ is below the default"),
    # wfdb 4.3's own use of DataFrame.set_index(inplace=True), deprecated by pandas 3
    pytest.mark.filterwarnings("ignore:The inplace keyword:DeprecationWarning:wfdb"),
]


@pytest.fixture(scope="module")
def mitbih(shared_data: Path) -> Any:
    """The real MIT-BIH NPZ (12 records, lead MLII, 360 Hz)."""
    return np.load(shared_data / "mitbih" / NPZ_NAME)


def write_record(
    folder: Path,
    rec: str,
    signal: np.ndarray,
    beats: np.ndarray,
    pvc: np.ndarray,
    *,
    fs: float = 360.0,
    leads: dict[str, np.ndarray] | None = None,
    extra: bool = True,
) -> None:
    """Write ``rec`` as PhysioNet ships MIT-BIH: format 212, 200 adu/mV, an .atr of N/V beats."""
    folder.mkdir(parents=True, exist_ok=True)
    leads = leads or {"MLII": signal}
    digital = np.stack([np.round(s * ADU_PER_MV).astype(np.int64) + 1024 for s in leads.values()], 1)
    wfdb.wrsamp(rec, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), d_signal=digital,
                fmt=["212"] * len(leads), adc_gain=[ADU_PER_MV] * len(leads),
                baseline=[1024] * len(leads), write_dir=str(folder))  # fmt: skip
    samples = list(beats)
    symbols = ["V" if b in set(pvc.tolist()) else "N" for b in beats]
    if extra:  # rhythm and noise annotations, which are not beats
        samples += [int(beats[0]) - 5, int(beats[len(beats) // 2]) + 3]
        symbols += ["+", "~"]
    order = np.argsort(samples, kind="stable")
    wfdb.wrann(rec, "atr", np.asarray(samples)[order], symbol=[symbols[i] for i in order],
               write_dir=str(folder))  # fmt: skip


def write_from_npz(folder: Path, npz: Any, rec: str, **kwargs: Any) -> None:
    """Write record ``rec`` of the shared NPZ as a WFDB record."""
    write_record(folder, rec, npz[f"ecg_{rec}"], npz[f"rpeaks_{rec}"], npz[f"pvc_{rec}"], **kwargs)


def short(folder: Path, npz: Any, rec: str = "100", seconds: int = 20, **kwargs: Any) -> None:
    """Write the first ``seconds`` of a real record (fast, for the bad-input cases)."""
    n = seconds * 360
    beats = npz[f"rpeaks_{rec}"]
    beats = beats[beats < n]
    write_record(folder, rec, npz[f"ecg_{rec}"][:n], beats, npz[f"pvc_{rec}"], **kwargs)


def manifest(folder: Path, split: dict[str, Any] | None = None, **data: Any) -> Any:
    """A WFDB manifest for ``folder`` (cohort floor 1, so that tiny folders load)."""
    return parse_manifest({
        "site": "w", "task": "binary", "min_cohort_size": 1,
        "split": split or {"val": 0.0, "test": 0.0},
        "data": {"kind": "wfdb", "folder": str(folder), **data},
    })  # fmt: skip


def npz_manifest(path: Path, records: list[str], split: dict[str, Any], **data: Any) -> Any:
    """The NPZ kind's manifest for the same records."""
    return parse_manifest({
        "site": "w", "task": "binary", "min_cohort_size": 1, "split": split,
        "data": {"kind": "signal_windows", "path": str(path), "records": records, **data},
    })  # fmt: skip


def assert_same_site(a: Any, b: Any) -> None:
    """Both loads hold identical tensors, labels and record ids in every split."""
    for name in ("train", "val", "test"):
        x, y = getattr(a.data, name), getattr(b.data, name)
        assert len(x) == len(y), name
        for tx, ty in zip(x.inputs, y.inputs):
            assert torch.equal(tx, ty), name
        assert torch.equal(x.targets, y.targets), name
        assert np.array_equal(x.groups, y.groups), name


@pytest.mark.parametrize("normalize", ["window", "train"])
def test_wfdb_reproduces_the_npz_windows_and_labels(
    tmp_path: Path, shared_data: Path, mitbih: Any, normalize: str
) -> None:
    # Prepare: records 100 (1 PVC) and 119 (444 PVCs) as native WFDB records
    folder = tmp_path / "mitdb"
    for rec in ("100", "119"):
        write_from_npz(folder, mitbih, rec)
    split = {"val": 0.0, "test": 0.4, "seed": 3}
    # Execute
    got = load_site_result(manifest(folder, split, decimate=2, normalize=normalize))
    want = load_site_result(npz_manifest(shared_data / "mitbih" / NPZ_NAME, ["100", "119"],
                                         {**split, "by": "record"}, decimate=2,
                                         normalize=normalize))  # fmt: skip
    # Assert: bit-identical windows, labels and record of every window
    assert_same_site(got, want)
    total = sum(len(getattr(got.data, s)) for s in ("train", "val", "test"))
    positives = sum(int(getattr(got.data, s).targets.sum()) for s in ("train", "val", "test"))
    assert total == 2273 + 1987 - 2  # two beats of 100/119 lie too close to an edge
    assert positives == 1 + 444
    assert got.data.input_shape == (126, 1) and got.data.feature_names == ["MLII"]
    assert got.class_names == ["other", "V"]
    assert (got.patients, got.unit, got.example_unit) == (2, "records", "beats")
    # the split is by record: no record in two splits
    assert not set(got.data.train.groups) & set(got.data.test.groups)


def test_records_are_discovered_and_the_lead_is_chosen_by_name_or_index(
    tmp_path: Path, mitbih: Any
) -> None:
    # Prepare: a two-lead record whose MLII is the second signal (V5 is a scaled copy)
    folder = tmp_path / "mitdb"
    n = 20 * 360
    ecg = mitbih["ecg_119"][:n]
    beats = mitbih["rpeaks_119"][mitbih["rpeaks_119"] < n]
    write_record(folder, "119", ecg, beats, mitbih["pvc_119"],
                 leads={"V5": np.round(ecg * 0.5, 3), "MLII": ecg})  # fmt: skip
    short(folder / "ref", mitbih, "119")
    # Execute
    by_name = load_site_result(manifest(folder, channel="MLII"))
    by_index = load_site_result(manifest(folder, channel=1))
    first = load_site_result(manifest(folder))
    ref = load_site_result(manifest(folder / "ref"))
    # Assert
    assert torch.equal(by_name.data.train.inputs[0], ref.data.train.inputs[0])
    assert torch.equal(by_index.data.train.inputs[0], ref.data.train.inputs[0])
    assert by_name.data.feature_names == ["MLII"] and first.data.feature_names == ["V5"]
    assert torch.equal(first.data.train.targets, ref.data.train.targets)
    assert not torch.equal(first.data.train.inputs[0][:, :, 0].std(1), torch.zeros(len(first.data.train)))


def test_example_manifest_reads_a_wfdb_folder(tmp_path: Path, shared_data: Path, mitbih: Any) -> None:
    # Prepare: the six records of simulations/sites/mitbih_wfdb.toml, and that manifest pointed at them
    raw = tomllib.loads((SITES / "mitbih_wfdb.toml").read_text())
    folder = tmp_path / "wfdb"
    for rec in raw["data"]["records"]:
        write_from_npz(folder, mitbih, rec)
    text = (SITES / "mitbih_wfdb.toml").read_text().replace(
        "${FEDCARE_DATA_ROOT}/mitbih/wfdb", str(folder)
    )
    site = tmp_path / "mitbih_wfdb.toml"
    site.write_text(text)
    npz = SITES / "mitbih_site_a.toml"
    npz_site = tmp_path / "a.toml"
    npz_site.write_text(npz.read_text().replace("${FEDCARE_DATA_ROOT}", str(shared_data)))
    # Execute
    report = check_site_file(site)
    reference = check_site_file(npz_site)
    # Assert: same beats and PVCs as the NPZ example of the same records, counted in records
    assert (report.patients, report.unit, report.example_unit) == (6, "records", "beats")
    assert sum(s.count for s in report.splits) == sum(s.count for s in reference.splits)
    assert sum(s.class_counts["V"] for s in report.splits) == sum(
        s.class_counts["pvc"] for s in reference.splits
    ) == 1 + 4 + 2 + 41 + 520 + 17
    assert all(s.groups == 1 for s in report.splits[1:])  # one record each in val and test
    assert not any("inplace" in w for w in report.warnings)  # wfdb's pandas chatter stays out


# --- bad input: one clear error per way a WFDB folder can be wrong --------------------------


def expect(error: type[DataValidationError], m: Any, *fragments: str) -> str:
    """Load ``m`` and check the error type and every message fragment."""
    with pytest.raises(error) as info:
        load_site_result(m)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_folder(tmp_path: Path) -> None:
    expect(MissingFileError, manifest(tmp_path / "nowhere"), "nowhere", "data.folder", "not found")


def test_folder_without_headers_points_at_the_npz_kind(tmp_path: Path) -> None:
    np.savez(tmp_path / "beats.npz", records=np.array(["1"]))
    expect(MissingFileError, manifest(tmp_path), "no WFDB header (*.hea)", "beats.npz",
           'kind = "signal_windows"')  # fmt: skip


def test_record_listed_but_absent(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    expect(RecordNotFoundError, manifest(tmp_path, records=[100, 101]),
           "no WFDB record(s) ['101']", "no 101.hea", "records there: ['100']", "data.records")  # fmt: skip


def test_unreadable_header(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    (tmp_path / "100.hea").write_text("this is not a header\n")
    expect(MalformedFileError, manifest(tmp_path), "100.hea is not a readable WFDB header")


def test_missing_signal_file(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    (tmp_path / "100.dat").unlink()
    expect(MissingFileError, manifest(tmp_path), "signal file ['100.dat'] of record 100",
           "not found")  # fmt: skip


def test_missing_annotation_names_the_other_extensions(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    (tmp_path / "100.atr").rename(tmp_path / "100.qrs")
    expect(MissingFileError, manifest(tmp_path), "annotation file 100.atr of record 100",
           "['qrs']", "data.annotation")  # fmt: skip
    assert len(load_site_result(manifest(tmp_path, annotation=".qrs")).data.train) > 0


def test_lead_not_present(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    expect(SchemaError, manifest(tmp_path, channel="V1"), "100.hea has no lead 'V1'",
           "['MLII']", "data.channel")  # fmt: skip
    expect(SchemaError, manifest(tmp_path, channel=2), "data.channel = 2 is out of range")


def test_first_leads_that_differ_need_a_channel(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    ecg = mitbih["ecg_102"][: 20 * 360]
    beats = mitbih["rpeaks_102"][mitbih["rpeaks_102"] < 20 * 360]
    write_record(tmp_path, "102", ecg, beats, mitbih["pvc_102"], leads={"V5": ecg})
    expect(SchemaError, manifest(tmp_path), "first lead is 'V5'", "'MLII' in the first record",
           "data.channel")  # fmt: skip


def test_annotations_without_beats(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    wfdb.wrann("100", "atr", np.array([10, 500]), symbol=["+", "~"], write_dir=str(tmp_path))
    expect(LabelError, manifest(tmp_path), "100.atr holds no beat annotation",
           "symbols found: ['+', '~']", "data.beat_symbols")  # fmt: skip


def test_wrong_sampling_rate(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    expect(SchemaError, manifest(tmp_path, fs=250), "record(s) ['100'] are sampled at [360.0] Hz",
           "data.fs = 250", "resample")  # fmt: skip
    short(tmp_path, mitbih, "119", fs=250.0)
    expect(SchemaError, manifest(tmp_path), "different sampling rates",
           "'100': '360'", "'119': '250'")  # fmt: skip


def test_split_by_an_unknown_group(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "100")
    expect(SchemaError, manifest(tmp_path, {"val": 0.0, "test": 0.0, "by": "ward"}),
           "split.by = 'ward' is not available for WFDB records")  # fmt: skip


def test_split_by_beat_is_allowed_with_a_note(tmp_path: Path, mitbih: Any) -> None:
    short(tmp_path, mitbih, "119")
    result = load_site_result(manifest(tmp_path, {"val": 0.2, "test": 0.2, "by": "beat"}))
    assert all(len(getattr(result.data, s)) for s in ("train", "val", "test"))
    assert any("split.by = 'beat'" in n for n in result.notes)


def test_manifest_refuses_positive_symbols_that_are_not_beats(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"positive_symbols \['\+'\] are not in beat_symbols"):
        manifest(tmp_path, positive_symbols=["+"])
    with pytest.raises(ManifestError, match="signal windows are labelled 0/1"):
        parse_manifest({"site": "w", "task": "multiclass",
                        "data": {"kind": "wfdb", "folder": str(tmp_path)}})  # fmt: skip
