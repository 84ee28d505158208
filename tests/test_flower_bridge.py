"""The guards of fedcare's uses of flwr and Opacus internals (flower_bridge, privacy/opacus_bridge).

Security patches (app gate, SuperLink front, Control API token, the fast DP path's reliance on
Opacus's optimizer) must refuse to start on a flwr/Opacus they do not recognise; speed patches
(pull backoff, SuperNode poll, warm executor, ServerApp reply polling, lean accumulate) must
leave the stock behaviour in place with one log line. An unknown version is simulated by
setting ``flwr.__version__`` / ``opacus.__version__``; changed code by replacing the target.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flwr
import opacus
import pytest

from fedcare import flower_bridge
from fedcare.client import app_gate, supernode_main, warm_exec
from fedcare.flower_bridge import GUARDED_IMPORTS, PATCHES, UnsupportedFlowerError
from fedcare.privacy import opacus_bridge
from fedcare.privacy.opacus_bridge import UnsupportedOpacusError

SECURITY = sorted(n for n, p in PATCHES.items() if p.kind == "fail closed")
SPEED = sorted(n for n, p in PATCHES.items() if p.kind == "fall back")


@pytest.fixture
def unknown_flwr(monkeypatch: pytest.MonkeyPatch) -> str:
    """Pretend the installed flwr is 1.43.0, a version fedcare does not know."""
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    return "1.43.0"


def _bridge_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fedcare.flower_bridge" and r.levelno == logging.WARNING]


# --- the record -----------------------------------------------------------------------------


def test_every_patch_recognises_the_installed_flwr() -> None:
    # Prepare
    minor = ".".join(flower_bridge.installed_flwr_version().split(".")[:2])

    guarded = {**PATCHES, **GUARDED_IMPORTS}

    # Execute
    reasons = {name: flower_bridge.unrecognised(name) for name in guarded}

    # Assert: the recorded digests are those of this flwr (1.41.0 or 1.42.0), for every patch
    assert minor in flower_bridge.SUPPORTED_FLWR
    assert reasons == dict.fromkeys(guarded)
    assert set(flower_bridge.FINGERPRINTS) == set(guarded)
    for name, patch in guarded.items():
        for recorded in flower_bridge.FINGERPRINTS[name].values():
            assert set(recorded) == set(patch.targets)
    assert SECURITY == ["app-gate", "control-token", "superlink-front"]


def test_every_opacus_guard_recognises_the_installed_opacus() -> None:
    # Prepare / Execute
    reasons = {name: opacus_bridge.unrecognised(name) for name in opacus_bridge.GUARDS}

    # Assert
    assert reasons == dict.fromkeys(opacus_bridge.GUARDS)


# --- security patches fail closed -----------------------------------------------------------


@pytest.mark.parametrize("patch", SECURITY)
def test_security_patch_refuses_an_unknown_flwr_version(patch: str, unknown_flwr: str) -> None:
    # Prepare / Execute
    with pytest.raises(UnsupportedFlowerError) as err:
        flower_bridge.require(patch)

    # Assert: the message names the installed and the supported versions
    assert unknown_flwr in str(err.value)
    assert "1.41.x or 1.42.x" in str(err.value)


def test_gate_bin_is_not_written_for_an_unknown_flwr(tmp_path: Path, unknown_flwr: str) -> None:
    # Prepare
    folder = tmp_path / "bin"

    # Execute
    with pytest.raises(UnsupportedFlowerError):
        app_gate.write_gate_bin(folder)
    code = app_gate.main(["flwr-clientapp", "--token", "x"])

    # Assert: node start cannot start a node, and a task refuses to run
    assert not folder.exists()
    assert code == 1


def test_gate_refuses_when_flwrs_task_table_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a flwr that starts tasks with a command the gate has no executable for
    from flwr.supercore import constant

    grown = dict(constant.TASK_TYPE_TO_COMMAND)
    grown["new-task"] = "flwr-newapp"  # type: ignore[index]
    monkeypatch.setattr(constant, "TASK_TYPE_TO_COMMAND", grown)

    # Execute / Assert
    with pytest.raises(UnsupportedFlowerError, match="TASK_TYPE_TO_COMMAND"):
        app_gate.gated_commands()


def test_gate_refuses_when_flwrs_clientapp_runtime_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: same version string, but run_clientapp is not the code the gate wraps
    import importlib

    import flwr.supernode.runtime.run_clientapp as runtime

    # the module (its package re-exports the function under the module's name)
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")

    started: list[str] = []

    def changed_run_clientapp(*args: Any, **kwargs: Any) -> None:
        started.append("run")

    monkeypatch.setattr(runtime, "run_clientapp", changed_run_clientapp)
    monkeypatch.setattr(cli, "flwr_clientapp", lambda: started.append("cli"))
    seen: list[bytes] = []

    # Execute
    with pytest.raises(UnsupportedFlowerError, match="run_clientapp"):
        flower_bridge.run_gated_clientapp(["--token", "x"], seen.append)

    # Assert: nothing of flwr's ClientApp runtime ran
    assert started == []
    assert runtime.install_from_fab.__module__ == "flwr.cli.install"


def test_superlink_front_refuses_an_unknown_flwr(
    tmp_path: Path, unknown_flwr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    from fedcare.server import superlink_front

    token = tmp_path / "control.token"
    token.write_text("t" * 43, encoding="utf-8")

    # Execute
    code = superlink_front.main(["--fleet-address", "127.0.0.1:1", "--control-token-file", str(token),
                                 "--", "--insecure", "--host", "127.0.0.1", "--port", "2"])  # fmt: skip

    # Assert
    assert code == 2
    assert "1.41.x or 1.42.x" in capsys.readouterr().err


def test_superlink_front_refuses_changed_fleet_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a flwr whose Fleet router also serves a Control path
    from flwr.superlink.routers.fleet.router import router

    from fedcare.server.superlink_front import fleet_paths

    extra = SimpleNamespace(path="/v1/control/start-run")
    monkeypatch.setattr(router, "routes", [*router.routes, extra])

    # Execute / Assert: the fleet socket must not start serving it
    with pytest.raises(UnsupportedFlowerError, match="router"):
        fleet_paths()


def test_start_superlink_starts_nothing_on_an_unknown_flwr(tmp_path: Path, unknown_flwr: str) -> None:
    # Prepare
    from fedcare.server.deploy import SuperLinkSettings, start_superlink

    settings = SuperLinkSettings(address="127.0.0.1:19590", state_dir=tmp_path / "state", insecure=True)

    # Execute
    with pytest.raises(UnsupportedFlowerError):
        start_superlink(settings, ready_timeout=5.0)

    # Assert: no token written, no process started
    assert not settings.control_token_file.exists()
    assert not settings.pid_file.exists()


def test_control_token_is_not_stored_for_an_unknown_flwr(tmp_path: Path, unknown_flwr: str) -> None:
    # Prepare / Execute
    with pytest.raises(UnsupportedFlowerError):
        flower_bridge.store_control_token(tmp_path, "127.0.0.1:9301", "secret")

    # Assert
    assert not (tmp_path / "credentials.yaml").exists()


def test_control_token_is_stored_where_flwrs_cli_reads_it(tmp_path: Path) -> None:
    # Prepare
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY
    from flwr.supercore.credential_store import FileCredentialStore

    # Execute
    path = flower_bridge.store_control_token(tmp_path, "127.0.0.1:9301", "secret-token")

    # Assert
    assert FileCredentialStore(path).get(ACCESS_TOKEN_STORE_KEY % "127.0.0.1:9301") == b"secret-token"


# --- speed patches fall back ----------------------------------------------------------------


def _pull_functions() -> tuple[Any, Any]:
    from flwr.supercore.inflatable import inflatable_utils

    return inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree


def test_pull_backoff_falls_back_on_an_unknown_flwr(
    unknown_flwr: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    before = [dict(fn.__kwdefaults__) for fn in _pull_functions()]
    caplog.set_level(logging.WARNING, logger="fedcare.flower_bridge")

    # Execute
    patched = flower_bridge.shorten_pull_backoff(0.05, 0.5)

    # Assert: flwr's defaults untouched, one log line
    assert patched is False
    assert [dict(fn.__kwdefaults__) for fn in _pull_functions()] == before
    assert len(_bridge_warnings(caplog)) == 1
    assert "pull-backoff" in _bridge_warnings(caplog)[0].getMessage()


def test_pull_backoff_falls_back_when_the_pull_function_changed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    from flwr.supercore.inflatable import inflatable_utils

    def pull_objects(*args: Any, initial_backoff: float = 1, backoff_cap: float = 10,
                     max_tries_per_object: int | None = 5) -> None:  # fmt: skip
        """A different pull function."""

    monkeypatch.setattr(inflatable_utils, "pull_objects", pull_objects)
    caplog.set_level(logging.WARNING, logger="fedcare.flower_bridge")

    # Execute
    patched = flower_bridge.shorten_pull_backoff(0.05, 0.5)

    # Assert
    assert patched is False
    assert pull_objects.__kwdefaults__["initial_backoff"] == 1
    assert len(_bridge_warnings(caplog)) == 1


def test_supernode_poll_falls_back_on_an_unknown_flwr(
    unknown_flwr: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    import time

    import flwr.supernode.start_client_internal as loop

    caplog.set_level(logging.WARNING, logger="fedcare.flower_bridge")

    # Execute
    patched = supernode_main.patch_poll_interval(0.05)

    # Assert
    assert patched is False
    assert loop.time is time
    assert len(_bridge_warnings(caplog)) == 1


def test_supernode_poll_falls_back_when_the_loop_changed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    import time

    import flwr.supernode.start_client_internal as loop

    monkeypatch.setattr(loop, "start_client_internal", lambda *a, **k: None)
    caplog.set_level(logging.WARNING, logger="fedcare.flower_bridge")

    # Execute
    patched = supernode_main.patch_poll_interval(0.05)

    # Assert
    assert patched is False
    assert loop.time is time
    assert len(_bridge_warnings(caplog)) == 1


def test_warm_executor_falls_back_on_an_unknown_flwr(
    unknown_flwr: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    import flwr.supercore.superexec.run_superexec as runner

    original = runner.get_executor
    caplog.set_level(logging.WARNING, logger="fedcare.flower_bridge")

    # Execute
    wrapped = flower_bridge.wrap_superexec_executor(warm_exec.ForkingExecutor)

    # Assert: flwr's subprocess executor starts flwr-clientapp by name (the gate's executable)
    assert wrapped is False
    assert runner.get_executor is original
    assert len(_bridge_warnings(caplog)) == 1


def test_warm_executor_wraps_flwrs_subprocess_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    import flwr.supercore.superexec.run_superexec as runner
    from flwr.supercore.constant import ExecutorType

    monkeypatch.setattr(runner, "get_executor", runner.get_executor)  # restored afterwards

    # Execute
    wrapped = flower_bridge.wrap_superexec_executor(warm_exec.ForkingExecutor)
    executor = runner.get_executor(ExecutorType.SUBPROCESS)

    # Assert
    assert wrapped is True
    assert isinstance(executor, warm_exec.ForkingExecutor)


def _http_grid() -> Any:
    from flwr.superlink.grid.http_grid import HttpGrid

    return HttpGrid.__new__(HttpGrid)  # no connection: only its type matters here


def test_serverapp_poll_wraps_flwrs_deployment_grid() -> None:
    # Prepare
    from fedcare.server.grid_poll import PollingGrid, responsive_grid

    grid = _http_grid()
    saved = [dict(fn.__kwdefaults__) for fn in _pull_functions()]
    try:
        # Execute
        wrapped = responsive_grid(grid, interval=0.2)

        # Assert
        assert isinstance(wrapped, PollingGrid)
        assert wrapped.inner is grid
    finally:
        for fn, before in zip(_pull_functions(), saved, strict=True):
            fn.__kwdefaults__.clear()
            fn.__kwdefaults__.update(before)


def test_serverapp_poll_falls_back_when_httpgrid_changed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: flwr's send_and_receive is no longer the one PollingGrid reproduces
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedcare.server.grid_poll import responsive_grid

    monkeypatch.setattr(HttpGrid, "send_and_receive", lambda self, messages, *, timeout=None: [])
    grid = _http_grid()
    caplog.set_level(logging.WARNING, logger="fedcare.flower_bridge")

    # Execute
    result = responsive_grid(grid, interval=0.2)

    # Assert
    assert result is grid
    assert len(_bridge_warnings(caplog)) == 1


# --- Opacus ---------------------------------------------------------------------------------


def _regression_setup() -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedcare.models.regression import LogisticRegression

    torch.manual_seed(0)
    model = LogisticRegression(in_features=4)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)).float())
    return {
        "module": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "data_loader": DataLoader(data, batch_size=8),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
    }


def test_fast_path_refuses_an_opacus_whose_noise_step_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an Opacus whose optimizer no longer adds noise to the clipped sum
    from opacus import PrivacyEngine
    from opacus.optimizers.optimizer import DPOptimizer

    from fedcare.privacy.engine import resolve_grad_sample_mode
    from fedcare.privacy.fast_grad import make_private_fast

    def add_noise(self: Any) -> None:
        for p in self.params:
            p.grad = p.summed_grad.view_as(p)

    monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)
    setup = _regression_setup()

    # Execute / Assert: explicit "fast" refuses; "auto" takes Opacus's own per-sample path ("ew")
    with pytest.raises(UnsupportedOpacusError, match="add_noise"):
        make_private_fast(PrivacyEngine(accountant="rdp"), **setup)
    assert resolve_grad_sample_mode("auto", module=setup["module"]) == "ew"


def test_fast_path_refuses_an_unknown_opacus_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(opacus, "__version__", "1.7.0")

    # Execute / Assert
    with pytest.raises(UnsupportedOpacusError, match="1.5.x or 1.6.x"):
        opacus_bridge.require_fast_clipped_sum()


def test_lean_accumulate_falls_back_to_opacus_optimizer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: Opacus's accumulate differs from the one the lean copy replaces
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedcare.privacy.fast_grad import make_private_fast

    monkeypatch.setattr(DPOptimizerFastGradientClipping, "accumulate",
                        lambda self: DPOptimizerFastGradientClipping.__mro__[1].accumulate(self))  # fmt: skip
    caplog.set_level(logging.WARNING, logger="fedcare.privacy.opacus_bridge")

    # Execute
    _, optimizer, _ = make_private_fast(PrivacyEngine(accountant="rdp"), **_regression_setup())

    # Assert: Opacus's own class, and one line saying so
    assert type(optimizer) is DPOptimizerFastGradientClipping
    assert len([r for r in caplog.records if r.name == "fedcare.privacy.opacus_bridge"]) == 1


def test_lean_optimizer_keeps_opacus_settings_and_accountant_hook() -> None:
    # Prepare
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedcare.privacy.fast_grad import make_private_fast

    engine = PrivacyEngine(accountant="rdp")

    # Execute
    _, optimizer, loader = make_private_fast(engine, **_regression_setup())
    optimizer.step_hook(optimizer)

    # Assert: same noise, clipping and batch settings; the engine's accountant took the step
    assert isinstance(optimizer, DPOptimizerFastGradientClipping)
    assert type(optimizer) is not DPOptimizerFastGradientClipping
    assert (optimizer.noise_multiplier, optimizer.max_grad_norm, optimizer.expected_batch_size) == (1.0, 1.0, 8)
    assert engine.accountant.history == [(1.0, 1 / len(loader), 1)]


# --- private names fedcare imports (no patch) -----------------------------------------------

#: flwr's public API (and the legacy API fedcare's SecAgg+ path still runs on)
PUBLIC_FLWR = frozenset({
    "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.server.workflow",
    "flwr.server.strategy", "flwr.client.mod", "flwr.simulation",
    "flwr.common", "flwr.server", "flwr.server.client_manager", "flwr.server.client_proxy",  # legacy
})


def test_secaggplus_names_refuse_changed_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: same flwr version, but a SecAgg+ Stage whose unmask stage has another name
    from flwr.common.secure_aggregation import secaggplus_constants

    class Stage:  # noqa: D106 - a changed flwr
        SETUP = "setup"
        UNMASK = "reveal"

    recognised = flower_bridge.secaggplus_names()
    monkeypatch.setattr(secaggplus_constants, "Stage", Stage)

    # Execute
    with pytest.raises(UnsupportedFlowerError, match="secaggplus_constants:Stage") as err:
        flower_bridge.secaggplus_names()

    # Assert: the secure-cohort check never reads unrecognised names
    assert recognised.stage.UNMASK == "unmask"
    assert "secure-cohort" in str(err.value)
    assert flower_bridge.unrecognised("secaggplus-constants") is not None


def test_private_names_refuse_an_unknown_or_incomplete_flwr(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    from flwr.supercore.run import Run

    monkeypatch.setitem(flower_bridge.PRIVATE_NAMES, "Gone", "flwr.supercore.run:NoSuchName")
    resolved = flower_bridge.Run

    # Execute
    with pytest.raises(UnsupportedFlowerError, match="NoSuchName"):
        flower_bridge.private_name("Gone")
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(UnsupportedFlowerError, match="1.43.0"):
        flower_bridge.private_name("Run")

    # Assert
    assert resolved is Run


def _flwr_imports(path: Path) -> list[tuple[int, str]]:
    """Return (line, module) of every flwr module ``path`` imports, function-level ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "flwr"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "flwr":
            found.append((node.lineno, str(node.module)))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).split(".")[0] == "flwr"):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_apps_import_flwr_only_from_its_public_api_or_the_bridge() -> None:
    # Prepare
    root = Path(flower_bridge.__file__).parent
    files = sorted(f for part in ("client", "server", "simulations") for f in (root / part).rglob("*.py"))

    # Execute
    imports = {f.relative_to(root).as_posix(): _flwr_imports(f) for f in files}
    private = {name: [(line, m) for line, m in found if m not in PUBLIC_FLWR] for name, found in imports.items()}

    # Assert: the scan saw the apps' flwr imports, and none of them is private
    assert len(files) > 10
    assert "flwr.serverapp" in {m for _, m in imports["server/app.py"]}
    assert "flwr.simulation" in {m for _, m in imports["simulations/runner.py"]}  # function-level
    assert {name: found for name, found in private.items() if found} == {}
