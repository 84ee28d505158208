"""Attack: reach the SuperLink's Control API (list runs, submit runs, register nodes).

Issue 11, finding 9: with the walk-through's default start (one loopback ``--address``), flwr
1.41 served the Control API on the Fleet port, without credentials: ``POST
/v1/control/list-runs`` answered with the run list. The attacker here is anything that can
reach the Fleet port (every hospital, by design) or the coordinator host's loopback (another
local user or process without the coordinator's token).

The SuperLink is started exactly as the walk-through does (``fedcare server start --certs
... --address 127.0.0.1:PORT --state ...``, a real process, stopped by PID); every request is a
real HTTPS request checked against the federation CA.
"""

from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path

import httpx
import pytest
from flwr.proto.control_pb2 import ListRunsRequest, ListRunsResponse  # type: ignore[attr-defined]
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from deploy_support import free_port  # noqa: E402

from fedcare.privacy.certs import init_certificates  # noqa: E402
from fedcare.server.cli import server_app  # noqa: E402
from fedcare.server.deploy import stop_superlink  # noqa: E402

CONTROL_PATHS = ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node")


def _listening_hosts(port: int) -> set[str]:
    """Return the local addresses of the TCP sockets listening on ``port`` (Linux /proc)."""
    hosts: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if width == 8:
                    hosts.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))
                    hosts.add(socket.inet_ntop(socket.AF_INET6, raw))
    return hosts


def _post(client: httpx.Client, url: str, token: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return client.post(url, content=ListRunsRequest().SerializeToString(), headers=headers)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_walkthrough_superlink_serves_no_control_api_on_the_fleet_port_nor_without_token(
    tmp_path: Path,
) -> None:
    # Prepare: the walk-through's coordinator commands, on free ports
    certs = init_certificates(tmp_path / "certs", server_name="localhost")
    state = tmp_path / "superlink"
    port = free_port()
    fleet = f"127.0.0.1:{port}"
    started = CliRunner().invoke(
        server_app, ["start", "--certs", str(certs.root), "--address", fleet, "--state", str(state),
                     "--ready-timeout", "90"],
    )  # fmt: skip
    try:
        assert started.exit_code == 0, started.output
        control_port = port + 1  # the default control address, 127.0.0.1:<port + 1>
        token_file = state / "control.token"
        token = token_file.read_text(encoding="utf-8").strip() if token_file.is_file() else "none"

        # Execute: the attacker's requests
        verify = ssl.create_default_context(cafile=str(certs.ca_cert))
        with httpx.Client(verify=verify, timeout=30.0) as client:
            on_fleet = {path: _post(client, f"https://{fleet}{path}").status_code for path in CONTROL_PATHS}
            on_fleet_with_token = _post(client, f"https://{fleet}/v1/control/list-runs", token).status_code
            control_hosts = _listening_hosts(control_port)
            fleet_hosts = _listening_hosts(port)
            assert all(code in (403, 404) for code in on_fleet.values()), on_fleet
            assert control_hosts == {"127.0.0.1"}, control_hosts
            no_token = _post(client, f"https://127.0.0.1:{control_port}/v1/control/list-runs")
            wrong_token = _post(client, f"https://127.0.0.1:{control_port}/v1/control/list-runs", "x" * 43)
            # the coordinator, with the token on the control port: the same request works
            coordinator = _post(client, f"https://127.0.0.1:{control_port}/v1/control/list-runs", token)
    finally:
        stop_superlink(state, timeout=15.0)

    # Assert: the Fleet port refuses every Control path, token or not; the control port refuses
    # requests without the coordinator's token and listens on 127.0.0.1 only
    assert on_fleet_with_token in (403, 404)
    assert no_token.status_code == 401 and wrong_token.status_code == 401
    assert coordinator.status_code == 200, coordinator.text
    assert isinstance(ListRunsResponse.FromString(coordinator.content), ListRunsResponse)
    assert fleet_hosts == {"127.0.0.1"}, fleet_hosts
    assert token_file.stat().st_mode & 0o077 == 0
