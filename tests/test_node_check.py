"""``fedcare node check --site SITE.toml``: the validation report and its exit status."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.client.check import check_site_file, report_renderables
from fedcare.client.cli import node_app

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "simulations" / "sites"
PREFIX = "${FEDCARE_DATA_ROOT}"


def site_copy(name: str, tmp_path: Path, shared_data: Path) -> Path:
    """Copy simulations/sites/<name>.toml into tmp_path with absolute shared-data paths."""
    text = (SITES / f"{name}.toml").read_text().replace(PREFIX, str(shared_data))
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def hungarian_chol_missing_rate(shared_data: Path) -> float:
    """Fraction of Hungarian rows whose chol field is '?' (computed from the raw file)."""
    rows = (shared_data / "heart_disease" / "processed.hungarian.data").read_text().split()
    return sum(r.split(",")[4] == "?" for r in rows) / len(rows)


def test_check_report_counts_balance_and_missingness(tmp_path: Path, shared_data: Path) -> None:
    # Execute
    report = check_site_file(site_copy("heart_hungarian", tmp_path, shared_data))
    # Assert
    assert report.patients == 261
    assert [s.name for s in report.splits] == ["train", "val", "test"]
    assert sum(s.count for s in report.splits) == 261
    positives = sum(s.class_counts["num > 0"] for s in report.splits)
    assert positives == 98
    assert report.missing_rates["chol"] == pytest.approx(hungarian_chol_missing_rate(shared_data))
    assert report.missing_rates["age"] == 0.0
    assert any("33 of 294 rows dropped" in n for n in report.notes)
    assert len(report_renderables(report)) >= 3


def test_cli_check_prints_the_report(tmp_path: Path, shared_data: Path) -> None:
    # Prepare
    site = site_copy("heart_hungarian", tmp_path, shared_data)
    # Execute
    result = CliRunner().invoke(node_app, ["check", "--site", str(site)])
    # Assert
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in ("heart-hungarian", "train", "val", "test", "183", "chol", "7.8%",
                     "num > 0", "ready to train"):  # fmt: skip
        assert fragment in out, fragment


def test_cli_check_reports_images_without_missingness(tmp_path: Path, shared_data: Path) -> None:
    site = site_copy("breastmnist", tmp_path, shared_data)
    result = CliRunner().invoke(node_app, ["check", "--site", str(site)])
    assert result.exit_code == 0, result.output
    assert "546" in result.stdout and "(1, 28, 28)" in result.stdout
    assert "Missingness" not in result.stdout


def test_cli_check_shows_the_low_cohort_warning(tmp_path: Path, shared_data: Path) -> None:
    site = site_copy("mitbih_site_a", tmp_path, shared_data)
    with pytest.warns(UserWarning, match="min_cohort_size = 5 is below the default 20"):
        result = CliRunner().invoke(node_app, ["check", "--site", str(site)])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stdout and "min_cohort_size = 5" in result.stdout


def test_cli_check_fails_with_the_clear_error(tmp_path: Path, shared_data: Path) -> None:
    # Prepare: a copy of the Hungarian file with a non-numeric cholesterol on line 3
    data = tmp_path / "processed.hungarian.data"
    shutil.copy(shared_data / "heart_disease" / "processed.hungarian.data", data)
    data.chmod(0o644)
    lines = data.read_text().splitlines()
    fields = lines[2].split(",")
    fields[4] = "n/a"
    lines[2] = ",".join(fields)
    data.write_text("\n".join(lines) + "\n")
    site = site_copy("heart_hungarian", tmp_path, shared_data)
    site.write_text(site.read_text().replace(str(shared_data / "heart_disease") + "/", ""))
    assert tomllib.loads(site.read_text())["data"]["path"] == "processed.hungarian.data"
    # Execute
    result = CliRunner().invoke(node_app, ["check", "--site", str(site)])
    # Assert
    assert result.exit_code == 1
    assert "DtypeError" in result.stderr
    assert "processed.hungarian.data" in result.stderr
    assert "column 'chol'" in result.stderr and "line 3" in result.stderr
    assert "ready to train" not in result.stdout


def test_cli_check_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('site = "x"\ntask = "binary"\ncohort = 3\n[data]\nkind = "table"\npath = "a.csv"\ntarget = "y"\n')
    result = CliRunner().invoke(node_app, ["check", "--site", str(site)])
    assert result.exit_code == 1
    assert "ManifestError" in result.stderr
    assert "site.toml" in result.stderr and "unknown field 'cohort'" in result.stderr


def test_cli_check_missing_manifest(tmp_path: Path) -> None:
    result = CliRunner().invoke(node_app, ["check", "--site", str(tmp_path / "none.toml")])
    assert result.exit_code == 1
    assert "MissingFileError" in result.stderr and "none.toml" in result.stderr


def test_cli_check_needs_a_site() -> None:
    result = CliRunner().invoke(node_app, ["check"])
    assert result.exit_code != 0
    assert "--site" in result.output


def mitbih_records(tmp_path: Path, shared_data: Path, records: list[str], split: str) -> Path:
    """simulations/sites/mitbih_site_a.toml for ``records`` only, cohort floor 1, the given [split]."""
    site = site_copy("mitbih_site_a", tmp_path, shared_data)
    text = site.read_text()
    start, end = text.index("[split]"), text.index("[data]")
    text = text[:start] + f"[split]\n{split}\n\n" + text[end:]
    text = text.replace("min_cohort_size = 5", "min_cohort_size = 1")
    text = text.replace('records = ["100", "102", "104", "105", "106", "108"]',
                        f"records = {records}".replace("'", '"'))  # fmt: skip
    site.write_text(text)
    assert tomllib.loads(text)["data"]["records"] == records
    return site


@pytest.mark.filterwarnings("ignore:.*min_cohort_size = 1 is below the default")
def test_record_100_alone_is_refused_because_its_test_split_has_no_pvc(
    tmp_path: Path, shared_data: Path
) -> None:
    # Prepare: record 100 holds one PVC in 2273 beats, so no PVC reaches val or test
    site = mitbih_records(tmp_path, shared_data, ["100"], "val = 0.15\ntest = 0.15\nseed = 0")
    # Execute
    result = CliRunner().invoke(node_app, ["check", "--site", str(site)])
    # Assert
    assert result.exit_code == 1
    assert "SplitClassError" in result.stderr
    assert "test split" in result.stderr and "no example of class 'pvc'" in result.stderr
    assert "AUROC" in result.stderr
    assert "ready to train" not in result.stdout


@pytest.mark.filterwarnings("ignore:.*min_cohort_size = 1 is below the default")
def test_a_validation_split_without_a_class_is_a_warning(tmp_path: Path, shared_data: Path) -> None:
    # Prepare: records 100 and 121 hold one PVC each; val = 0.15 of 2 PVCs rounds to none
    site = mitbih_records(tmp_path, shared_data, ["100", "121"], "val = 0.15\ntest = 0.5\nseed = 0")
    # Execute
    with pytest.warns(UserWarning, match="the val split .* holds no example of class 'pvc'"):
        report = check_site_file(site)
    with pytest.warns(UserWarning, match="the val split"):
        result = CliRunner().invoke(node_app, ["check", "--site", str(site)])
    # Assert
    counts = {s.name: s.class_counts["pvc"] for s in report.splits}
    assert counts == {"train": 1, "val": 0, "test": 1}
    assert any(w.startswith("the val split") and "AUROC" in w for w in report.warnings)
    assert result.exit_code == 0, result.output
    assert "warning: the val split" in result.stdout and "ready to train" in result.stdout


def test_class_coverage_warns_for_multiclass_and_train(tmp_path: Path) -> None:
    # Prepare: a multiclass site whose test split lacks class 'c' and whose train lacks 'b'
    from fedcare.client.check import SplitSummary, class_coverage
    from fedcare.client.errors import SplitClassError
    from fedcare.client.manifest import parse_manifest

    raw = {"site": "m", "task": "multiclass",
           "data": {"kind": "table", "path": "x.csv", "target": "y"}}  # fmt: skip
    splits = [SplitSummary("train", 5, {"a": 5, "b": 0, "c": 0}),
              SplitSummary("val", 0, {"a": 0, "b": 0, "c": 0}),
              SplitSummary("test", 3, {"a": 2, "b": 1, "c": 0})]  # fmt: skip
    # Execute
    multi = class_coverage(parse_manifest(raw), splits, "rows", "x.toml")
    # Assert: warnings only for multiclass (an empty val split is not reported)
    assert len(multi) == 2
    assert multi[0].startswith("the train split (5 rows) holds no example of class 'b', 'c'")
    assert "cannot learn it" in multi[0]
    assert multi[1].startswith("the test split (3 rows) holds no example of class 'c'")
    binary = parse_manifest({**raw, "task": "binary"})
    with pytest.raises(SplitClassError, match=r"the test split \(3 rows\) holds no example"):
        class_coverage(binary, splits, "rows", "x.toml")


def test_report_counts_in_the_unit_each_kind_holds(tmp_path: Path, shared_data: Path) -> None:
    # Execute
    table = check_site_file(site_copy("heart_hungarian", tmp_path, shared_data))
    images = check_site_file(site_copy("breastmnist", tmp_path, shared_data))
    with pytest.warns(UserWarning, match="min_cohort_size = 5"):
        signals = check_site_file(site_copy("mitbih_site_a", tmp_path, shared_data))
        result = CliRunner().invoke(
            node_app, ["check", "--site", str(tmp_path / "mitbih_site_a.toml")]
        )
    # Assert
    assert (table.unit, table.example_unit) == ("rows", "rows")
    assert (images.unit, images.example_unit, images.patients) == ("images", "images", 780)
    assert (signals.unit, signals.example_unit, signals.patients) == ("records", "windows", 6)
    out = result.stdout
    assert "records" in out and "6 (min_cohort_size 5)" in out and "patients" not in out
    assert "Splits and classes" in out and "windows" in out and "class pvc" in out
