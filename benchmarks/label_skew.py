"""Label skew (issue 14 item 2): server optimisers and local fine-tuning side by side on PneumoniaMNIST.

The scenario is ``simulations/scenarios/utility_pneumonia.toml`` unchanged (5 virtual hospitals by
Dirichlet α = 0.5, GroupNorm CNN width 8, 20 rounds × 1 epoch, batch 64, lr 0.2, no DP). Every
federated arm runs through the product's ServerApp and ClientApp on the in-process Grid
(``simulations.inprocess.InProcessGrid``: Flower's message path without Ray; the pattern of
``simulations/membership_audit.py``), with only the ``[strategy]`` table changed:

- ``fedavg``;
- ``fedavgm`` (server momentum β and server learning rate η_s);
- ``fedadam`` and ``fedyogi`` with a small grid of server η (and τ);
- FedAvg + local fine-tuning (personalisation): the final FedAvg model, copied to each site and
  trained ``k`` more local epochs on that site's training split with the scenario's batch size and
  learning rate, scored on that site's own test split. This is a **benchmark arm only**: it is not
  in the product. Non-DP here; under DP a site's fine-tuning would need no charge only if nothing
  derived from the fine-tuned model ever left the site (no metric, no model): that rule is not
  implemented anywhere, so the product does not offer the arm.

FedProx is not rerun (BENCHMARKS.md, PneumoniaMNIST table: measured by ``benchmarks/utility.py``);
its per-seed figures and the pooled model's are read from
``benchmarks/results/utility_pneumonia.json`` for the paired gaps.

Headline: the global model's AUROC on the pooled test set (the official 624 test images, each site's
share concatenated; threshold-free), mean ± std over seeds, paired by seed against FedAvg (rerun
here) and against the pooled model. For fine-tuning: per-site AUROC of the global model and of the
site's personalised model on that site's test split (sites whose test split holds one class have
no AUROC), and the "personalised pooled" AUROC (every test image scored by its own site's
personalised model, concatenated).

Tuning: the grid runs on the tuning seeds (default 0 and 1); the best setting of each server
optimiser (mean pooled-test AUROC over the tuning seeds) then runs on the report seeds (default 2,
3, 4) with FedAvg. The data are the benchmark's own, so the tuning-seed figures are optimistic;
the report-seed figures are not tuned on. Results are written after every run.

Usage::

    python benchmarks/label_skew.py --tune-seeds 0 1 --report-seeds 2 3 4 --budget-min 40
    python benchmarks/label_skew.py ... --resume     # keep the runs in --out, run the missing ones

Needs ``FEDCARE_DATA_ROOT`` (the folder holding ``medmnist/pneumoniamnist_28.npz``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fedcare.client.app import LocalSite, make_client_app
from fedcare.client.dataset import SiteData, Split
from fedcare.client.metrics import evaluate, predict
from fedcare.client.training import TrainSettings, train_local
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import run_server
from fedcare.server.checkpoint import FINAL_MODEL_FILE, build_saved_model, load_model_file
from fedcare.server.config import RunConfig
from fedcare.simulations.baselines import pool_sites
from fedcare.simulations.inprocess import InProcessGrid
from fedcare.simulations.runner import _site_policy, build_hospitals, run_config_for
from fedcare.simulations.scenario import Scenario, load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulations" / "scenarios" / "utility_pneumonia.toml"
UTILITY = ROOT / "benchmarks" / "results" / "utility_pneumonia.json"
OUT = ROOT / "benchmarks" / "results" / "label_skew_pneumonia.json"

#: arm name -> (strategy, run-config parameters); FedAvg first (every arm is paired with it)
GRID: dict[str, tuple[str, dict[str, float]]] = {
    "fedavg": ("fedavg", {}),
    "fedavgm b0.9 lr1": ("fedavgm", {"server-momentum": 0.9, "server-learning-rate": 1.0}),
    "fedavgm b0.7 lr1": ("fedavgm", {"server-momentum": 0.7, "server-learning-rate": 1.0}),
    "fedavgm b0.5 lr1": ("fedavgm", {"server-momentum": 0.5, "server-learning-rate": 1.0}),
    "fedavgm b0.9 lr0.5": ("fedavgm", {"server-momentum": 0.9, "server-learning-rate": 0.5}),
    **{f"{name} eta{eta:g} tau{tau:g}": (name, {"eta": eta, "tau": tau})
       for name in ("fedadam", "fedyogi") for tau in (1e-3, 1e-2) for eta in (0.1, 0.03, 0.01)},
    **{f"fedadagrad eta{eta:g} tau0.001": ("fedadagrad", {"eta": eta, "tau": 1e-3}) for eta in (0.1, 0.03, 0.01)},
}
#: the grid the tuning seeds run first (the τ = 0.01 variants run after the report seeds, budget permitting)
CORE: tuple[str, ...] = (
    "fedavg", "fedavgm b0.9 lr1", "fedavgm b0.7 lr1",
    *(f"{name} eta{eta:g} tau0.001" for name in ("fedadam", "fedyogi") for eta in (0.1, 0.03, 0.01)),
)
#: arms every seed runs whatever the tuning picks (FedAvg; FedAvgM at the field's usual β = 0.9, η_s = 1)
ALWAYS: tuple[str, ...] = ("fedavg", "fedavgm b0.9 lr1")
FINE_TUNE_EPOCHS: tuple[int, ...] = (1, 5)

logger = logging.getLogger("label_skew")


def scores(model: nn.Module, split: Split) -> np.ndarray:
    """Return the binary model's probabilities of the positive class on ``split``."""
    return torch.sigmoid(predict(model, split).double()).numpy().reshape(-1)


def auroc(model: nn.Module, split: Split) -> float:
    """Return the model's AUROC on ``split`` (NaN when the split holds one class)."""
    return float(evaluate(model, split, "binary")["auroc"])


def federate(scenario: Scenario, hospitals: list[SiteData], strategy: str, params: dict[str, float],
             work: Path) -> tuple[nn.Module, float]:
    """Run the scenario's federation with ``strategy`` in process; return the final model and the wall time."""
    base = run_config_for(scenario, hospitals, work)
    config = RunConfig.from_run_config({**base.to_run_config(), "strategy": strategy, **params})
    policy = _site_policy(scenario)
    local = [LocalSite(data=h, privacy=PrivacySettings.disabled(), ledger_dir=work / "ledgers", name=h.name,
                       seed=scenario.seed * 1000 + i, policy=policy) for i, h in enumerate(hospitals)]
    app = make_client_app(lambda context: local[int(context.node_config["partition-id"])])
    t0 = time.perf_counter()
    run_server(InProcessGrid(app, num_nodes=len(local)), config)
    wall = time.perf_counter() - t0
    arrays, meta = load_model_file(work / "checkpoints" / FINAL_MODEL_FILE)
    return build_saved_model(arrays, meta), wall


def fine_tune(model: nn.Module, hospitals: list[SiteData], pooled_test_y: np.ndarray, *, epochs: int,
              scenario: Scenario) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` at each site for ``epochs`` local epochs; score it on that site's test split.

    Benchmark arm only, without DP: nothing here is charged to a ledger (``ledger=None``), which is
    honest only because the personalised model and its scores stay in this process.
    """
    out: dict[str, Any] = {"sites_global": {}, "sites_personalised": {}}
    concatenated = []
    for i, site in enumerate(hospitals):
        tuned = copy.deepcopy(model)
        settings = TrainSettings(local_epochs=epochs, batch_size=scenario.training.batch_size,
                                 lr=scenario.training.lr, seed=scenario.seed * 1000 + 500 + i, device="cpu")
        train_local(tuned, site, train=settings, privacy=PrivacySettings.disabled(), ledger=None,
                    planned_rounds=1, round_index=1)
        out["sites_global"][site.name] = auroc(model, site.test)
        out["sites_personalised"][site.name] = auroc(tuned, site.test)
        concatenated.append(scores(tuned, site.test))
    out["personalised_pooled_auroc"] = float(roc_auc_score(pooled_test_y, np.concatenate(concatenated)))
    finite = [(out["sites_global"][s], out["sites_personalised"][s]) for s in out["sites_global"]
              if np.isfinite(out["sites_global"][s]) and np.isfinite(out["sites_personalised"][s])]
    out["mean_site_auroc_global"] = statistics.fmean(g for g, _ in finite) if finite else float("nan")
    out["mean_site_auroc_personalised"] = statistics.fmean(p for _, p in finite) if finite else float("nan")
    out["sites_with_auroc"] = len(finite)
    return out


def mean_std(values: Sequence[float]) -> list[float]:
    """Return ``[mean, sample std]`` (std 0.0 for one value)."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def previous(arm: str) -> dict[int, float]:
    """Return per-seed pooled-test AUROC of ``arm`` ("pooled", "reference" = FedAvg, "fedprox") from utility.py."""
    data = json.loads(UTILITY.read_text())
    out: dict[int, float] = {}
    for run in data["runs"]:
        if arm == "pooled" and run.get("arm") == "reference":
            out[run["seed"]] = run["pooled"]["pooled_test"]["auroc"]
        elif run.get("arm") == arm:
            out[run["seed"]] = run["federated"]["pooled_test"]["auroc"]
    return out


def summarise(runs: list[dict[str, Any]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Return one table row per arm over ``seeds``: AUROC mean ± std, paired gaps to FedAvg and pooled, wall time."""
    pooled = previous("pooled")
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if run["seed"] in seeds:
            by_arm.setdefault(run["arm"], {})[run["seed"]] = run
    fedavg = by_arm.get("fedavg", {})
    rows = []
    for arm, per_seed in by_arm.items():
        got = sorted(per_seed)
        values = [per_seed[s]["auroc"] for s in got]
        row: dict[str, Any] = {"arm": arm, "seeds": got, "auroc": mean_std(values),
                               "per_seed": values, "wall_s": mean_std([per_seed[s]["wall_s"] for s in got])}
        paired = [s for s in got if s in fedavg]
        if arm != "fedavg" and paired:
            row["minus_fedavg"] = mean_std([per_seed[s]["auroc"] - fedavg[s]["auroc"] for s in paired])
        with_pooled = [s for s in got if s in pooled]
        if with_pooled:
            row["minus_pooled"] = mean_std([per_seed[s]["auroc"] - pooled[s] for s in with_pooled])
        rows.append(row)
    for label, source in (("fedprox (utility.py, not rerun)", previous("fedprox")),
                          ("fedavg (utility.py, Ray)", previous("reference")), ("pooled (utility.py)", pooled)):
        got = [s for s in seeds if s in source]
        if got:
            row = {"arm": label, "seeds": got, "auroc": mean_std([source[s] for s in got]),
                   "per_seed": [source[s] for s in got]}
            paired = [s for s in got if s in fedavg]
            if paired and label.startswith("fedprox"):
                row["minus_fedavg"] = mean_std([source[s] - fedavg[s]["auroc"] for s in paired])
            if not label.startswith("pooled"):
                row["minus_pooled"] = mean_std([source[s] - pooled[s] for s in got if s in pooled])
            rows.append(row)
    return rows


def fine_tune_rows(runs: list[dict[str, Any]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Return the fine-tuning rows over ``seeds``: global vs personalised, per-site mean and personalised pooled."""
    rows = []
    for run in runs:
        if run["seed"] not in seeds or "fine_tune" not in run:
            continue
        for epochs, ft in run["fine_tune"].items():
            rows.append({"base": run["arm"], "seed": run["seed"], "epochs": int(epochs), "global_pooled_auroc": run["auroc"],
                         **{k: v for k, v in ft.items() if k not in ("sites_global", "sites_personalised")}})
    out = []
    for base in sorted({r["base"] for r in rows}):
        for epochs in sorted({r["epochs"] for r in rows if r["base"] == base}):
            sel = [r for r in rows if r["base"] == base and r["epochs"] == epochs]
            out.append({
                "base": base, "epochs": epochs, "seeds": [r["seed"] for r in sel],
                "global_pooled_auroc": mean_std([r["global_pooled_auroc"] for r in sel]),
                "personalised_pooled_auroc": mean_std([r["personalised_pooled_auroc"] for r in sel]),
                "personalised_minus_global_pooled": mean_std([r["personalised_pooled_auroc"] - r["global_pooled_auroc"]
                                                             for r in sel]),
                "mean_site_auroc_global": mean_std([r["mean_site_auroc_global"] for r in sel]),
                "mean_site_auroc_personalised": mean_std([r["mean_site_auroc_personalised"] for r in sel]),
                "site_gain": mean_std([r["mean_site_auroc_personalised"] - r["mean_site_auroc_global"] for r in sel]),
                "sites_with_auroc": [r["sites_with_auroc"] for r in sel],
            })
    return out


def fmt(ms: list[float] | None) -> str:
    """Return ``mean ± std`` with three decimals (blank when absent)."""
    return "" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print one markdown table of ``rows`` (stdout: a benchmark's report)."""
    print(f"\n{title}\n| arm | pooled-test AUROC | − FedAvg, paired | − pooled, paired | wall s / run | seeds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {fmt(r['auroc'])} | {fmt(r.get('minus_fedavg'))} | {fmt(r.get('minus_pooled'))} | "
              f"{fmt(r.get('wall_s')).replace('.000', '')} | {len(r['seeds'])} |")


def main() -> int:
    """Run the grid on the tuning seeds, the best of each optimiser on the report seeds; write JSON after each run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--report-seeds", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--arms", nargs="*", default=list(CORE), help="grid arms the tuning seeds run first")
    parser.add_argument("--budget-min", type=float, default=40.0,
                        help="start no new federated run after this many minutes (the grid is cut, not overrun)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out and run only the missing (seed, arm) pairs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # flwr's own handler prints every round at INFO
    torch.set_num_threads(1)
    start = time.perf_counter()
    result: dict[str, Any] = {"command": "python " + " ".join(["benchmarks/label_skew.py", *sys.argv[1:]]),
                              "scenario": str(SCENARIO.relative_to(ROOT)), "grid": GRID,
                              "tune_seeds": args.tune_seeds, "report_seeds": args.report_seeds,
                              "loadavg_start": list(os.getloadavg()), "runs": [], "cut": []}
    if args.resume and args.out.exists():
        earlier = json.loads(args.out.read_text())
        result["runs"] = earlier["runs"]
        result["resumed_from"] = {"command": earlier["command"], "wall_total_s": earlier.get("wall_total_s"),
                                  "loadavg_start": earlier.get("loadavg_start")}

    def save() -> None:
        """Write the results so far (partial results survive an interrupted run)."""
        result["wall_total_s"] = time.perf_counter() - start
        result["loadavg_now"] = list(os.getloadavg())
        result["tuning"] = summarise(result["runs"], args.tune_seeds)
        result["report"] = summarise(result["runs"], args.report_seeds)
        result["fine_tune_tuning"] = fine_tune_rows(result["runs"], args.tune_seeds)
        result["fine_tune_report"] = fine_tune_rows(result["runs"], args.report_seeds)
        args.out.write_text(json.dumps(result, indent=2))

    def run_arms(seed: int, arms: list[str]) -> None:
        """Run ``arms`` for ``seed`` (FedAvg fine-tuned too), within the budget."""
        scenario = load_scenario(SCENARIO).model_copy(update={"seed": seed})
        hospitals = build_hospitals(scenario)
        y = pool_sites(hospitals).test.targets.numpy().astype(np.int64)
        for arm in arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in result["runs"]):
                continue  # kept from the run resumed (--resume)
            if time.perf_counter() - start > args.budget_min * 60:
                result["cut"].append({"seed": seed, "arm": arm})
                print(f"budget spent: seed {seed} {arm} not run", flush=True)
                continue
            strategy, params = GRID[arm]
            with tempfile.TemporaryDirectory(prefix="fedcare-labelskew-") as tmp:
                model, wall = federate(scenario, hospitals, strategy, params, Path(tmp))
            run: dict[str, Any] = {"seed": seed, "arm": arm, "strategy": strategy, "params": params, "wall_s": wall,
                                   "auroc": auroc(model, pool_sites(hospitals).test), "loadavg": list(os.getloadavg())}
            if arm == "fedavg":
                run["fine_tune"] = {str(k): fine_tune(model, hospitals, y, epochs=k, scenario=scenario)
                                    for k in FINE_TUNE_EPOCHS}
            result["runs"].append(run)
            save()
            extra = "" if "fine_tune" not in run else " fine-tuned pooled " + " / ".join(
                f"{k} ep {v['personalised_pooled_auroc']:.3f}" for k, v in run["fine_tune"].items())
            print(f"seed {seed} {arm}: AUROC {run['auroc']:.3f} ({wall:.0f} s, load {os.getloadavg()[0]:.1f}){extra}",
                  flush=True)

    for seed in args.tune_seeds:
        run_arms(seed, [a for a in GRID if a in args.arms])
    best: dict[str, str] = {}
    for row in summarise(result["runs"], args.tune_seeds):
        if row["arm"] not in GRID or len(row["seeds"]) < len(args.tune_seeds):
            continue
        family = GRID[row["arm"]][0]
        if family != "fedavg" and (family not in best or row["auroc"][0] > _mean(result, best[family], args.tune_seeds)):
            best[family] = row["arm"]
    result["selected"] = best
    first = [*ALWAYS, *(a for a in best.values() if a not in ALWAYS)]
    for seed in args.report_seeds:
        run_arms(seed, first)
    # every other arm on every seed, while the budget lasts: the tuning grid first, then FedAdagrad, then the rest
    order = list(GRID)
    rest = sorted((a for a in GRID if a not in first),
                  key=lambda a: (a not in CORE, GRID[a][0] != "fedadagrad", order.index(a)))
    for arm in rest:
        for seed in [*args.tune_seeds, *args.report_seeds]:
            run_arms(seed, [arm])
    save()
    print_table(f"tuning seeds {args.tune_seeds} (tuned on: optimistic)", result["tuning"])
    print_table(f"report seeds {args.report_seeds} (selected on the tuning seeds)", result["report"])
    print(json.dumps({"selected": best, "fine_tune_tuning": result["fine_tune_tuning"],
                      "fine_tune_report": result["fine_tune_report"]}, indent=2))
    print(f"total {result['wall_total_s'] / 60:.1f} min, load {result['loadavg_start']} -> {result['loadavg_now']}")
    return 0


def _mean(result: dict[str, Any], arm: str, seeds: Sequence[int]) -> float:
    """Return ``arm``'s mean pooled-test AUROC over ``seeds``."""
    return statistics.fmean(r["auroc"] for r in result["runs"] if r["arm"] == arm and r["seed"] in seeds)


if __name__ == "__main__":
    raise SystemExit(main())
