"""One configuration language: study files use a scenario's tables; the old form converts exactly."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.server.flower_app import (
    InvalidStudyError,
    app_hash,
    build_flower_app,
    convert_study_file,
    load_study,
)
from fedcare.simulations.scenario import Scenario

OLD_FORM = """\
[study]
name = "heart-disease"
description = "UCI heart disease: Cleveland, Hungarian, VA"

[run]
num-server-rounds = 2
strategy = "fedprox"
proximal-mu = 0.01
min-sites = 3
model-family = "logistic"
task = "binary"
num-classes = 2
input-shape = "15"
local-epochs = 1
batch-size = 32
lr = 0.05
checkpoint-dir = "heart-model"
secure-aggregation = true
client-dp-clipping-norm = 1.0
"""

NEW_FORM = """\
rounds = 2

[study]
name = "heart-disease"
description = "UCI heart disease: Cleveland, Hungarian, VA"

[model]
family = "logistic"
task = "binary"
num_classes = 2
input_shape = [15]

[strategy]
name = "fedprox"
proximal-mu = 0.01

[training]
local_epochs = 1
batch_size = 32
lr = 0.05

[secure_aggregation]
enabled = true

[client_dp]
clipping_norm = 1.0

[run]
min-sites = 3
checkpoint-dir = "heart-model"
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_table_form_and_old_form_give_the_same_run_config_and_app_hash(tmp_path: Path) -> None:
    """Prepare both spellings of one study; Execute: parse and build; Assert: same RunConfig and app hash."""
    old = load_study(_write(tmp_path, "old.toml", OLD_FORM))
    new = load_study(_write(tmp_path, "new.toml", NEW_FORM))

    old_hash = app_hash(build_flower_app(old, tmp_path / "app-old"))
    new_hash = app_hash(build_flower_app(new, tmp_path / "app-new"))

    assert new.run_config() == old.run_config()
    assert new.run_config().batch_size == 32 and new.run_config().num_rounds == 2
    assert new.run_config().input_shape == (15,)
    assert new.run_config().client_dp_clipping_norm == 1.0
    assert new_hash == old_hash


def test_scenario_and_study_share_the_training_table_models() -> None:
    """The scenario's [training] and [strategy] are the study's: one schema, one spelling."""
    from fedcare.server import study_tables

    assert Scenario.model_fields["training"].annotation is study_tables.TrainingSpec
    assert Scenario.model_fields["strategy"].annotation is study_tables.StrategySpec


def test_old_form_warns_with_the_converter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Reading the old form logs which keys moved and names `fedcare study convert`."""
    with caplog.at_level(logging.WARNING, logger="fedcare.server.flower_app"):
        load_study(_write(tmp_path, "old.toml", OLD_FORM))

    assert "fedcare study convert" in caplog.text
    assert "batch-size" in caplog.text


def test_convert_writes_the_tables_and_keeps_the_hash(tmp_path: Path) -> None:
    """Convert the old form; the new file has tables, no moved keys in [run], and the same hash."""
    source = _write(tmp_path, "old.toml", OLD_FORM)
    target = tmp_path / "converted.toml"

    convert_study_file(source, target)

    converted = tomllib.loads(target.read_text(encoding="utf-8"))
    assert converted["training"] == {"local_epochs": 1, "batch_size": 32, "lr": 0.05}
    assert converted["model"]["input_shape"] == [15]
    assert converted["rounds"] == 2
    assert converted["run"] == {"min-sites": 3, "checkpoint-dir": "heart-model"}
    old_hash = app_hash(build_flower_app(load_study(source), tmp_path / "a"))
    new_hash = app_hash(build_flower_app(load_study(target), tmp_path / "b"))
    assert new_hash == old_hash


def test_convert_never_overwrites(tmp_path: Path) -> None:
    """An existing output file is refused."""
    source = _write(tmp_path, "old.toml", OLD_FORM)
    target = _write(tmp_path, "taken.toml", "keep me")

    with pytest.raises(FileExistsError):
        convert_study_file(source, target)

    assert target.read_text(encoding="utf-8") == "keep me"


def test_a_setting_in_both_places_is_refused(tmp_path: Path) -> None:
    """batch size in [training] and in [run] is an error naming the key."""
    text = NEW_FORM.replace('[run]\n', '[run]\nbatch-size = 64\n')

    with pytest.raises(InvalidStudyError, match="batch-size"):
        load_study(_write(tmp_path, "both.toml", text))


def test_unknown_training_key_is_refused(tmp_path: Path) -> None:
    """A typo in [training] fails with the field named (frozen model, unknown keys refused)."""
    text = NEW_FORM.replace("batch_size = 32", "batchsize = 32")

    with pytest.raises(InvalidStudyError, match="batchsize"):
        load_study(_write(tmp_path, "typo.toml", text))


def test_client_dp_needs_secure_aggregation(tmp_path: Path) -> None:
    """[client_dp] without [secure_aggregation] enabled is refused with the fix."""
    text = NEW_FORM.replace("[secure_aggregation]\nenabled = true\n", "")

    with pytest.raises(InvalidStudyError, match="secure_aggregation"):
        load_study(_write(tmp_path, "nodp.toml", text))


def test_cli_convert_prints_the_new_form(tmp_path: Path) -> None:
    """`fedcare study convert OLD` prints TOML that loads to the same run configuration."""
    source = _write(tmp_path, "old.toml", OLD_FORM)

    result = CliRunner().invoke(app, ["study", "convert", str(source)])

    assert result.exit_code == 0, result.output
    converted = _write(tmp_path, "printed.toml", result.stdout)
    assert load_study(converted).run_config() == load_study(source).run_config()
