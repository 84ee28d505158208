"""SecAgg+ overhead: round time with and without secure aggregation, 10 simulated sites, small CNN.

Runs two scenarios back to back in one process on Flower's simulation engine (Ray), identical
except for ``[secure_aggregation]`` (+ ``[client_dp]``): BreastMNIST (``simulations/sites/breastmnist.toml``,
546 training images) split IID into 10 hospitals, the ``cnn`` family (width 16), FedAvg, every
site sampled every round, federated evaluation on. Sample-level DP-SGD is off in both, so the
difference is the protocol's own cost (4 message stages instead of 1, key agreement, Shamir
shares, masking, quantisation) rather than being diluted by DP-SGD's slower steps.

Round time is the time between consecutive ``on_round`` callbacks (round 1 also holds Ray
start-up, so it is reported apart and left out of the median). For the secure run, the time of
each SecAgg+ stage in the last round is reported too (from the history's ``secagg-*-s``).

Usage::

    python benchmarks/secagg_overhead.py --rounds 4 --out benchmarks/results/secagg_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedcare.simulations.runner import run_scenario
from fedcare.simulations.scenario import Scenario

logger = logging.getLogger("secagg_overhead")

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "simulations" / "sites" / "breastmnist.toml"


def scenario(*, secure: bool, rounds: int, sites: int) -> Scenario:
    """Return the benchmark scenario, with or without SecAgg+ (+ client-level DP)."""
    raw: dict[str, Any] = {
        "name": f"secagg-overhead-{'secure' if secure else 'plain'}",
        "rounds": rounds,
        "seed": 0,
        "data": {"kind": "manifest", "path": str(MANIFEST)},
        "partition": {"hospitals": sites, "kind": "iid", "min_per_site": 20},
        "model": {"family": "cnn", "width": 16},
        "strategy": {"name": "fedavg"},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
        "privacy": {"enabled": False},
        # the plain arm needs a policy that accepts plain rounds (the node default requires SecAgg+)
        "policy": {"require_dp": False, "require_secure_aggregation": secure},
        "simulation": {"num_cpus": 2, "client_num_cpus": 1, "round_timeout_s": 300},
    }
    if secure:
        raw["secure_aggregation"] = {"enabled": True, "num_shares": 1.0, "reconstruction_threshold": 0.67}
        raw["client_dp"] = {"clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    return Scenario.model_validate(raw)


def run_one(*, secure: bool, rounds: int, sites: int, out: Path) -> dict[str, Any]:
    """Run one scenario; return its round times and final metrics."""
    marks: list[float] = []
    started = time.perf_counter()
    summary = run_scenario(scenario(secure=secure, rounds=rounds, sites=sites), out,
                           on_round=lambda _r: marks.append(time.perf_counter()))
    rounds_s = [b - a for a, b in zip([started, *marks[:-1]], marks, strict=True)]
    last = summary.rounds[-1]["train"] if summary.rounds else {}
    return {
        "secure": secure,
        "status": summary.status,
        "round_s": rounds_s,
        "round1_s_incl_ray_start": rounds_s[0] if rounds_s else None,
        "median_round_s_excl_round1": statistics.median(rounds_s[1:]) if len(rounds_s) > 1 else None,
        "federated_time_s": summary.federated_time_s,
        "final_global": summary.final_global,
        "secagg_stages_last_round_s": {k: v for k, v in last.items() if k.startswith("secagg-")},
        "client_epsilon": (summary.secure_aggregation or {}).get("client_epsilon"),
    }


def main() -> None:
    """Run both variants, print a table and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secagg_overhead.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for secure in (False, True):
            results["secure" if secure else "plain"] = run_one(
                secure=secure, rounds=args.rounds, sites=args.sites, out=Path(tmp) / str(secure)
            )
    load_after = os.getloadavg()
    plain, secure = results["plain"], results["secure"]
    ratio = None
    if plain["median_round_s_excl_round1"] and secure["median_round_s_excl_round1"]:
        ratio = secure["median_round_s_excl_round1"] / plain["median_round_s_excl_round1"]
    doc = {
        "benchmark": "secagg_overhead",
        "sites": args.sites,
        "rounds": args.rounds,
        "data": "BreastMNIST 28x28, IID into sites",
        "model": "cnn width 16",
        "sample_level_dp": False,
        "results": results,
        "secure_over_plain_median_round": ratio,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "command": f"python benchmarks/secagg_overhead.py --rounds {args.rounds} --sites {args.sites}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    print(f"{'variant':<8} {'round 1 s':>10} {'median round s (2..)':>21} {'federated s':>12} {'auroc':>7}")
    for name, r in results.items():
        print(f"{name:<8} {r['round1_s_incl_ray_start']:>10.2f} {r['median_round_s_excl_round1']:>21.2f} "
              f"{r['federated_time_s']:>12.2f} {r['final_global'].get('auroc') or float('nan'):>7.3f}")
    print(f"secure / plain (median round): {ratio if ratio is None else round(ratio, 2)}x; SecAgg+ stages: "
          f"{secure['secagg_stages_last_round_s']}")
    print(f"load average before {load_before}, after {load_after}; wrote {args.out}")


if __name__ == "__main__":
    main()
