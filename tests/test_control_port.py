"""The SuperLink's Control API is not reachable from a node's network position.

flwr 1.41 serves Fleet, Control and Runtime APIs on one HTTP port and cannot split them with a
flag; ``fedcare server start`` with a control address runs the SuperLink through
``fedcare.server.superlink_front``: Fleet routes only on the fleet address, everything on the
loopback control address. The process test starts a real TLS SuperLink that way and checks
from both addresses that a run can be submitted / a node registered only on the control one,
while a node joins through the fleet one. Every process is stopped by PID in teardown.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import NO_APP_PIN, TINY_APP, federation, heart_manifest  # noqa: E402

from fedcare.privacy.certs import generate_node_key  # noqa: E402
from fedcare.server.deploy import (  # noqa: E402
    FlowerConnection,
    NodeRegistrationError,
    RunSubmissionError,
    SuperLinkSettings,
    UnsafeControlAddressError,
    register_node,
    submit_run,
    superlink_command,
)
from fedcare.server.flower_app import build_flower_app, load_study  # noqa: E402
from fedcare.server.superlink_front import FleetOnlyGate, fleet_paths  # noqa: E402

FAILING_STUDY = (
    '[study]\nname = "{name}"\n\n'
    '[run]\nnum-server-rounds = 1\nmin-nodes = 1\nfail = true\nout-dir = ""\n\n'
    '[app]\nserverapp = "fedcare_tiny_app.server_app:app"\n'
    'clientapp = "fedcare_tiny_app.client_app:app"\n'
)


# --- no processes ---------------------------------------------------------------------------


def test_public_fleet_address_gets_a_loopback_control_port(tmp_path: Path) -> None:
    # Execute
    public = SuperLinkSettings(address="0.0.0.0:9300", state_dir=tmp_path, insecure=True)
    local = SuperLinkSettings(address="127.0.0.1:9300", state_dir=tmp_path, insecure=True)
    explicit = SuperLinkSettings(
        address="127.0.0.1:9300", control_address="127.0.0.1:9500", state_dir=tmp_path, insecure=True
    )

    # Assert: no Fleet address, public or loopback, ever carries the Control API
    assert public.effective_control_address == "127.0.0.1:9301"
    argv = superlink_command(public)
    assert argv[1:5] == ["-m", "fedcare.server.superlink_front", "--fleet-address", "0.0.0.0:9300"]
    assert argv[argv.index("--control-token-file") + 1] == str((tmp_path / "control.token").resolve())
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "9301"
    assert local.effective_control_address == "127.0.0.1:9301"
    assert superlink_command(local)[1:5] == ["-m", "fedcare.server.superlink_front", "--fleet-address",
                                             "127.0.0.1:9300"]  # fmt: skip
    assert explicit.coordinator_address == "127.0.0.1:9500"


def test_control_address_must_be_loopback_and_its_own_port(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(UnsafeControlAddressError, match="loopback"):
        SuperLinkSettings(
            address="0.0.0.0:9300", control_address="10.0.0.5:9301", state_dir=tmp_path, insecure=True
        )
    with pytest.raises(UnsafeControlAddressError, match="both 9300"):
        SuperLinkSettings(
            address="0.0.0.0:9300", control_address="127.0.0.1:9300", state_dir=tmp_path, insecure=True
        )


def _call(
    gate: FleetOnlyGate, path: str, local_port: int, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, list[str]]:
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    gate.app = app
    scope = {"type": "http", "path": path, "root_path": "", "server": ("127.0.0.1", local_port),
             "headers": headers or []}  # fmt: skip
    asyncio.run(gate(scope, receive, send))
    return sent[0]["status"], reached


def test_gate_lets_only_fleet_routes_through_the_fleet_port() -> None:
    # Prepare
    paths = fleet_paths()
    token = "t" * 43
    gate = FleetOnlyGate(lambda *a: None, control_port=9301, allowed_paths=paths,  # type: ignore[arg-type]
                         control_token=token)  # fmt: skip
    bearer = [(b"authorization", f"Bearer {token}".encode())]

    # Execute / Assert: fleet socket (local port 9300)
    assert "/v1/fleet/pull-messages" in paths and not any("control" in p for p in paths)
    assert _call(gate, "/v1/fleet/pull-messages", 9300) == (200, ["/v1/fleet/pull-messages"])
    for refused in ("/v1/control/start-run", "/v1/control/register-node",
                    "/v1/runtime/pull-task-input", "/v1/fleet/../control/start-run", "/docs"):  # fmt: skip
        assert _call(gate, refused, 9300) == (403, []), refused
        assert _call(gate, refused, 9300, bearer) == (403, []), refused
    # control socket (local port 9301): Control API only with the token; Runtime and Fleet pass
    assert _call(gate, "/v1/control/start-run", 9301, bearer) == (200, ["/v1/control/start-run"])
    for wrong in ([], [(b"authorization", b"Bearer nope")], bearer + bearer):
        assert _call(gate, "/v1/control/list-runs", 9301, wrong) == (401, [])
    assert _call(gate, "/docs", 9301) == (401, [])
    assert _call(gate, "/v1/runtime/pull-task-input", 9301) == (200, ["/v1/runtime/pull-task-input"])


# --- real processes -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_fleet_address_refuses_runs_and_registrations_control_address_accepts(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the tiny app's ServerApp fails at once (needs no node), so a submitted run ends
    monkeypatch.setenv("PYTHONPATH", str(TINY_APP))
    monkeypatch.syspath_prepend(str(TINY_APP))
    study_file = tmp_path / "study.toml"
    study_file.write_text(FAILING_STUDY.format(name="control-port"))
    app_dir = build_flower_app(load_study(study_file), tmp_path / "app")
    site = "cleveland"
    manifest = heart_manifest(shared_data, site, tmp_path / "manifests")

    with federation(
        tmp_path / "fed",
        nodes=[site],
        register=[],
        extra_env={"PYTHONPATH": str(TINY_APP)},
    ) as fed:
        # even with the coordinator's token, the fleet address serves no Control API
        from_node = FlowerConnection.from_certs_dir(
            fed.address, fed.certs.root, control_token_file=fed.control_token
        )
        from_coordinator = fed.connection
        late_key = generate_node_key(tmp_path / "hospital-late", "late").public_key

        # Execute / Assert: a node's network position can neither submit nor register
        with pytest.raises(RunSubmissionError, match="not served on the Fleet port"):
            submit_run(app_dir, from_node, timeout=60.0)
        with pytest.raises(NodeRegistrationError, match="not served on the Fleet port"):
            register_node(late_key, from_node, timeout=60.0)

        # the coordinator on the loopback control address can do both
        node_id = register_node(fed.node_keys[site].public_key, from_coordinator, timeout=60.0)
        outcome = submit_run(app_dir, from_coordinator, timeout=120.0)
        assert outcome.status == "finished:failed"
        assert "failing on purpose" in outcome.details

        # and a registered node joins through the fleet address
        node = fed.start_node(site, manifest, ready_timeout=60.0, trusted_app_hashes=(NO_APP_PIN,))
        assert node.node_id == node_id
        superlink_log = fed.superlink.log_text() if fed.superlink else ""

    # the refusals never reached flwr's handlers: the front answered 403 on the fleet port
    assert '"POST /v1/control/start-run HTTP/1.1" 403' in superlink_log
    assert '"POST /v1/control/register-node HTTP/1.1" 403' in superlink_log
    assert superlink_log.count("[ControlServicer.RegisterNode] Created node_id=") == 1
