"""Diabetes progression (regression), 4 hospitals: pooled vs FedAvg vs FedAvg + DP, without Ray.

The same arms as ``benchmarks/utility.py diabetes`` (scenario ``diabetes_progression.toml``:
linear regression, 20 rounds × 1 epoch, batch 16, lr 0.05; DP: ε = 8 at δ = 1e-5, clipping norm
1, each site's policy raised above the node default's caps as utility.py does), but the
federation runs through the product's ServerApp and ClientApp on the in-process Grid
(``simulations.inprocess.InProcessGrid``: the Flower message path without Ray), because on a
heavily loaded machine Ray's node start times out. The pooled arm is
``simulations.baselines.pooled_baseline``. Every model is scored by
``simulations.baselines.evaluate_centrally``: global MAE and R² over the 4 hospitals' test
patients together (exact), in units of the target's training standard deviation.

Usage::

    python benchmarks/diabetes_inprocess.py --seeds 0 1 2 3 4 --out benchmarks/results/diabetes_inprocess.json
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedcare.client.app import LocalSite, make_client_app
from fedcare.client.training import TrainSettings
from fedcare.privacy.policy import SitePolicy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import run_server
from fedcare.server.checkpoint import FINAL_MODEL_FILE, build_saved_model, load_model_file
from fedcare.simulations.baselines import evaluate_centrally, pooled_baseline
from fedcare.simulations.inprocess import InProcessGrid
from fedcare.simulations.runner import _site_policy, build_hospitals, run_config_for
from fedcare.simulations.scenario import Scenario, load_scenario

from seeded import mean_std, seeded_arguments, write_seeded_results

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulations" / "scenarios" / "diabetes_progression.toml"
DP = PrivacySettings(enabled=True, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)


def dp_policy(base: SitePolicy) -> SitePolicy:
    """Return the DP arm's site policy: DP required, caps raised to ε = 8 (as benchmarks/utility.py)."""
    return base.model_copy(update={"require_dp": True, "max_epsilon_per_study": 8.0, "max_epsilon_total": 8.0,
                                   "min_noise_multiplier": 0.0})


def federated(scenario: Scenario, privacy: PrivacySettings, policy: SitePolicy, work: Path) -> dict[str, Any]:
    """Run the scenario's federation in process; return the central evaluation and the sites' ε."""
    hospitals = build_hospitals(scenario)
    config = run_config_for(scenario, hospitals, work)
    local = [LocalSite(data=h, privacy=privacy, ledger_dir=work / "ledgers", name=h.name,
                       seed=scenario.seed * 1000 + i, policy=policy) for i, h in enumerate(hospitals)]
    app = make_client_app(lambda context: local[int(context.node_config["partition-id"])])
    history = run_server(InProcessGrid(app, num_nodes=len(local)), config)
    arrays, meta = load_model_file(work / "checkpoints" / FINAL_MODEL_FILE)
    central = evaluate_centrally(build_saved_model(arrays, meta), hospitals, seed=scenario.seed)
    eps = [m.get("epsilon") for m in history.completed[-1].site_train.values()]
    return {"global": central.metrics, "site_weighted_mean": central.site_weighted_mean,
            "intervals": central.intervals, "max_epsilon": max(e for e in eps if e is not None) if eps else None}


def main() -> int:
    """Run pooled, FedAvg and FedAvg + DP ε = 8 per seed; print and write the figures."""
    args = seeded_arguments(__doc__, ROOT / "benchmarks" / "results" / "diabetes_inprocess.json")
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    runs = []
    for seed in args.seeds:
        scenario = load_scenario(SCENARIO).model_copy(update={"seed": seed})
        t0 = time.perf_counter()
        hospitals = build_hospitals(scenario)
        train = TrainSettings(local_epochs=1, batch_size=16, lr=scenario.training.lr, seed=seed)
        pooled = pooled_baseline(hospitals, spec=scenario.model, train=train, privacy=PrivacySettings.disabled(),
                                 rounds=scenario.rounds, seed=seed)
        run: dict[str, Any] = {"seed": seed, "pooled": {"global": pooled.metrics, "site_weighted_mean": pooled.site_weighted_mean,
                                                        "intervals": pooled.intervals}}
        base = _site_policy(scenario)
        with tempfile.TemporaryDirectory(prefix="fedcare-diabetes-") as tmp:
            run["fedavg"] = federated(scenario, PrivacySettings.disabled(), base, Path(tmp) / "nodp")
            dp_scenario = scenario.model_copy(update={"privacy": DP})
            run["dp8"] = federated(dp_scenario, DP, dp_policy(base), Path(tmp) / "dp8")
        run["wall_s"] = time.perf_counter() - t0
        runs.append(run)
        print(seed, {arm: round(run[arm]["global"]["mae"], 4) for arm in ("pooled", "fedavg", "dp8")},
              {arm: round(run[arm]["global"]["r2"], 4) for arm in ("pooled", "fedavg", "dp8")}, flush=True)
    table = {}
    for arm in ("pooled", "fedavg", "dp8"):
        for metric in ("mae", "r2"):
            table[f"{arm}_{metric}"] = mean_std(r[arm]["global"][metric] for r in runs)
        if arm != "pooled":
            table[f"{arm}_mae_relative_gap"] = mean_std(r[arm]["global"]["mae"] / r["pooled"]["global"]["mae"] - 1
                                                        for r in runs)  # fmt: skip
    write_seeded_results(args.out, "diabetes_inprocess.py", args.seeds, runs, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
