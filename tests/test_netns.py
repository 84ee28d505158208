"""Hospitals as separate hosts: a deployment across Linux network namespaces (issue 13 item 8).

Loopback hides mistakes a real network exposes (a certificate that names only localhost, a
Control API that listens on every interface, a node that needs more than the Fleet port). This
test builds a small network of its own and removes it afterwards:

- one namespace for the coordinator (bridge ``br0``, ``10.77.0.1/24``) and one per hospital
  (``eth0``, ``10.77.0.1x/24``), joined by veth pairs whose coordinator ends hang on the bridge;
  nothing is created in the machine's own namespace (veth pairs are made inside the coordinator's
  namespace and their other end is moved straight into the hospital's);
- the coordinator's certificates name ``10.77.0.1`` (``fedcare certs init --ip``); the SuperLink
  serves the Fleet API on ``10.77.0.1`` and the Control API on its loopback admin address only;
- from a hospital's namespace the Fleet port answers and the Control port cannot be connected
  to, on the coordinator's address or anywhere else; the only socket the coordinator listens
  on outside its loopback is the Fleet port, and a hospital listens on nothing but loopback;
- three heart-disease hospitals (as in the README walk-through) complete one study, every command
  the public ``fedcare`` CLI run inside its host's namespace with ``ip netns exec``.

Needs root and ``ip netns``: skipped with the reason otherwise, **failed** under ``CI=true``.
Every process is stopped by its PID file and every namespace deleted in ``finally`` blocks;
every wait is bounded. About 2 min on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import heart_manifest, write_heart_study  # noqa: E402

from fedcare.server.checkpoint import FINAL_MODEL_FILE, HISTORY_FILE  # noqa: E402
from fedcare.supervise import NotRunningError, stop_pid_file  # noqa: E402

SITES = ["cleveland", "hungarian", "va"]
SUBNET = "10.77.0"
COORDINATOR_IP = f"{SUBNET}.1"
FLEET_PORT = 9300
CONTROL_PORT = 9301
NODE_PORT = 9401
#: seconds any single command may take (a study: its own, longer bound)
COMMAND_TIMEOUT_S = 420.0
STUDY_TIMEOUT_S = 480


def _fedcare() -> str:
    exe = Path(sys.executable).parent / "fedcare"
    return str(exe) if exe.is_file() else shutil.which("fedcare") or "fedcare"


def _run(argv: list[str], *, timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(  # noqa: S603 - argv built here
        argv, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _in(ns: str, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside network namespace ``ns``."""
    return _run(["ip", "netns", "exec", ns, *argv], **kwargs)  # type: ignore[arg-type]


def _netns_unavailable() -> str | None:
    """Return why namespaces cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run as root, or in CI)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"fcprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30, check=False)
    return None


class Network:
    """The namespaces of one test: the coordinator and one per hospital."""

    def __init__(self, tag: str, sites: list[str]) -> None:
        self.coordinator = f"fc{tag}-c"
        self.hospitals = {site: f"fc{tag}-h{i}" for i, site in enumerate(sites)}
        self.addresses = {site: f"{SUBNET}.{11 + i}" for i, site in enumerate(sites)}
        self.made: list[str] = []

    def create(self) -> None:
        """Create the namespaces, the bridge and the veth pairs, and bring them up."""
        c = self.coordinator
        _run(["ip", "netns", "add", c])
        self.made.append(c)
        _run(["ip", "-n", c, "link", "set", "lo", "up"])
        _run(["ip", "-n", c, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", c, "addr", "add", f"{COORDINATOR_IP}/24", "dev", "br0"])
        _run(["ip", "-n", c, "link", "set", "br0", "up"])
        for i, (site, ns) in enumerate(self.hospitals.items()):
            _run(["ip", "netns", "add", ns])
            self.made.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", c, "link", "add", f"vh{i}", "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", c, "link", "set", f"vh{i}", "master", "br0"])
            _run(["ip", "-n", c, "link", "set", f"vh{i}", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[site]}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def delete(self) -> None:
        """Delete every namespace this object made (their veth ends go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        self.made.clear()


@pytest.fixture
def network() -> Iterator[Network]:
    """Namespaces for the coordinator and three hospitals, always deleted afterwards."""
    reason = _netns_unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"network namespaces are required under CI=true: {reason}")
        pytest.skip(reason)
    net = Network(str(os.getpid() % 100000), SITES)
    try:
        net.create()
        yield net
    finally:
        net.delete()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
    assert not any(ns in left.stdout for ns in [net.coordinator, *net.hospitals.values()]), left.stdout


_CONNECT = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
except OSError as err:
    print(type(err).__name__)
else:
    print("connected")
"""


def _connect_from(ns: str, host: str, port: int) -> str:
    """Try one TCP connection from namespace ``ns``; return "connected" or the error's type."""
    return _in(ns, [sys.executable, "-c", _CONNECT, host, str(port)], timeout=30).stdout.strip()


def _listening(ns: str) -> set[tuple[str, int]]:
    """Return the (address, port) pairs of TCP sockets listening in namespace ``ns``."""
    out = _in(ns, ["ss", "-Hltn"], timeout=30).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        found.add((host.strip("[]"), int(port)))
    return found


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1800)  # bounded; minutes on a quiet machine, far more on a loaded one
def test_hospitals_on_separate_hosts_reach_only_the_fleet_port(
    tmp_path: Path, shared_data: Path, network: Network
) -> None:
    # Prepare: the coordinator's certificates name its network address, each hospital makes
    # its own key, pins the study's app, and gets the node bundle
    fc = _fedcare()
    coord = network.coordinator
    certs, bundle, state = tmp_path / "certs", tmp_path / "bundle", tmp_path / "superlink"
    _run([fc, "certs", "init", "--out", str(certs), "--server-name", "coordinator", "--ip", COORDINATOR_IP])
    _run([fc, "certs", "node-bundle", "--certs", str(certs), "--out", str(bundle)])
    model_dir = tmp_path / "model"
    study = tmp_path / "study.toml"
    write_heart_study(study, name="heart-netns-test", checkpoint_dir=model_dir,
                      description="three UCI heart-disease hospitals on separate network namespaces")
    digest = _run([fc, "server", "app-hash", str(study)]).stdout.strip().splitlines()[-1]
    token = state / "control.token"
    node_states = {site: tmp_path / f"node-{site}" for site in SITES}
    try:
        # Execute: the coordinator's SuperLink, Fleet on its network address, Control on loopback
        _in(coord, [fc, "server", "start", "--certs", str(certs), "--address",
                    f"{COORDINATOR_IP}:{FLEET_PORT}", "--state", str(state), "--ready-timeout", "300"])  # fmt: skip
        for site in SITES:
            keys = tmp_path / f"hospital-{site}"
            _run([fc, "node", "keygen", "--out", str(keys), "--name", site])
            _in(coord, [fc, "server", "register-node", str(keys / f"{site}.pub"), "--superlink",
                        f"127.0.0.1:{CONTROL_PORT}", "--certs", str(certs), "--control-token", str(token)])  # fmt: skip
        coordinator_listens = _listening(coord)
        reach = {
            site: {
                "fleet": _connect_from(ns, COORDINATOR_IP, FLEET_PORT),
                "control": _connect_from(ns, COORDINATOR_IP, CONTROL_PORT),
                "control-loopback": _connect_from(ns, "127.0.0.1", CONTROL_PORT),
            }
            for site, ns in network.hospitals.items()
        }
        for site, ns in network.hospitals.items():
            policy = tmp_path / f"policy-{site}.toml"
            policy.write_text("require_secure_aggregation = false\n", encoding="utf-8")
            _run([fc, "node", "pin-app", digest, "--policy", str(policy)])
            manifest = heart_manifest(shared_data, site, tmp_path / "manifests")
            _in(ns, [fc, "node", "start", "--site", str(manifest), "--ca", str(bundle / "ca.crt"),
                     "--key", str(tmp_path / f"hospital-{site}" / f"{site}.key"), "--policy", str(policy),
                     "--superlink", f"{COORDINATOR_IP}:{FLEET_PORT}", "--port", str(NODE_PORT),
                     "--state", str(node_states[site]), "--ledger-dir", str(tmp_path / f"ledger-{site}"),
                     "--ready-timeout", "300"])  # fmt: skip
        hospital_listens = {site: _listening(ns) for site, ns in network.hospitals.items()}
        # pin again just before submitting: the hash covers every run-config default, so a
        # fedcare upgraded in between (a shared development tree) would otherwise be refused
        digest = _run([fc, "server", "app-hash", str(study)]).stdout.strip().splitlines()[-1]
        for site in SITES:
            _run([fc, "node", "pin-app", digest, "--policy", str(tmp_path / f"policy-{site}.toml")])
        result = _in(coord, [fc, "run", str(study), "--superlink", f"127.0.0.1:{CONTROL_PORT}",
                             "--certs", str(certs), "--control-token", str(token),
                             "--timeout", str(STUDY_TIMEOUT_S)],
                     timeout=STUDY_TIMEOUT_S + 120, check=False)  # fmt: skip
    finally:
        for site in SITES:
            try:
                stop_pid_file(node_states[site] / "supernode.pid", "SuperNode", timeout=15.0)
            except NotRunningError:
                pass
        try:
            stop_pid_file(state / "superlink.pid", "SuperLink", timeout=15.0)
        except NotRunningError:
            pass

    # Assert: the Control API listens on the coordinator's loopback only, the Fleet port is
    # the one socket open to the network, and hospitals reach nothing else
    outside = {(host, port) for host, port in coordinator_listens if not host.startswith("127.")}
    assert outside == {(COORDINATOR_IP, FLEET_PORT)}, coordinator_listens
    assert ("127.0.0.1", CONTROL_PORT) in coordinator_listens, coordinator_listens
    for site in SITES:
        assert reach[site]["fleet"] == "connected", (site, reach[site])
        assert reach[site]["control"] == "ConnectionRefusedError", (site, reach[site])
        assert reach[site]["control-loopback"] == "ConnectionRefusedError", (site, reach[site])
        assert all(host.startswith("127.") for host, _ in hospital_listens[site]), hospital_listens[site]
    # one study completed across the namespaces
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"run \d+ finished:completed", result.stdout), result.stdout
    history = json.loads((model_dir / HISTORY_FILE).read_text())
    assert history["status"] == "completed"
    assert len(history["rounds"]) == 2
    assert len(history["rounds"][-1]["site_train"]) == len(SITES)
    assert (model_dir / FINAL_MODEL_FILE).is_file()
    for site in SITES:  # each hospital kept its own ledger, on its own host
        assert any((tmp_path / f"ledger-{site}").iterdir()), site
