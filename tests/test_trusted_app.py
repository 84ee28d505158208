"""Only the Flower App a hospital pinned runs at its node.

flwr 1.41's ``flower-supernode --trusted-entities`` accepts only FABs carrying Flower Hub
verification records, which a self-built app submitted with ``flwr run`` never has, so fedcare
pins apps by SHA-256 at the node (``fedcare.client.app_gate``). The process test runs a real
TLS SuperLink (Fleet and Control on separate ports) and one node that pins one app: that app
runs a round; another app is refused before it is installed. The tiny numpy app keeps a round
short; every process is stopped by PID in teardown.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import TINY_APP, federation, heart_manifest  # noqa: E402

from fedcare.client.app_gate import (  # noqa: E402
    TRUSTED_APPS_ENV,
    parse_app_hash,
    trusted_hashes_from_env,
    write_gate_bin,
)
from fedcare.client.deploy import NodeSettings, TrustedAppsFileError, read_trusted_apps  # noqa: E402
from fedcare.server.deploy import submit_run  # noqa: E402
from fedcare.server.flower_app import app_hash, build_flower_app, load_study  # noqa: E402

TINY_STUDY = (
    '[study]\nname = "{name}"\n\n'
    '[run]\nnum-server-rounds = 1\nmin-nodes = 1\nfail = false\nout-dir = \'{out}\'\n\n'
    '[app]\nserverapp = "fedcare_tiny_app.server_app:app"\n'
    'clientapp = "fedcare_tiny_app.client_app:app"\n'
)


def _tiny_app(tmp_path: Path, name: str) -> tuple[Path, Path]:
    out = tmp_path / f"out-{name}"
    study = tmp_path / f"{name}.toml"
    study.write_text(TINY_STUDY.format(name=name, out=out))
    return build_flower_app(load_study(study), tmp_path / f"app-{name}"), out


# --- no processes ---------------------------------------------------------------------------


def test_app_hash_is_the_hash_of_the_fab_flwr_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    monkeypatch.syspath_prepend(str(TINY_APP))
    app_a, _ = _tiny_app(tmp_path, "trusted")
    app_b, _ = _tiny_app(tmp_path, "other")

    # Execute
    digest = app_hash(app_a)

    # Assert: deterministic, equal to flwr's own build, different for another study
    assert digest == hashlib.sha256(build_fab_from_disk(app_a)).hexdigest() == app_hash(app_a)
    assert digest != app_hash(app_b)
    assert parse_app_hash(digest.upper()) == digest


def test_cli_app_hash_prints_the_hash_fedcare_run_submits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    from typer.testing import CliRunner

    from fedcare.server.cli import server_app

    monkeypatch.syspath_prepend(str(TINY_APP))
    app_dir, _ = _tiny_app(tmp_path, "trusted")

    # Execute
    result = CliRunner().invoke(server_app, ["app-hash", str(tmp_path / "trusted.toml")])

    # Assert
    assert result.exit_code == 0, result.output
    assert result.output.strip() == app_hash(app_dir)


def test_pins_are_validated(tmp_path: Path) -> None:
    # Prepare
    good = "ab" * 32
    pins = tmp_path / "pins.txt"
    pins.write_text(f"# study heart v1\n{good}\n\n{good}  # again\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-hash\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")

    # Execute / Assert
    assert read_trusted_apps(pins) == (good,)
    with pytest.raises(TrustedAppsFileError, match="bad.txt:1"):
        read_trusted_apps(bad)
    with pytest.raises(TrustedAppsFileError, match="pins no app"):
        read_trusted_apps(empty)
    with pytest.raises(ValueError, match="refuse every run"):
        NodeSettings(site_manifest=pins, superlink="127.0.0.1:9300", port=9400, state_dir=tmp_path,
                     insecure=True, trusted_app_hashes=())  # fmt: skip
    assert trusted_hashes_from_env({TRUSTED_APPS_ENV: f"{good.upper()}, "}) == {good}
    assert trusted_hashes_from_env({}) == frozenset()


def test_gate_refuses_every_task_command_but_the_clientapp(tmp_path: Path) -> None:
    # Prepare
    import subprocess

    folder = write_gate_bin(tmp_path / "bin")

    # Execute
    result = subprocess.run(
        [str(folder / "flwr-serverapp"), "--token", "x"], capture_output=True, text=True, timeout=60
    )

    # Assert
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND  # every command flwr starts a task with

    assert sorted(p.name for p in folder.iterdir()) == sorted(set(TASK_TYPE_TO_COMMAND.values()))
    assert result.returncode == 1
    assert "pinned ClientApps only" in result.stderr


# --- real processes -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_node_runs_the_pinned_app_and_refuses_another(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("PYTHONPATH", str(TINY_APP))
    monkeypatch.syspath_prepend(str(TINY_APP))
    trusted_app, trusted_out = _tiny_app(tmp_path, "trusted")
    other_app, other_out = _tiny_app(tmp_path, "other")
    trusted_hash, other_hash = app_hash(trusted_app), app_hash(other_app)
    site = "cleveland"
    manifest = heart_manifest(shared_data, site, tmp_path / "manifests")

    with federation(
        tmp_path / "fed", nodes=[site], extra_env={"PYTHONPATH": str(TINY_APP)}
    ) as fed:
        node = fed.start_node(site, manifest, ready_timeout=60.0, trusted_app_hashes=(trusted_hash,))

        # Execute
        trusted = submit_run(trusted_app, fed.connection, timeout=240.0)
        other = submit_run(other_app, fed.connection, timeout=240.0)
        node_log = node.handle.log_text()
        assert node.handle.running(), node.handle.log_tail()

    # Assert: the pinned app trained (0 + offset 1); the other one never ran at the hospital
    assert trusted.completed, trusted.details
    assert np.allclose(np.load(trusted_out / "global.npy"), 1.0)
    assert not other.completed, other.status
    assert not (other_out / "global.npy").exists()
    assert f"this site does not run app {other_hash}" in node_log
    assert f"this site does not run app {trusted_hash}" not in node_log
    installed = [p.name for p in (fed.root / "nodes" / site / "flwr-home" / "apps").iterdir()]
    assert any(name.endswith(trusted_hash[:8]) for name in installed), installed
    assert not any(name.endswith(other_hash[:8]) for name in installed), installed
    print(f"\npinned app: {trusted.status} in {trusted.elapsed_s:.1f} s; "
          f"other app: {other.status} in {other.elapsed_s:.1f} s")  # fmt: skip


def test_pin_app_adds_the_hash_to_the_policy_and_keeps_everything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a hospital's policy with comments, a table-free layout, and one pin already
    from typer.testing import CliRunner

    from fedcare.client.cli import node_app
    from fedcare.client.deploy import pin_app_in_policy
    from fedcare.privacy.policy import load_policy

    monkeypatch.syspath_prepend(str(TINY_APP))
    app_dir, _ = _tiny_app(tmp_path, "trusted")
    digest = app_hash(app_dir)
    first = "ab" * 32
    policy = tmp_path / "policy.toml"
    policy.write_text(f'# reviewed 2024-05\nmax_epsilon_per_study = 2.0  # board decision\n'
                      f'allowed_app_hashes = ["{first}"]\n', encoding="utf-8")  # fmt: skip
    fresh = tmp_path / "new" / "policy.toml"

    # Execute
    result = CliRunner().invoke(node_app, ["pin-app", str(app_dir), "--policy", str(policy)])
    again = pin_app_in_policy(policy, digest)
    created = pin_app_in_policy(fresh, first)

    # Assert: the folder's hash is the one `fedcare run` submits; nothing else changed
    assert result.exit_code == 0, result.output
    loaded = load_policy(policy)
    assert loaded.allowed_app_hashes == (first, digest)
    assert loaded.max_epsilon_per_study == 2.0 and not loaded.allow_unpinned_apps
    assert "# board decision" in policy.read_text() and "# reviewed 2024-05" in policy.read_text()
    assert again is False and created is True
    assert load_policy(fresh).allowed_app_hashes == (first,)
