"""One study lifecycle (server.lifecycle): no import cycles in server/, one privacy report per simulation.

The plain (``server.app``) and the SecAgg+ (``server.secagg``) drivers open, close and finish a
study through :class:`~fedcare.server.lifecycle.Study`; a simulation's ServerApp leaves the
privacy report to the release step, which writes the simulation's only one.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scenarios import dp_breast_cancer_scenario  # noqa: E402

import fedcare  # noqa: E402
from fedcare.client.app import LocalSite, make_client_app  # noqa: E402
from fedcare.privacy import report as report_module  # noqa: E402
from fedcare.privacy.policy import SitePolicy, node_default_policy  # noqa: E402
from fedcare.privacy.settings import PrivacySettings  # noqa: E402
from fedcare.server.app import run_server  # noqa: E402
from fedcare.server.config import STRATEGY_NAMES, RunConfig  # noqa: E402
from fedcare.server.lifecycle import read_outcome  # noqa: E402
from fedcare.server.strategy import STRATEGIES  # noqa: E402
from fedcare.simulations.builtin import load_builtin  # noqa: E402
from fedcare.simulations.partition import PartitionScheme, partition  # noqa: E402
from fedcare.simulations.runner import InProcessGrid, run_scenario  # noqa: E402
from fedcare.simulations.scenario import load_scenario  # noqa: E402

PACKAGE = Path(fedcare.__file__).parent

PRIVACY = PrivacySettings.with_noise(noise_multiplier=1.2, epsilon_budget=8.0)
POLICY = SitePolicy.model_validate(
    {**node_default_policy().model_dump(), "max_epsilon_per_study": 8.0, "max_epsilon_total": 64.0,
     "require_secure_aggregation": False}
)  # fmt: skip

SCENARIO = dp_breast_cancer_scenario(
    "report-once", rounds=1, hospitals=2, batch_size=64, tables="[simulation]\nround_timeout_s = 300\n"
)


# --------------------------------------------------------------------------- import cycles


def _package_imports(path: Path) -> set[str]:
    """Return the modules of ``path``'s own package it imports anywhere (module level or inside a function)."""
    folder, package = path.parent, path.parent.name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ... / from . import x
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(f"fedcare.{package}."):
            found.add((node.module or "").split(".")[2])
    return {name for name in found if (folder / f"{name}.py").is_file()}


def _graph(folder: Path) -> dict[str, set[str]]:
    """Return module -> the modules of the same package it imports."""
    return {path.stem: _package_imports(path) for path in sorted(folder.glob("*.py"))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle of ``graph`` (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function() -> None:
    # Prepare: app imports secagg at module level, secagg imports app inside a function (the old layout)
    graph = {"app": {"secagg", "config"}, "secagg": {"app", "config"}, "config": set()}

    # Execute
    cycle = _cycle(graph)

    # Assert
    assert cycle == ["app", "secagg", "app"]


def test_no_server_module_is_in_an_import_cycle_not_even_through_a_function_level_import() -> None:
    # Prepare
    graph = _graph(PACKAGE / "server")

    # Execute
    cycle = _cycle(graph)

    # Assert
    assert {"lifecycle", "app", "secagg", "config", "strategy"} <= set(graph)
    assert "lifecycle" in graph["app"] and "lifecycle" in graph["secagg"]  # both drivers use the lifecycle
    assert "app" not in graph["secagg"] and "strategy" not in graph["config"]  # the two former cycles
    assert cycle is None, f"import cycle in server/: {' -> '.join(cycle or [])}"


def test_no_simulations_module_is_in_an_import_cycle() -> None:
    # Prepare
    graph = _graph(PACKAGE / "simulations")

    # Execute
    cycle = _cycle(graph)

    # Assert
    assert {"runner", "release", "membership_audit", "inprocess"} <= set(graph)
    assert "inprocess" in graph["membership_audit"] and "runner" not in graph["membership_audit"]
    assert "runner" not in graph["release"]
    assert cycle is None, f"import cycle in simulations/: {' -> '.join(cycle or [])}"


def test_the_strategy_names_the_config_accepts_are_the_ones_strategy_builds() -> None:
    # Execute
    built = STRATEGIES.names()

    # Assert
    assert built == sorted(STRATEGY_NAMES) == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox", "fedtrimmedavg", "fedyogi", "krum"]


# --------------------------------------------------------------------------- one report


@dataclasses.dataclass(frozen=True)
class _Sites:
    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config["partition-id"])]


def _grid(folder: Path, n: int = 2) -> InProcessGrid:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=n, seed=0)
    sites = tuple(
        LocalSite(data=d, privacy=PRIVACY, ledger_dir=folder / "ledgers", name=d.name, seed=i, policy=POLICY)
        for i, d in enumerate(data)
    )
    return InProcessGrid(make_client_app(_Sites(sites)), n)


def _spy_on_report_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace ``write_report`` wherever a loaded fedcare module bound it; return the folders written to."""
    original = report_module.write_report
    written: list[Path] = []

    def spy(report: Any, out_dir: Path | str, **kwargs: Any) -> tuple[Path, Path]:
        written.append(Path(out_dir))
        return original(report, out_dir, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("fedcare") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, spy)
    return written


def _config(folder: Path) -> RunConfig:
    return RunConfig(study="lifecycle", input_shape=(30,), num_rounds=1, min_sites=2, batch_size=64, lr=0.5,
                     checkpoint_dir=folder / "ckpt", seed=3)  # fmt: skip


def test_a_completed_study_writes_its_report_once_and_none_when_its_caller_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    written = _spy_on_report_writes(monkeypatch)

    # Execute
    run_server(_grid(tmp_path / "a"), _config(tmp_path / "a"))
    run_server(_grid(tmp_path / "b"), _config(tmp_path / "b"), write_report=False)

    # Assert
    assert written == [tmp_path / "a" / "ckpt"]
    assert (tmp_path / "a" / "ckpt" / "privacy_report.json").is_file()
    assert not (tmp_path / "b" / "ckpt" / "privacy_report.json").exists()
    outcome = read_outcome(tmp_path / "b" / "ckpt")
    assert outcome is not None and outcome.status == "completed" and outcome.history.last_complete == 1


@pytest.mark.slow
def test_a_simulation_writes_its_privacy_report_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    path = tmp_path / "scenario.toml"
    path.write_text(SCENARIO)
    written = _spy_on_report_writes(monkeypatch)
    out = tmp_path / "out"

    # Execute
    summary = run_scenario(load_scenario(path), out)

    # Assert: one report, beside the exported model, naming the exported model's file
    assert summary.status == "completed" and summary.rounds_completed == 1
    assert written == [out]
    assert not (out / "checkpoints" / "privacy_report.json").exists()
    report = json.loads((out / "privacy_report.json").read_text())
    assert summary.files["report"] == str(out / "privacy_report.json")
    assert report["round"] == 1 and len(report["sites"]) == 2
