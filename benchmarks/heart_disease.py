"""Heart disease, the 4 real hospitals: pooled vs local-only vs FedAvg, over seeds.

Runs ``simulations/scenarios/heart_disease.toml`` through the product's simulation path
(:func:`fedcare.simulations.runner.run_scenario`: Flower's simulation engine on Ray, the
fedcare ServerApp / ClientApp, baselines ``pooled`` and ``local`` from
``simulations.baselines``) once per seed and arm, then evaluates the federated final model on
the pooled test split of the four hospitals and on each hospital's test split (the baselines
report the same two views themselves). Prints a table and writes JSON.

Arms: ``nodp`` (the scenario as written, no DP, same for pooled / local / FedAvg) and ``dp``
(every arm under the same DP target, ``--dp-epsilon``; Opacus RDP accountant).

Usage::

    python benchmarks/heart_disease.py --seeds 0 1 2 3 4 --arms nodp dp \
        --out benchmarks/results/heart_disease.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcare.simulations.runner import build_hospitals, run_scenario
from fedcare.simulations.scenario import Scenario

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utility import _ms, evaluate_final  # noqa: E402 - the sibling benchmark's evaluation

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulations" / "scenarios" / "heart_disease.toml"
FLAMBY = {"pooled_accuracy": 0.774, "fedavg_accuracy": 0.748}
METRICS = ("accuracy", "auroc")


def scenario_for(seed: int, arm: str, dp_epsilon: float) -> Scenario:
    """Return the heart-disease scenario with ``seed`` and the arm's privacy settings."""
    raw = tomllib.loads(SCENARIO.read_text())
    raw["seed"] = seed
    raw["name"] = f"heart-disease-{arm}-s{seed}"
    if arm == "dp":
        raw["privacy"] = {"enabled": True, "target_epsilon": dp_epsilon, "delta": 1e-5, "max_grad_norm": 1.0}
        # DP arm: every site applies the node default policy (DP required, ε ≤ 3 per study), except
        # that it accepts plain rounds: the benchmark compares plain FedAvg (example-weighted mean)
        # with the published FLamby figures, which SecAgg+'s unweighted mean would change.
        raw["policy"] = {"require_secure_aggregation": False}
    return Scenario.model_validate(raw, context={"base_dir": SCENARIO.parent})


def one_run(seed: int, arm: str, dp_epsilon: float, work: Path) -> dict[str, Any]:
    """Run the scenario once; return pooled / local / FedAvg figures and timings."""
    scenario = scenario_for(seed, arm, dp_epsilon)
    out = work / scenario.name
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    summary = run_scenario(scenario, out)
    wall = time.perf_counter() - t0
    if summary.status != "completed":
        raise RuntimeError(f"{scenario.name}: {summary.status} ({summary.reason})")
    fed = evaluate_final(Path(summary.files["model"]), scenario)
    pooled, local = summary.baselines["pooled"], summary.baselines["local"]
    local_sites = local["sites"]
    return {
        "seed": seed,
        "arm": arm,
        "pooled": {"pooled_test": pooled["pooled_test"], "sites": pooled["sites"]},
        "local": {
            # each site's own model on its own test split, the unweighted mean over sites,
            # and each site's model on the pooled test split (and their unweighted mean)
            "sites": local_sites,
            "mean_own_test": {m: statistics.fmean(s[m] for s in local_sites.values()) for m in METRICS},
            "weighted_own_test": {m: local[m] for m in METRICS},
            "site_pooled_test": local["site_pooled_test"],
            "mean_pooled_test": {
                m: statistics.fmean(s[m] for s in local["site_pooled_test"].values()) for m in METRICS
            },
        },
        "fedavg": {**fed, "aggregated_federated_evaluation": summary.final_global},
        "privacy": {"federation": summary.privacy, "pooled": pooled["privacy"], "local": local["privacy"]},
        "wall_time_s": wall,
        "federated_time_s": summary.federated_time_s,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def standardisation_check(seeds: list[int]) -> dict[str, Any]:
    """Pooled baseline (non-DP, product trainer) on per-site vs globally standardised features.

    Per-site: the manifests as written (each hospital z-scores its numeric columns with its own
    training statistics). Global: the same manifests with ``standardize = false``, then the
    numeric columns z-scored with the pooled training split's statistics (what a single data
    owner would do; not available to a federation without sharing statistics).
    """
    from fedcare.client.loaders import load_site_file  # noqa: PLC0415
    from fedcare.client.training import TrainSettings  # noqa: PLC0415
    from fedcare.simulations.baselines import pooled_baseline  # noqa: PLC0415

    base = scenario_for(0, "nodp", 3.0)
    per_site = build_hospitals(base)
    with tempfile.TemporaryDirectory(prefix="fedcare-heart-raw-") as tmp:
        raw_sites = []
        for path in base.data.paths:  # type: ignore[union-attr]
            text = path.read_text().replace("standardize = true", "standardize = false")
            # data paths stay ${FEDCARE_DATA_ROOT}/…: the copy reads the same files
            (Path(tmp) / path.name).write_text(text)
            raw_sites.append(load_site_file(Path(tmp) / path.name))
    one_hot = [i for i, n in enumerate(raw_sites[0].feature_names or []) if n.startswith(("cp", "restecg"))]
    numeric = [i for i in range(raw_sites[0].input_shape[0]) if i not in one_hot]
    train_x = torch.cat([s.train.inputs[0] for s in raw_sites])
    mean, std = train_x[:, numeric].mean(0), train_x[:, numeric].std(0).clamp_min(1e-8)

    def z(split: Any) -> Any:
        x = split.inputs[0].clone()
        x[:, numeric] = (x[:, numeric] - mean) / std
        return dataclasses.replace(split, inputs=(x,))

    global_sites = [dataclasses.replace(s, train=z(s.train), val=z(s.val), test=z(s.test)) for s in raw_sites]
    out: dict[str, Any] = {"numeric_columns": numeric, "per_site": [], "global": []}
    for seed in seeds:
        train = TrainSettings(local_epochs=base.training.local_epochs, batch_size=base.training.batch_size,
                              lr=base.training.lr, seed=seed)
        for key, sites in (("per_site", per_site), ("global", global_sites)):
            res = pooled_baseline(sites, spec=base.model, train=train, privacy=base.privacy, rounds=base.rounds, seed=seed)
            out[key].append(res.pooled_test)
    return out


def table(runs: list[dict[str, Any]]) -> str:
    """Return the markdown table: arm × model, accuracy and AUROC (mean ± std over seeds)."""
    lines = [
        "| arm | model | accuracy, pooled test | AUROC, pooled test | seeds |",
        "|---|---|---|---|---|",
    ]
    for arm in sorted({r["arm"] for r in runs}, key=["nodp", "dp"].index):
        rs = [r for r in runs if r["arm"] == arm]
        rows = {
            "pooled": [r["pooled"]["pooled_test"] for r in rs],
            "local-only (mean of 4 site models)": [r["local"]["mean_pooled_test"] for r in rs],
            "FedAvg": [r["fedavg"]["pooled_test"] for r in rs],
        }
        for name, vals in rows.items():
            lines.append(f"| {arm} | {name} | {_ms([v['accuracy'] for v in vals])} | "
                         f"{_ms([v['auroc'] for v in vals])} | {len(vals)} |")
    lines += ["", "Per site (own test split), accuracy / AUROC, mean over seeds:", "",
              "| arm | site | n test | pooled model | its own local model | FedAvg |", "|---|---|---|---|---|---|"]
    for arm in sorted({r["arm"] for r in runs}, key=["nodp", "dp"].index):
        rs = [r for r in runs if r["arm"] == arm]
        for site in rs[0]["fedavg"]["sites"]:
            def cell(get: Any) -> str:
                a = float(np.mean([get(r)["accuracy"] for r in rs]))
                u = [x for x in (float(get(r)["auroc"]) for r in rs) if np.isfinite(x)]
                return f"{a:.3f} / {float(np.mean(u)):.3f}" if u else f"{a:.3f} / -"
            lines.append(
                f"| {arm} | {site} | {_n_test(rs[0], site)} | {cell(lambda r: r['pooled']['sites'][site])} | "
                f"{cell(lambda r: r['local']['sites'][site])} | {cell(lambda r: r['fedavg']['sites'][site])} |"
            )
        own = [r["local"]["mean_own_test"] for r in rs]
        lines.append(f"| {arm} | local-only, unweighted mean of sites on own test | | | "
                     f"{_ms([o['accuracy'] for o in own])} / {_ms([o['auroc'] for o in own])} | |")
    return "\n".join(lines)


def _n_test(run: dict[str, Any], site: str) -> str:
    return str(run.get("n_test", {}).get(site, ""))


def main(argv: list[str] | None = None) -> int:
    """Run the seeds × arms, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", choices=["nodp", "dp"], default=["nodp"])
    parser.add_argument("--dp-epsilon", type=float, default=3.0)
    parser.add_argument("--table-from", type=Path, help="only print the table of an earlier JSON")
    parser.add_argument("--std-check", action="store_true",
                        help="only compare per-site with global standardisation (pooled baseline)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heart_disease.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    if args.table_from:
        print(table(json.loads(args.table_from.read_text())["runs"]))
        return 0
    if args.std_check:
        res = standardisation_check(args.seeds)
        for key in ("per_site", "global"):
            print(f"| pooled, {key} standardisation | {_ms([r['accuracy'] for r in res[key]])} | "
                  f"{_ms([r['auroc'] for r in res[key]])} | {len(res[key])} |")
        args.out.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]), **res}, indent=2))
        print(f"written {args.out}")
        return 0
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    sizes = {s.name: len(s.test) for s in build_hospitals(scenario_for(0, "nodp", args.dp_epsilon))}
    with tempfile.TemporaryDirectory(prefix="fedcare-heart-") as tmp:
        for arm in args.arms:
            for seed in args.seeds:
                run = one_run(seed, arm, args.dp_epsilon, Path(tmp))
                run["n_test"] = sizes
                runs.append(run)
                print(f"{arm} seed {seed}: pooled {run['pooled']['pooled_test']['accuracy']:.3f}, "
                      f"FedAvg {run['fedavg']['pooled_test']['accuracy']:.3f}, "
                      f"wall {run['wall_time_s']:.1f} s, load {run['loadavg_after'][0]:.2f}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({  # after every run: partial results survive
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
                    "scenario": str(SCENARIO.relative_to(ROOT)),
                    "dp_epsilon": args.dp_epsilon, "dp_delta": 1e-5,
                    "flamby_reference": FLAMBY, "runs": runs,
                    "total_wall_s": time.perf_counter() - started,
                }, indent=2))
    print(table(runs))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
