"""Shipped examples copied out of the package, and the one data-root variable of manifests."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.client.errors import ManifestError
from fedcare.client.manifest import DATA_ROOT_ENV, load_manifest
from fedcare.simulations.examples import ExamplesExistError, copy_examples, example_files
from fedcare.simulations.scenario import load_scenario


def test_every_shipped_scenario_names_manifests_that_ship_too() -> None:
    """No shipped scenario points outside the package (e.g. at docs/ or at ../../shared)."""
    files = example_files()
    sites = {p.name for p in files["sites"]}

    referenced = set()
    for scenario in files["scenarios"]:
        data = tomllib.loads(scenario.read_text(encoding="utf-8")).get("data", {})
        paths = data.get("paths", []) + ([data["path"]] if "path" in data else [])
        for path in paths:
            assert path.startswith("../sites/"), f"{scenario.name} names {path}"
            referenced.add(Path(path).name)

    assert referenced, "no shipped scenario uses a site manifest"
    assert referenced <= sites


def test_every_example_manifest_reads_its_data_under_the_data_root() -> None:
    """Example manifests use ${FEDCARE_DATA_ROOT}/, never a path into this checkout's neighbours."""
    for manifest in example_files()["sites"]:
        if manifest.suffix != ".toml":
            continue
        text = manifest.read_text(encoding="utf-8")
        assert "shared/data" not in text.replace("${FEDCARE_DATA_ROOT}", ""), manifest.name
        assert "${FEDCARE_DATA_ROOT}/" in text, manifest.name


def test_copy_writes_scenarios_and_sites_that_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copy the examples; a copied scenario and its copied manifests load from the copy."""
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))

    written = copy_examples(tmp_path / "ex")

    names = {p.relative_to(tmp_path / "ex").parts[0] for p in written}
    assert names == {"scenarios", "sites"}
    scenario = load_scenario(tmp_path / "ex" / "scenarios" / "heart_disease.toml")
    assert [p.resolve().parent for p in scenario.data.paths] == [(tmp_path / "ex" / "sites").resolve()] * 4  # type: ignore[union-attr]
    manifest = load_manifest(scenario.data.paths[0])  # type: ignore[union-attr]
    assert manifest.data.path == tmp_path / "data" / "heart_disease" / "processed.cleveland.data"  # type: ignore[union-attr]


def test_copy_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    """An existing target file stops the copy before anything is written."""
    target = tmp_path / "ex" / "sites" / "heart_va.toml"
    target.parent.mkdir(parents=True)
    target.write_text("mine", encoding="utf-8")

    with pytest.raises(ExamplesExistError, match="heart_va.toml"):
        copy_examples(tmp_path / "ex")

    assert target.read_text(encoding="utf-8") == "mine"
    assert not (tmp_path / "ex" / "scenarios").exists()


def test_cli_examples_copy(tmp_path: Path) -> None:
    """`fedcare examples copy DIR` copies and names the data-root variable."""
    result = CliRunner().invoke(app, ["examples", "copy", str(tmp_path / "ex")])

    assert result.exit_code == 0, result.output
    assert DATA_ROOT_ENV in result.output
    assert (tmp_path / "ex" / "scenarios" / "default.toml").is_file()


def _manifest(tmp_path: Path, path: str) -> Path:
    file = tmp_path / "site.toml"
    file.write_text(
        f'site = "a"\ntask = "binary"\n[data]\nkind = "table"\npath = "{path}"\ntarget = "y"\n',
        encoding="utf-8",
    )
    return file


def test_data_root_unset_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest using the variable while it is unset says which variable to export."""
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)

    with pytest.raises(ManifestError, match=f"export {DATA_ROOT_ENV}="):
        load_manifest(_manifest(tmp_path, "${FEDCARE_DATA_ROOT}/t.csv"))


def test_other_variables_are_not_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the data-root variable is expanded: $HOME-style variables are refused, not guessed."""
    monkeypatch.setenv("OTHER", str(tmp_path))

    with pytest.raises(ManifestError, match=DATA_ROOT_ENV):
        load_manifest(_manifest(tmp_path, "${OTHER}/t.csv"))
