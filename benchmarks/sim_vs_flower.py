"""fedcare's simulation against a minimal plain Flower app doing the same work, side by side.

Workload (both arms): ``simulations/scenarios/scale_pneumonia_100.toml`` with ``--hospitals``
(default 1,000) and ``--min-per-site`` (default 3): PneumoniaMNIST split by fedcare's Dirichlet
partition (α = 0.5, seed 0; the plain arm writes exactly those hospitals to ``.npz`` files), the
GroupNorm CNN (width 8), FedAvg, 10 rounds, 10 % of the hospitals sampled per round for training
and for evaluation, one local epoch, batch 32, SGD lr 0.05, no DP, Flower's simulation engine on
Ray with 2 CPUs and 1 CPU per virtual client.

- ``fedcare``: ``benchmarks/sim_scale.py`` (``run_scenario``: policy checks, ledgers, count and
  evaluation releases under the scenario's policy, checkpoints, plots);
- ``plain``: ``benchmarks/plain_flower_app.py`` (module-level ClientApp) and flwr's
  ``FedAvg(min_available_nodes = hospitals)`` (it waits until every virtual node registered).

Each arm runs in its own subprocess; the arms alternate (ABBA by default: fedcare, plain,
plain, fedcare) so that a change in the machine's load hits both. Per run: wall time (the
subprocess's whole run, as ``sim_scale.py`` measures it: data, partition, writing the hospitals,
Ray, rounds, final evaluation), the federated part (writing the hospitals + the simulation), the
median round time over rounds 2–10 (round 1 includes Ray start-up), hospitals trained in round 1,
peak PSS of the process tree, and the final model's AUROC on the whole PneumoniaMNIST test split.

Usage::

    python benchmarks/sim_vs_flower.py --out benchmarks/results/sim_vs_flower.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # plain_flower_app and sim_scale, here and in Ray's workers

RUN_TIMEOUT_S = 1800


def _plain_arm(args: argparse.Namespace) -> dict[str, Any]:
    """Run the plain Flower arm once in this process; return its figures."""
    import numpy as np  # noqa: PLC0415
    from flwr.app import ArrayRecord, ConfigRecord, Context  # noqa: PLC0415
    from flwr.serverapp import Grid, ServerApp  # noqa: PLC0415
    from flwr.serverapp.strategy import FedAvg  # noqa: PLC0415
    from flwr.simulation import run_simulation  # noqa: PLC0415
    from sim_scale import SCENARIO, TreeMemorySampler, scenario_with  # noqa: PLC0415

    import plain_flower_app  # noqa: PLC0415
    from fedcare.client.loaders import load_site_file  # noqa: PLC0415
    from fedcare.client.metrics import evaluate  # noqa: PLC0415
    from fedcare.simulations.runner import build_hospitals  # noqa: PLC0415

    scenario = scenario_with(SCENARIO, hospitals=args.hospitals, rounds=args.rounds, min_per_site=args.min_per_site)
    sampler = TreeMemorySampler(os.getpid())
    sampler.start()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    hospitals = build_hospitals(scenario)  # fedcare's partition: the same hospitals as the fedcare arm
    round_end: list[float] = []
    trained: list[int] = []

    class CountingFedAvg(FedAvg):
        """FedAvg that records how many hospitals replied to each train round."""

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            trained.append(sum(1 for r in replies if r.has_content()))
            return super().aggregate_train(server_round, replies)

    sim = scenario.simulation
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="plain-flower-") as tmp:
        fed_t0 = time.perf_counter()
        for i, site in enumerate(hospitals):
            np.savez(f"{tmp}/site-{i}.npz", train_x=site.train.inputs[0].numpy(), train_y=site.train.targets.numpy(),
                     test_x=site.test.inputs[0].numpy(), test_y=site.test.targets.numpy())
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            """FedAvg over the virtual hospitals."""
            model = plain_flower_app.build_model(scenario.model.width)
            config = ConfigRecord({"sites-dir": tmp, "width": scenario.model.width, "lr": scenario.training.lr,
                                   "batch-size": scenario.training.batch_size})
            strategy = CountingFedAvg(fraction_train=sim.fraction_train, fraction_evaluate=sim.fraction_evaluate,
                                      min_available_nodes=len(hospitals))
            outcome = strategy.start(
                grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=scenario.rounds,
                timeout=sim.round_timeout_s, train_config=config, evaluate_config=config,
                evaluate_fn=lambda rnd, _arrays: (round_end.append(time.perf_counter() - t0) if rnd else None),
            )
            model.load_state_dict(outcome.arrays.to_torch_state_dict())
            result["model"] = model

        run_simulation(
            server_app=server_app, client_app=plain_flower_app.app, num_supernodes=len(hospitals),
            backend_config={  # type: ignore[arg-type]
                "client_resources": {"num_cpus": sim.client_num_cpus, "num_gpus": 0.0},
                "init_args": {"num_cpus": sim.num_cpus, "num_gpus": 0, "include_dashboard": False,
                              "object_store_memory": sim.object_store_mb * 1024 * 1024, "logging_level": "ERROR"},
            },
        )
        federated = time.perf_counter() - fed_t0
    wall = time.perf_counter() - t0  # as sim_scale.py: before the full-test evaluation
    sampler.stop()
    full = load_site_file(scenario.data.path)  # type: ignore[union-attr]
    full_test = {k: float(v) for k, v in evaluate(result["model"], full.test, full.task).items()}
    return {
        "arm": "plain",
        "hospitals": len(hospitals),
        "rounds_completed": len(round_end),
        "sites_trained_per_round": trained,
        "wall_time_s": wall,
        "federated_time_s": federated,
        "round_end_s": round_end,
        "round_s": [b - a for a, b in zip([0.0, *round_end], round_end)],
        "peak_tree_rss_mb": sampler.peak_rss_kb / 1024,
        "peak_tree_pss_mb": sampler.peak_pss_kb / 1024,
        "final_model_full_test": full_test,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _run_arm(arm: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one arm in a subprocess (bounded); return its JSON."""
    common = ["--hospitals", str(args.hospitals), "--min-per-site", str(args.min_per_site)]
    if args.rounds is not None:
        common += ["--rounds", str(args.rounds)]
    if arm == "fedcare":
        argv = [sys.executable, str(HERE / "sim_scale.py"), *common, "--out", str(out)]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--arm", "plain", *common, "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False, cwd=ROOT)  # noqa: S603
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} arm failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    data["arm"], data["process_s"] = arm, time.perf_counter() - started
    return data


def _row(data: dict[str, Any]) -> dict[str, Any]:
    """Return the figures the table shows for one run."""
    later = data["round_s"][1:]
    return {
        "arm": data["arm"],
        "wall_s": data["wall_time_s"],
        "federated_s": data["federated_time_s"],
        "round1_s": data["round_s"][0] if data["round_s"] else None,
        "median_round_s": statistics.median(later) if later else None,
        "round_range_s": [min(later), max(later)] if later else None,
        "trained_round1": data["sites_trained_per_round"][0] if data["sites_trained_per_round"] else 0,
        "pss_mb": data["peak_tree_pss_mb"],
        "rss_mb": data["peak_tree_rss_mb"],
        "auroc": data["final_model_full_test"].get("auroc"),
        "load": [round(data["loadavg_before"][0], 1), round(data["loadavg_after"][0], 1)],
    }


def main(argv: list[str] | None = None) -> int:
    """Alternate the two arms; print the table and the ratios; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=["plain"], help="run one plain arm in this process (internal)")
    parser.add_argument("--hospitals", type=int, default=1000)
    parser.add_argument("--min-per-site", type=int, default=3)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--order", default="fedcare,plain,plain,fedcare", help="arms in the order they run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sim_vs_flower.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.arm == "plain":
        data = _plain_arm(args)
        data["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2))
        return 0
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sim-vs-flower-") as tmp:
        for i, arm in enumerate(args.order.split(",")):
            runs.append(_run_arm(arm.strip(), args, Path(tmp) / f"{i}-{arm}.json"))
            print(f"run {i + 1}: {json.dumps(_row(runs[-1]))}", flush=True)  # noqa: T201 - a benchmark script
    rows = [_row(r) for r in runs]

    def mean(arm: str, key: str) -> float:
        values = [r[key] for r in rows if r["arm"] == arm and r[key] is not None]
        return sum(values) / len(values)

    ratios = {key: mean("fedcare", key) / mean("plain", key)
              for key in ("wall_s", "federated_s", "median_round_s", "pss_mb")}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "hospitals": args.hospitals,
        "rows": rows,
        "ratios_fedcare_over_plain": ratios,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print("| arm | wall s | federated s | round 1 s | median round s (2–10) | trained in round 1 | peak PSS MB | "  # noqa: T201
          "AUROC | load |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['wall_s']:.1f} | {r['federated_s']:.1f} | {r['round1_s']:.1f} | "  # noqa: T201
              f"{r['median_round_s']:.2f} | {r['trained_round1']} | {r['pss_mb']:.0f} | {r['auroc']:.3f} | "
              f"{r['load'][0]} → {r['load'][1]} |")
    print("fedcare / plain (means): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
