"""Attack: make a hospital's node run an app the hospital never approved.

Issue 11, finding 3: without ``--trust-app`` a node only warned, and ran any Flower App the
SuperLink sent; the site policy's ``allowed_app_hashes`` was checked only inside fedcare's own
ClientApp, i.e. after the app's code had been loaded, so an app that skips the policy, the
privacy ledger and DP ran at the hospital. The attacker is whoever can submit a run (a
coordinator, or whoever took over the coordinator's host): it ships its own code in the FAB.

The node is started as the walk-through does: the hospital pins the study's app hash in its
site policy (``fedcare node pin-app HASH --policy FILE``) and starts with ``--policy FILE``
(no ``--trust-app``). The evil app's ClientApp module writes a marker file the moment it is
imported; the marker must never appear. Every process is stopped by PID in teardown.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from deploy_support import TINY_APP, federation, free_port, heart_manifest  # noqa: E402

from fedcare.client.deploy import NodeDeployError, NodeSettings, pin_app_in_policy, start_node  # noqa: E402
from fedcare.server.deploy import submit_run  # noqa: E402
from fedcare.server.flower_app import app_hash, build_flower_app, load_study  # noqa: E402

HONEST_STUDY = (
    '[study]\nname = "honest"\n\n'
    "[run]\nnum-server-rounds = 1\nmin-nodes = 1\nfail = false\nout-dir = ''\n\n"
    '[app]\nserverapp = "fedcare_tiny_app.server_app:app"\n'
    'clientapp = "fedcare_tiny_app.client_app:app"\n'
)

EVIL_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil-app"
version = "1.0.0"
description = "skips the site policy, the ledger and DP"
license = "Apache-2.0"
dependencies = ["flwr>=1.41,<1.42"]

[tool.flwr.app]
publisher = "fedcare"

[tool.flwr.app.components]
serverapp = "fedcare_tiny_app.server_app:app"
clientapp = "evil_client:app"

[tool.flwr.app.config]
num-server-rounds = 1
min-nodes = 1
fail = false
out-dir = ""
"""

#: the attacker's code, shipped inside the FAB: it acts the moment it is imported
EVIL_CLIENT = """\
from pathlib import Path

Path({marker!r}).write_text("the unpinned app's code ran at the hospital")

from flwr.clientapp import ClientApp

app = ClientApp()
"""


def test_default_node_without_any_pin_does_not_start(tmp_path: Path) -> None:
    # Prepare: a node as `fedcare node start` builds it with no --trust-app and no --policy
    manifest = Path(__file__).resolve().parents[2] / "simulations" / "sites" / "heart_va.toml"
    (tmp_path / "ca.crt").write_text("not used: the node must refuse before connecting")
    (tmp_path / "node.key").write_text("not used")
    settings = NodeSettings(site_manifest=manifest, superlink="127.0.0.1:9", port=free_port(),
                            state_dir=tmp_path / "state", ca_cert=tmp_path / "ca.crt",
                            auth_key=tmp_path / "node.key", max_wait_time=1.0)  # fmt: skip

    # Execute
    with pytest.raises(NodeDeployError, match="pins no app") as info:
        start_node(settings, ready_timeout=30.0)

    # Assert: refused before any SuperNode process existed, with the way out in the message
    assert "fedcare node pin-app" in str(info.value)
    assert not (tmp_path / "state").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_unpinned_app_is_refused_before_its_code_runs(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the hospital pins the honest study's app in its policy, as the walk-through does
    monkeypatch.setenv("PYTHONPATH", str(TINY_APP))
    monkeypatch.syspath_prepend(str(TINY_APP))
    (tmp_path / "honest.toml").write_text(HONEST_STUDY)
    honest_hash = app_hash(build_flower_app(load_study(tmp_path / "honest.toml"), tmp_path / "honest"))
    policy = tmp_path / "policy.toml"
    policy.write_text("require_secure_aggregation = false\n", encoding="utf-8")
    assert pin_app_in_policy(policy, honest_hash)
    marker = tmp_path / "evil-code-ran.txt"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (evil / "evil_client.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    evil_hash = app_hash(evil)
    site = "cleveland"
    manifest = heart_manifest(shared_data, site, tmp_path / "manifests")

    with federation(tmp_path / "fed", nodes=[site], extra_env={"PYTHONPATH": str(TINY_APP)}) as fed:
        node = fed.start_node(site, manifest, ready_timeout=90.0, extra_node_config={"policy": str(policy)})

        # Execute: the attacker submits its own app
        outcome = submit_run(evil, fed.connection, timeout=240.0)
        node_log = node.handle.log_text()
        assert node.handle.running(), node.handle.log_tail()

    # Assert: the node refused the FAB before unpacking it; its code never ran
    assert not marker.exists(), "the unpinned app's code ran at the hospital"
    assert f"this site does not run app {evil_hash}" in node_log
    installed = fed.root / "nodes" / site / "flwr-home" / "apps"
    assert not installed.exists() or not any(p.name.endswith(evil_hash[:8]) for p in installed.iterdir())
    print(f"\nunpinned app: run {outcome.run_id} {outcome.status} in {outcome.elapsed_s:.1f} s")
