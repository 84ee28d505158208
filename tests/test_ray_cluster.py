"""A simulation on a Ray cluster fedcare did not start: ``[simulation] ray_address`` / ``--ray-address``.

The test starts a two-node Ray cluster on this machine (``ray start --head`` plus a second
``ray start --address`` worker node, each with its own temp dir and one CPU), runs a small
scenario through ``fedcare simulate --ray-address``, and checks that

- the scenario completed, its ClientApp actors ran on *both* nodes (Ray writes an
  ``:actor_name:ClientAppActor`` line into the log of every actor's worker, in the temp dir of
  the node that ran it; with one CPU per node and one CPU per virtual client, flwr's pool of two
  actors can only fit one per node),
- the cluster is still up afterwards with both nodes (fedcare disconnected; it did not stop what
  it did not start),

and stops only what it started: each ``ray start --block`` runs in its own session and is sent
SIGTERM, then its process group SIGKILL. ``ray stop`` is not used: it stops every Ray process of
the user on the machine, other people's simulations included.

Skipped when the ``ray`` command is absent (failed under ``CI=true``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedcare.simulations.runner import ray_backend_config
from fedcare.simulations.scenario import InvalidScenarioError, SimulationSettings, load_scenario, with_ray_address

START_TIMEOUT_S = 180.0  # `ray start` of one node on 2 loaded cores (36 s measured)
SIMULATE_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0
ACTOR_MARKER = ":actor_name:ClientAppActor"

SCENARIO = """
name = "ray-cluster"
rounds = 2
seed = 1

[data]
kind = "sklearn"
name = "breast_cancer"

[partition]
hospitals = 4
kind = "iid"

[model]
family = "logistic"

[training]
batch_size = 32
lr = 0.5

[privacy]
enabled = false

[policy]                          # an infrastructure test: plain, non-DP rounds, exact evaluation
require_dp = false
require_secure_aggregation = false
evaluation = "exact"

[simulation]
client_num_cpus = 1
round_timeout_s = 300
"""


def _ray_command() -> str:
    """Return the ``ray`` command of this environment; skip (fail under CI) when absent."""
    exe = Path(sys.executable).parent / "ray"
    found = str(exe) if exe.is_file() else shutil.which("ray")
    if found is None:
        reason = "the `ray` command is not installed (pip install 'ray[default]'); the Ray-cluster test needs it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _free_port() -> int:
    """Return a TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fedcare() -> str:
    """Return the ``fedcare`` command of this environment."""
    exe = Path(sys.executable).parent / "fedcare"
    return str(exe) if exe.is_file() else shutil.which("fedcare") or "fedcare"


@dataclass
class _Node:
    """One ``ray start --block`` process this test started, its temp dir and log."""

    proc: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path

    def wait_started(self) -> None:
        """Return once the node says it started; fail on exit or after START_TIMEOUT_S."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return
            if self.proc.poll() is not None:
                pytest.fail(f"`ray start` exited with {self.proc.returncode}:\n{text[-2000:]}")
            time.sleep(0.5)
        pytest.fail(f"`ray start` did not start within {START_TIMEOUT_S:g} s:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop this node only: SIGTERM to its `ray start`, then SIGKILL to its process group (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what this node started
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass

    def ran_client_actors(self) -> bool:
        """Return whether a ClientApp actor ran on this node (Ray's marker in the node's worker logs)."""
        for path in self.temp_dir.glob("session_*/logs/worker-*"):
            try:
                if ACTOR_MARKER in path.read_text(errors="replace"):
                    return True
            except OSError:
                continue
        return False


def _start_node(ray: str, args: list[str], root: Path, name: str) -> _Node:
    """Start ``ray start --block <args>`` in its own session with its own temp dir."""
    temp_dir = root / name  # short: Ray's socket paths must stay under 107 characters
    temp_dir.mkdir()
    log = root / f"{name}.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - argv built here
            [ray, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
             "--object-store-memory=100000000", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    return _Node(proc=proc, temp_dir=temp_dir, log=log)


@pytest.fixture
def two_node_cluster() -> Iterator[tuple[str, _Node, _Node]]:
    """Yield (address, head, worker) of a two-node Ray cluster on this machine; stop both afterwards."""
    ray = _ray_command()
    root = Path(tempfile.mkdtemp(prefix="fcray", dir="/tmp"))
    port = _free_port()
    nodes: list[_Node] = []
    try:
        head = _start_node(ray, ["--head", f"--port={port}", "--include-dashboard=false"], root, "h")
        nodes.append(head)
        head.wait_started()
        worker = _start_node(ray, [f"--address=127.0.0.1:{port}", '--resources={"site_b": 1}'], root, "w")
        nodes.append(worker)
        worker.wait_started()
        yield f"127.0.0.1:{port}", head, worker
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def _alive_nodes(address: str) -> int:
    """Return how many nodes of the cluster at ``address`` are alive (a bounded driver subprocess)."""
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive'])); ray.shutdown()"
    )
    proc = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_a_scenario_runs_across_both_nodes_of_a_running_cluster_and_leaves_it_up(
    two_node_cluster: tuple[str, _Node, _Node], tmp_path: Path
) -> None:
    # Prepare
    address, head, worker = two_node_cluster
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Execute
    proc = subprocess.run(  # noqa: S603
        [_fedcare(), "simulate", str(scenario), "--out", str(out), "--ray-address", address],
        capture_output=True, text=True, timeout=SIMULATE_TIMEOUT_S, check=False, env=env,
    )
    # Assert
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 2
    assert head.ran_client_actors(), "no ClientApp actor ran on the head node"
    assert worker.ran_client_actors(), "no ClientApp actor ran on the worker node"
    assert head.proc.poll() is None and worker.proc.poll() is None, "fedcare stopped a node it did not start"
    assert _alive_nodes(address) == 2


def test_the_cluster_address_reaches_ray_and_the_local_resources_do_not() -> None:
    # Prepare
    sim = SimulationSettings(ray_address="10.0.0.5:6379", num_cpus=8, client_num_cpus=2)
    # Execute
    config = ray_backend_config(sim)
    # Assert: Ray refuses num_cpus / num_gpus / object_store_memory when connecting to a cluster
    assert config["init_args"] == {"address": "10.0.0.5:6379", "logging_level": "ERROR"}
    assert config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_ray_address_flag_overrides_the_scenario(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "scenario.toml"
    path.write_text(SCENARIO)
    scenario = load_scenario(path)
    # Execute
    changed = with_ray_address(scenario, "auto")
    # Assert
    assert scenario.simulation.ray_address is None
    assert changed.simulation.ray_address == "auto"
    assert changed.simulation.client_num_cpus == scenario.simulation.client_num_cpus
    with pytest.raises(InvalidScenarioError, match="--ray-address"):
        with_ray_address(scenario, "")


def test_an_address_where_no_cluster_answers_is_refused_before_anything_starts(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "scenario.toml"
    path.write_text(SCENARIO + f'ray_address = "127.0.0.1:{_free_port()}"\n')
    scenario = load_scenario(path)
    from fedcare.simulations.runner import run_scenario  # noqa: PLC0415

    # Execute / Assert: no cluster is started in its place, and no output is written
    with pytest.raises(InvalidScenarioError, match="no Ray cluster answers"):
        run_scenario(scenario, tmp_path / "out")
    assert not (tmp_path / "out").exists()
