"""Site manifests: parsing, defaults, path resolution and the example manifests in simulations/sites."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pydantic
import pytest

from fedcare.client.errors import ManifestError
from fedcare.client.manifest import (
    PHYSIONET2012_PARAMETERS,
    ImagesNpzData,
    SignalWindowsData,
    SiteManifest,
    TableData,
    TimeseriesLongData,
    load_manifest,
    parse_manifest,
)

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "simulations" / "sites"

TABLE = {
    "site": "a",
    "task": "binary",
    "data": {"kind": "table", "path": "data/x.csv", "target": "y"},
}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_of_a_minimal_table_manifest() -> None:
    # Prepare / Execute
    m = parse_manifest(TABLE)
    # Assert
    assert m.min_cohort_size == 20
    assert (m.split.val, m.split.test, m.split.seed, m.split.by) == (0.15, 0.15, 0, None)
    assert isinstance(m.data, TableData)
    assert m.data.missing == "error" and m.data.has_header and m.data.standardize
    assert m.data.file_format == "csv"


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the manifest lives in sites/, the working directory elsewhere
    manifest = _write(
        tmp_path / "sites" / "a.toml",
        'site = "a"\ntask = "binary"\n[data]\nkind = "table"\npath = "../data/x.csv"\ntarget = "y"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # Execute
    m = load_manifest(Path("..") / "sites" / "a.toml")
    # Assert
    assert m.data.path.resolve() == (tmp_path / "data" / "x.csv").resolve()
    assert manifest.exists()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "x.parquet"
    manifest = _write(
        tmp_path / "m.toml",
        f'site = "a"\ntask = "regression"\n[data]\nkind = "table"\npath = "{target}"\ntarget = "y"\n',
    )
    m = load_manifest(manifest)
    assert m.data.path == target
    assert m.data.file_format == "parquet"


def test_manifest_models_are_frozen() -> None:
    m = parse_manifest(TABLE)
    with pytest.raises(pydantic.ValidationError):
        m.site = "b"  # type: ignore[misc]


def test_record_ids_may_be_written_as_integers() -> None:
    raw = {
        "site": "s",
        "task": "binary",
        "data": {"kind": "signal_windows", "path": "x.npz", "records": [100, "102"]},
    }
    m = parse_manifest(raw)
    assert isinstance(m.data, SignalWindowsData)
    assert m.data.records == ["100", "102"]


def test_timeseries_defaults_are_physionet_2012() -> None:
    raw = {
        "site": "icu",
        "task": "binary",
        "data": {"kind": "timeseries_long", "path": "set-a", "outcomes": "o.txt",
                 "where": {"ICUType": 2}},
    }  # fmt: skip
    m = parse_manifest(raw)
    assert isinstance(m.data, TimeseriesLongData)
    assert (m.data.steps, m.data.step_minutes, m.data.horizon_minutes) == (48, 60, 2880)
    assert m.data.parameters == "physionet2012"
    assert len(PHYSIONET2012_PARAMETERS) == 36 and len(set(PHYSIONET2012_PARAMETERS)) == 36
    assert m.data.where == {"ICUType": 2}
    assert m.data.group_by == "ICUType"


def test_missing_marker_accepts_one_string() -> None:
    raw = {**TABLE, "data": {**TABLE["data"], "missing_marker": "?"}}
    assert parse_manifest(raw).data.missing_marker == ["?"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"classes": [0, 1, 2]}, "exactly 2 classes"),
        ({"task": "regression", "classes": [0, 1]}, "classes is for classification"),
        ({"classes": [0, 0]}, "classes lists a label twice"),
        ({"task": "multiclass", "data": {**TABLE["data"], "positive_above": 0}}, "task = 'binary'"),
        ({"data": {**TABLE["data"], "positive_above": 0, "positive_values": [1]}}, "not both"),
        ({"data": {**TABLE["data"], "categories": {"cp": [1, 2]}}}, "not in categorical"),
        ({"data": {**TABLE["data"], "features": ["y"]}}, "also listed in features"),
        ({"split": {"val": 0.5, "test": 0.5}}, "leaves nothing to train on"),
    ],
)
def test_inconsistent_manifests_are_refused(change: dict, fragment: str) -> None:
    with pytest.raises(ManifestError, match="site.toml") as info:
        parse_manifest({**TABLE, **change}, source="site.toml")
    assert fragment in str(info.value)


def test_images_npz_refuses_a_split_table() -> None:
    raw = {
        "site": "b",
        "task": "binary",
        "split": {"val": 0.1},
        "data": {"kind": "images_npz", "path": "x.npz"},
    }
    with pytest.raises(ManifestError, match="file's own train/val/test splits"):
        parse_manifest(raw)


def test_binary_rule_allows_more_raw_classes() -> None:
    raw = {**TABLE, "classes": [0, 1, 2, 3, 4], "data": {**TABLE["data"], "positive_above": 0}}
    m = parse_manifest(raw)
    assert m.classes == [0, 1, 2, 3, 4]


EXAMPLES = sorted(SITES.glob("*.toml"))


def test_every_data_kind_but_png_has_an_example() -> None:
    kinds = {tomllib.loads(p.read_text())["data"]["kind"] for p in EXAMPLES}
    assert kinds == {"table", "images_npz", "timeseries_long", "signal_windows", "wfdb", "dicom", "text"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_manifests_parse_and_point_at_shared_data(path: Path) -> None:
    # Execute
    m = load_manifest(path)
    # Assert: paths resolved under ${FEDCARE_DATA_ROOT} (tests/conftest.py: ../shared/data beside the repo)
    assert isinstance(m, SiteManifest)
    data_path = getattr(m.data, "path", None) or m.data.folder  # type: ignore[union-attr]
    assert data_path.is_absolute()
    expected_root = (REPO.parent / "shared" / "data").resolve()
    assert data_path.resolve().is_relative_to(expected_root)
    assert "relative paths resolve against" in path.read_text().lower()
    if isinstance(m.data, ImagesNpzData):
        assert m.data.expected_shape is not None
