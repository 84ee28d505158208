"""Framework overhead of a real deployment: round time split into local compute and the rest.

Three UCI heart-disease hospitals (Cleveland, Hungarian, VA) on 127.0.0.1, TLS and SuperNode
authentication on, the same logistic regression trained with the same settings, 5 FedAvg
rounds with federated evaluation, in these arms (one run of this script runs them back to back):

- ``flower``: a minimal plain Flower app written to a temp folder by this script (Message-API
  ServerApp with ``flwr.serverapp.strategy.FedAvg``, a ClientApp training ``nn.Linear`` with
  SGD on the same preprocessed arrays), started with plain ``flower-superlink`` /
  ``flower-supernode`` / ``flwr run``.
- ``fedcare-cold``: ``fedcare certs init``, ``fedcare server start``, ``fedcare server
  register-node`` x3, ``fedcare node start --cold --poll-interval 3`` x3, ``fedcare run``, with
  the ServerApp's reply polling left at flwr's 3 s (``FEDCARE_SERVERAPP_PULL_INTERVAL=off``):
  fedcare as flwr runs it out of the box (a fresh ``flwr-clientapp`` per message, 3 s polls).
- ``fedcare-warm``: the same with fedcare's defaults: ``node start --warm`` (ClientApp tasks
  fork from a warm SuperExec with torch/fedcare/site data loaded, task polling 0.1 s;
  ``client.warm_exec``), idle SuperNode poll 0.5 s (``client.supernode_main``) and the
  ServerApp pulling replies every 0.2 s (``server.grid_poll``).
- ``fedcare-warm-3s`` (only with ``--arms``): warm tasks, but flwr's 3 s idle SuperNode poll.
- ``fedcare-fused``: ``fedcare-warm`` with ``evaluate-with-train = true`` in the study: each train
  message also asks the sites to evaluate the model it carries (the previous round's global
  model), so rounds 1 .. N-1 have one message exchange instead of two; round N keeps its
  evaluate stage. The same evaluations reach the history, one round later.

Sites: ``simulations/sites/heart_{cleveland,hungarian,va}.toml`` (211 / 183 / 92 training rows);
the plain app gets the arrays fedcare's loader produced from them.

Measured per round, server side: wall time between flwr's ``[ROUND k/N]`` log lines (the last
round ends at "Strategy execution finished"), stamped as ``flwr run --stream`` delivers them
(flwr streams the log every 0.5 s, so single rounds carry about +-0.5 s; the total is flwr's
own "Strategy execution finished in X s"). Compute: the largest training time a site reported
for the round (``train-s`` in the train reply: fedcare's ``train_local``, the plain app's loop).
A fedcare node sends ``train-s`` only when its environment sets ``FEDCARE_REPORT_TIMING=1`` (a
timing side channel, off by default and warned by the node): this script sets it for its own
nodes only.
Overhead = round - max site compute (it includes evaluation, which takes milliseconds here).
Node ready: wall time of ``fedcare node start`` (it returns when flwr logs ``SuperNode ID``,
i.e. the SuperLink accepted the authenticated node), and for warm nodes also until the warm
SuperExec logged that it is loaded. Every process runs on 127.0.0.1, is stopped by PID, and
every wait is bounded. Telemetry and update checks are off; runtime dependency installation off.

Usage::

    python benchmarks/framework_overhead.py --rounds 5 --local-epochs 100 --batch-size 1 \
        --out benchmarks/results/framework_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.supervise import (
    ProcessHandle,
    find_executable,
    flower_env,
    read_pid_file,
    spawn,
    stop_pid,
    stop_process,
    wait_for_log,
    wait_for_port,
)

from deploy_harness import free_port, write_heart_study

ROOT = Path(__file__).resolve().parent.parent
#: site -> manifest (simulations/sites: FLamby's Fed-Heart-Disease preparation, data in ../shared/data)
SITES = {site: ROOT / "simulations" / "sites" / f"heart_{site}.toml" for site in ("cleveland", "hungarian", "va")}
#: fedcare-warm-3s: warm ClientApp tasks but flwr's 3 s idle SuperNode poll (isolates the two)
ARMS = ("flower", "fedcare-cold", "fedcare-warm", "fedcare-warm-3s", "fedcare-fused")
DEFAULT_ARMS = ("flower", "fedcare-cold", "fedcare-warm", "fedcare-fused")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
_FINISHED = re.compile(r"Strategy execution finished in ([0-9.]+)s")
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "COLUMNS": "200",
         "PYTHONUNBUFFERED": "1"}  # fmt: skip


#: the benchmark's sites train without DP (like the plain app) and in plain (non-SecAgg+) rounds:
#: policy and privacy settings say so explicitly
POLICY = "require_dp = false\nrequire_secure_aggregation = false\n"

PLAIN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plainoverhead"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedcare-bench"

[tool.flwr.app.components]
serverapp = "plainoverhead_app:server"
clientapp = "plainoverhead_app:client"

[tool.flwr.app.config]
num-server-rounds = {rounds}
local-epochs = {epochs}
batch-size = {batch}
lr = {lr}
in-features = 15
out = '{out}'
"""

PLAIN_APP = '''\
"""Minimal plain Flower app: FedAvg of a logistic regression (nn.Linear + BCE) on .npz arrays."""

import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client = ClientApp()
server = ServerApp()


def _model(context):
    return torch.nn.Linear(int(context.run_config["in-features"]), 1)


def _data(context, split):
    d = np.load(context.node_config["data"])
    return torch.from_numpy(d[f"x_{split}"]).float(), torch.from_numpy(d[f"y_{split}"]).float()


@client.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    model = _model(context)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context, "train")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=int(context.run_config["batch-size"]),
        shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=float(context.run_config["lr"]))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(int(context.run_config["local-epochs"])):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb).squeeze(-1), yb)
            loss.backward()
            opt.step()
    metrics = {"num-examples": len(y), "train-s": time.perf_counter() - started}
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = _model(context)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context, "test")
    with torch.no_grad():
        logits = model(x).squeeze(-1)
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
        acc = float(((logits > 0).float() == y).float().mean())
    return Message(RecordDict({"metrics": MetricRecord(
        {"num-examples": len(y), "loss": loss, "accuracy": acc})}), reply_to=msg)


def _train_aggr(records, weight_key):
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in rows)
    return MetricRecord({"train-s-max": max(float(m["train-s"]) for m in rows),
                         "train-s-mean": sum(float(m["train-s"]) for m in rows) / len(rows),
                         "num-examples": total})


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    n = int(context.run_config.get("min-nodes", 3))
    history = []
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=3,
                      min_evaluate_nodes=3, min_available_nodes=3,
                      train_metrics_aggr_fn=_train_aggr)
    started = time.time()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(_model(context).state_dict()),
                            num_rounds=rounds, timeout=600.0)
    train = {int(k): dict(v) for k, v in result.train_metrics_clientapp.items()}
    with open(context.run_config["out"], "w", encoding="utf-8") as fh:
        json.dump({"train": train, "wall_s": time.time() - started}, fh)
'''


def env(**extra: str) -> dict[str, str]:
    """Return the environment of every process the benchmark starts."""
    return flower_env({**QUIET, **extra})


def prepare_data(work: Path) -> dict[str, dict[str, Any]]:
    """Load each site through its manifest; write the same preprocessed arrays (.npz) for the plain app."""
    from fedcare.client.loaders import load_site_file  # noqa: PLC0415

    out: dict[str, dict[str, Any]] = {}
    (work / "sites").mkdir(parents=True, exist_ok=True)
    for site, manifest in SITES.items():
        data = load_site_file(manifest)
        arrays = work / "sites" / f"{site}.npz"
        np.savez(arrays, x_train=data.train.inputs[0].numpy(), y_train=data.train.targets.numpy(),
                 x_test=data.test.inputs[0].numpy(), y_test=data.test.targets.numpy())  # fmt: skip
        out[site] = {"manifest": manifest, "arrays": arrays, "n_train": len(data.train),
                     "n_features": int(data.train.inputs[0].shape[1])}  # fmt: skip
    return out


def run_checked(argv: list[str], *, timeout: float, environ: dict[str, str]) -> tuple[float, str]:
    """Run ``argv`` to completion (bounded); return (seconds, stdout+stderr); raise on failure."""
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=timeout,  # noqa: S603
                          stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    elapsed = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:4])} ...` exited {proc.returncode}: {text[-3000:]}")
    return elapsed, text


def stream(argv: list[str], *, timeout: float, environ: dict[str, str], log: Path) -> list[tuple[float, str]]:
    """Run ``argv``, stamping each output line on arrival; bounded; return [(time, line)]."""
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(argv, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # noqa: S603
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, ""):
            lines.append((time.time(), _ANSI.sub("", raw.rstrip("\n"))))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid, 0, timeout=10.0, popen=proc)
        reader.join(timeout=5.0)
        log.write_text("\n".join(f"{t:.3f} {line}" for t, line in lines) + "\n", encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:3])} ...` exited {proc.returncode}; see {log}")
    return lines


def round_times(lines: list[tuple[float, str]], rounds: int) -> tuple[list[float], float]:
    """Return per-round wall times from the stamped log, and flwr's own strategy total."""
    starts: dict[int, float] = {}
    end = None
    total = float("nan")
    for t, line in lines:
        if (m := _ROUND.search(line)) and int(m.group(1)) not in starts:
            starts[int(m.group(1))] = t
        elif m := _FINISHED.search(line):
            end, total = t, float(m.group(1))
    if len(starts) != rounds or end is None:
        raise RuntimeError(f"log shows rounds {sorted(starts)} and end {end}: the run did not complete")
    bounds = [starts[k] for k in range(1, rounds + 1)] + [end]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)], total


def stop_pid_file(path: Path) -> None:
    """Stop the process named by a PID file, if any (bounded)."""
    if path.is_file():
        try:
            pid, ticks = read_pid_file(path)
            stop_pid(pid, ticks, timeout=15.0)
        except Exception as err:  # noqa: BLE001 - best effort in teardown
            print(f"warning: could not stop {path}: {err}", file=sys.stderr)


def wait_file_line(path: Path, needle: str, timeout: float) -> float | None:
    """Return seconds until ``needle`` appears in ``path`` (None after ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.is_file() and needle in path.read_text(encoding="utf-8", errors="replace"):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


# --- arms -------------------------------------------------------------------------------------


def fedcare_arm(arm: str, args: argparse.Namespace, work: Path, sites: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """Run one fedcare arm end to end through the ``fedcare`` CLI; return its measurements."""
    warm = arm.startswith("fedcare-warm") or arm == "fedcare-fused"
    poll = "3" if arm in ("fedcare-cold", "fedcare-warm-3s") else "0.5"
    fedcare = find_executable("fedcare")
    root = work / arm
    certs = root / "certs"
    # the benchmark's own nodes opt in to sending their local training time (train-s; warned)
    timing = {"FEDCARE_REPORT_TIMING": "1"}
    base_env = env(**timing) if warm else env(FEDCARE_SERVERAPP_PULL_INTERVAL="off", **timing)
    run_checked([fedcare, "certs", "init", "--out", str(certs), "--server-name", "localhost"],
                 timeout=120, environ=base_env)  # fmt: skip
    bundle = root / "bundle"
    run_checked([fedcare, "certs", "node-bundle", "--certs", str(certs), "--out", str(bundle)],
                timeout=120, environ=base_env)  # fmt: skip
    keys = {site: root / "hospitals" / site for site in SITES}
    for site in SITES:  # each hospital makes its own key pair; the coordinator gets the .pub
        run_checked([fedcare, "node", "keygen", "--out", str(keys[site]), "--name", site],
                    timeout=120, environ=base_env)  # fmt: skip
    port = free_port()
    address = f"127.0.0.1:{port}"
    control = f"127.0.0.1:{port + 1}"  # `server start`'s default control address
    server_state = root / "superlink"
    token = server_state / "control.token"
    policy = root / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    checkpoint_dir = root / "model"
    study = write_heart_study(
        root / "study.toml", name=f"overhead-{arm}", description="framework overhead benchmark",
        rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr,
        round_timeout_s=600.0, checkpoint_dir=checkpoint_dir,
        extra=f"evaluate-with-train = {str(arm == 'fedcare-fused').lower()}\n",
    )  # fmt: skip
    # the coordinator publishes the study's app hash; the hospitals pin it in their policy
    _, app_hash_out = run_checked([fedcare, "server", "app-hash", str(study)], timeout=120, environ=base_env)
    run_checked([fedcare, "node", "pin-app", re.findall(r"\b[0-9a-f]{64}\b", app_hash_out)[0], "--policy", str(policy)],
                timeout=120, environ=base_env)  # fmt: skip
    privacy = root / "privacy.toml"
    privacy.write_text("enabled = false\n", encoding="utf-8")
    node_states = {site: root / "nodes" / site for site in SITES}
    ready: dict[str, dict[str, float | None]] = {}
    try:
        run_checked([fedcare, "server", "start", "--address", address, "--state", str(server_state),
                     "--certs", str(certs)], timeout=120, environ=base_env)  # fmt: skip
        for site in SITES:
            run_checked([fedcare, "server", "register-node", str(keys[site] / f"{site}.pub"),
                         "--superlink", control, "--certs", str(certs), "--control-token", str(token)],
                        timeout=120, environ=base_env)  # fmt: skip
        for site in SITES:
            state = node_states[site]
            seconds, text = run_checked(
                [fedcare, "node", "start", "--site", str(sites[site]["manifest"]), "--superlink", address,
                 "--port", str(free_port()), "--ca", str(bundle / "ca.crt"), "--key", str(keys[site] / f"{site}.key"),
                 "--state", str(state), "--ledger-dir", str(root / "ledgers" / site), "--policy", str(policy),
                 "--privacy-settings", str(privacy), "--warm" if warm else "--cold", "--poll-interval", poll],
                timeout=180, environ=base_env,
            )  # fmt: skip
            entry: dict[str, float | None] = {"node_start_s": seconds}
            if m := re.search(r"\(([0-9.]+) s for flower-supernode", text):
                entry["supernode_accepted_s"] = float(m.group(1))
            if warm:  # the warm SuperExec loads torch/fedcare/data beside it
                extra = wait_file_line(state / "supernode.log", "fedcare warm SuperExec ready", 120.0)
                entry["warm_superexec_ready_s"] = None if extra is None else seconds + extra
            ready[site] = entry
        t0 = time.monotonic()
        lines = stream([fedcare, "run", str(study), "--superlink", control, "--certs", str(certs),
                        "--control-token", str(token),
                        "--timeout", str(args.run_timeout)],
                       timeout=args.run_timeout + 120, environ=base_env, log=root / "run.log")  # fmt: skip
        run_s = time.monotonic() - t0
        if not any("finished:completed" in line for _, line in lines):
            raise RuntimeError(f"{arm}: run did not complete; see {root / 'run.log'}")
        history = json.loads((checkpoint_dir / "history.json").read_text(encoding="utf-8"))
        missing = [s for rec in history["rounds"] for s, m in rec["site_train"].items() if "train-s" not in m]
        if missing:
            raise RuntimeError(f"{arm}: sites {sorted(set(missing))} sent no train-s; the nodes must run with "
                               "FEDCARE_REPORT_TIMING=1")
        compute = [max(float(m["train-s"]) for m in rec["site_train"].values()) for rec in history["rounds"]]
        per_site = [{s: float(m["train-s"]) for s, m in rec["site_train"].items()} for rec in history["rounds"]]
    finally:
        for site in SITES:
            stop_pid_file(node_states[site] / "supernode.pid")
        stop_pid_file(server_state / "superlink.pid")
    rounds, strategy_total = round_times(lines, args.rounds)
    return summarise(arm, rounds, compute, strategy_total, run_s, ready=ready, per_site=per_site)


def flower_arm(args: argparse.Namespace, work: Path, sites: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """Run the minimal plain Flower app on plain flower-superlink / flower-supernode / flwr run."""
    from fedcare.privacy.certs import generate_node_key, init_certificates  # noqa: PLC0415 - same CA

    root = work / "flower"
    certs = init_certificates(root / "certs", server_name="localhost")
    node_keys = {site: generate_node_key(root / "hospitals" / site, site) for site in SITES}
    app = root / "app"
    app.mkdir(parents=True)
    out = root / "serverapp.json"
    (app / "pyproject.toml").write_text(PLAIN_PYPROJECT.format(
        rounds=args.rounds, epochs=args.local_epochs, batch=args.batch_size, lr=args.lr, out=out),
        encoding="utf-8")  # fmt: skip
    (app / "plainoverhead_app.py").write_text(PLAIN_APP, encoding="utf-8")
    port = free_port()
    address = f"127.0.0.1:{port}"
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(textwrap.dedent(f"""\
        [superlink]
        default = "bench"

        [superlink.bench]
        address = "{address}"
        root-certificates = "{certs.ca_cert.resolve()}"
        """), encoding="utf-8")  # fmt: skip
    cli_env = env(FLWR_HOME=str(home))
    handles: list[ProcessHandle] = []
    ready: dict[str, dict[str, float | None]] = {}
    try:
        link_home = root / "superlink-home"
        link_home.mkdir()
        link = spawn(
            [find_executable("flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert),
             "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--database", str(root / "superlink.db"), "--host", "127.0.0.1", "--port", str(port)],
            log_path=root / "superlink.log", pid_file=root / "superlink.pid",
            env=env(FLWR_HOME=str(link_home)), cwd=root,
        )  # fmt: skip
        handles.append(link)
        wait_for_log(link, r"Uvicorn running on https?://", timeout=60.0, what="flower-superlink")
        wait_for_port(link, "127.0.0.1", port, timeout=60.0, what="flower-superlink")
        for site in SITES:
            run_checked([find_executable("flwr"), "supernode", "register",
                         str(node_keys[site].public_key.resolve()), "bench"], timeout=120, environ=cli_env)  # fmt: skip
        for site in SITES:
            node_dir = root / "nodes" / site
            node_dir.mkdir(parents=True)
            t0 = time.monotonic()
            node = spawn(
                [find_executable("flower-supernode"), "--root-certificates", str(certs.ca_cert.resolve()),
                 "--auth-supernode-private-key", str(node_keys[site].private_key.resolve()),
                 "--superlink", address, "--host", "127.0.0.1", "--port", str(free_port()),
                 "--node-config", f"data='{sites[site]['arrays']}'"],
                log_path=node_dir / "supernode.log", pid_file=node_dir / "supernode.pid",
                env=env(FLWR_HOME=str(node_dir / "flwr-home")), cwd=node_dir,
            )  # fmt: skip
            handles.append(node)
            wait_for_log(node, r"SuperNode ID: (\d+)", timeout=120.0, what=f"SuperNode {site}")
            ready[site] = {"supernode_accepted_s": time.monotonic() - t0}
        t0 = time.monotonic()
        lines = stream([find_executable("flwr"), "run", str(app), "bench", "--stream"],
                       timeout=args.run_timeout, environ=cli_env, log=root / "run.log")  # fmt: skip
        run_s = time.monotonic() - t0
        result = json.loads(out.read_text(encoding="utf-8"))
    finally:
        for handle in reversed(handles):
            stop_process(handle)
    compute = [float(result["train"][str(k)]["train-s-max"]) for k in range(1, args.rounds + 1)]
    rounds, strategy_total = round_times(lines, args.rounds)
    return summarise("flower", rounds, compute, strategy_total, run_s, ready=ready)


def summarise(arm: str, rounds: list[float], compute: list[float], strategy_total: float, run_s: float,
              **extra: Any) -> dict[str, Any]:  # fmt: skip
    """Return an arm's per-round figures and medians."""
    overhead = [r - c for r, c in zip(rounds, compute, strict=True)]
    steady = slice(1, None) if len(rounds) > 1 else slice(None)  # round 1 also fetches the app
    med_round = statistics.median(rounds[steady])
    med_over = statistics.median(overhead[steady])
    return {
        "arm": arm,
        "round_s": rounds,
        "compute_s": compute,
        "overhead_s": overhead,
        "median_round_s": med_round,
        "median_compute_s": statistics.median(compute[steady]),
        "median_overhead_s": med_over,
        "overhead_pct": 100.0 * med_over / med_round,
        "overhead_pct_of_60s_round": 100.0 * med_over / 60.0,
        "strategy_total_s": strategy_total,
        "mean_overhead_s_all_rounds": (strategy_total - sum(compute)) / len(rounds),
        "run_s": run_s,
        **extra,
    }


def main() -> None:
    """Parse options, run the arms, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument("--run-timeout", type=float, default=1200.0)
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (logs).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "framework_overhead.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedcare-overhead-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    results = []
    try:
        sites = prepare_data(work)
        for arm in args.arms:
            print(f"--- {arm} ...", flush=True)
            t0 = time.monotonic()
            res = flower_arm(args, work, sites) if arm == "flower" else fedcare_arm(arm, args, work, sites)
            res["load_after"] = os.getloadavg()
            results.append(res)
            print(f"    {arm}: rounds {[round(r, 1) for r in res['round_s']]} s, compute "
                  f"{[round(c, 1) for c in res['compute_s']]} s ({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    header = f"{'arm':<14}{'round s':>9}{'compute s':>11}{'overhead s':>12}{'overhead %':>12}{'% of 60 s':>11}"
    print("\nmedian over rounds 2..N (round 1 also fetches and installs the app)")
    print(header)
    for r in results:
        print(f"{r['arm']:<14}{r['median_round_s']:>9.1f}{r['median_compute_s']:>11.1f}"
              f"{r['median_overhead_s']:>12.1f}{r['overhead_pct']:>11.1f}%{r['overhead_pct_of_60s_round']:>10.1f}%")  # fmt: skip
    for r in results:
        for site, ready in r.get("ready", {}).items():
            print(f"{r['arm']:<14} node {site:<10} " + ", ".join(
                f"{k} {v:.1f}" for k, v in ready.items() if v is not None))  # fmt: skip
    payload = {
        "benchmark": "framework_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sites": list(SITES),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
        "wall_s": time.monotonic() - started,
        "arms": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
