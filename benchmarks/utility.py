"""Utility on real hospital data: pooled vs each site alone vs FedAvg / FedProx / FedAvg with DP.

One question: how close does a federation come to a model trained on pooled data, and what does
sample-level DP cost in accuracy? Four real data sets, one scenario each (every arm uses the
scenario's model, training settings, rounds and seed, so the same budget of epochs):

- ``heart``: the 4 UCI heart-disease hospitals, logistic regression, accuracy and AUROC
  (``simulations/scenarios/heart_disease.toml``; FLamby reference pooled 0.774, FedAvg 0.748);
- ``physionet``: PhysioNet 2012 set A by ICU type (4 sites), ClinicalLSTM, AUROC and AUPRC;
- ``pneumonia``: PneumoniaMNIST in 5 sites by Dirichlet α = 0.5, CNN, AUROC and accuracy
  (MedMNIST v2 reference, ResNet-18 at 28 px, pooled: AUC 0.944, ACC 0.854);
- ``mitbih``: MIT-BIH, 12 patients grouped into 4 sites, one held-out patient per site for test,
  ClinicalLSTM on beat windows, PVC AUROC and AUPRC;
- ``text``: Medical Abstracts (clinical free text, 5 classes) in 4 sites by Dirichlet α = 0.5,
  hashed tokens -> bag of embeddings (``text_bag``), macro-F1 (scikit-learn, added by this
  script: it is not one of the product's metrics) and accuracy.

Arms (``--arms``), each run through the product's simulation path
(:func:`fedcare.simulations.runner.run_scenario`: Flower's simulation engine on Ray, the fedcare
ServerApp / ClientApp):

- ``reference``: the scenario as written (FedAvg, no DP) with the ``pooled`` and ``local``
  baselines of :mod:`fedcare.simulations.baselines` (same model, same epochs, same seed);
- ``fedprox``: FedProx (``--mu``), no DP;
- ``dp1``, ``dp3``, ``dp8``: FedAvg with sample-level DP-SGD (Opacus, RDP accountant) at
  ε = 1, 3, 8 over the whole study, δ = 1e-5, clipping norm 1.

Every federated model is evaluated on the pooled test split of all sites (for ``mitbih``: the 4
held-out patients). Prints a table (mean ± sample std over seeds, gap to pooled) and writes JSON
after every run, so partial results survive.

Usage::

    python benchmarks/utility.py heart --seeds 0 1 2 3 4 --out benchmarks/results/utility_heart.json
    python benchmarks/utility.py heart --table-from benchmarks/results/utility_heart.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score

import fedcare.simulations.baselines as baselines_module
from fedcare.client.dataset import Split
from fedcare.client.metrics import evaluate as product_evaluate
from fedcare.client.metrics import predict
from fedcare.models import Task
from fedcare.server.checkpoint import build_saved_model, load_model_file
from fedcare.simulations.baselines import pool_sites
from fedcare.simulations.overrides import apply_overrides
from fedcare.simulations.runner import build_hospitals, run_scenario
from fedcare.simulations.scenario import Scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "simulations" / "scenarios"
ARMS = ("reference", "fedprox", "dp1", "dp3", "dp8")
DP_EPSILON = {"dp1": 1.0, "dp3": 3.0, "dp8": 8.0}
DELTA = 1e-5


@dataclass(frozen=True)
class Dataset:
    """One benchmark data set: its scenario, metrics (headline first) and published reference."""

    scenario: Path
    metrics: tuple[str, str]
    mu: float
    reference: dict[str, float]
    note: str
    stored_threshold: bool = False
    """Score the federated model at the operating threshold its model file stores (else 0.5)."""
    dp_recipe: bool = False
    """The scenario is a DP recipe (DP on, no baselines): only the DP arms (``dp1``, ``dp3``, ``dp8``) apply."""


DATASETS = {
    "heart": Dataset(SCENARIOS / "heart_disease.toml", ("accuracy", "auroc"), 0.01,
                     {"FLamby pooled accuracy": 0.774, "FLamby FedAvg accuracy": 0.748,
                      "FLamby FedProx accuracy": 0.748},
                     "FLamby's figures use its own split; ours is 15 % of each hospital"),
    "physionet": Dataset(SCENARIOS / "utility_physionet.toml", ("auroc", "auprc"), 0.01, {}, ""),
    "pneumonia": Dataset(SCENARIOS / "utility_pneumonia.toml", ("auroc", "accuracy"), 0.01,
                         {"MedMNIST v2 ResNet-18 (28 px) pooled AUC": 0.944,
                          "MedMNIST v2 ResNet-18 (28 px) pooled ACC": 0.854},
                         "reference is a ResNet-18 on the official train set; ours a small CNN"),
    "pneumonia-dp": Dataset(SCENARIOS / "pneumonia_dp.toml", ("auroc", "balanced_accuracy"), 0.01, {},
                            "the DP recipe (scatternet, batch 512, lr 1); DP arms only; balanced "
                            "accuracy at the threshold stored in the model file", stored_threshold=True,
                            dp_recipe=True),
    "physionet-dp": Dataset(SCENARIOS / "physionet_dp.toml", ("auroc", "auprc"), 0.01, {},
                            "the DP recipe (20 rounds); DP arms only", dp_recipe=True),
    "mitbih": Dataset(SCENARIOS / "utility_mitbih.toml", ("auroc", "auprc"), 0.01, {},
                      "test = 4 held-out patients (119, 200, 105, 104)"),
    "diabetes": Dataset(SCENARIOS / "diabetes_progression.toml", ("mae", "r2"), 0.01, {},
                        "scikit-learn's diabetes data (442 patients) IID in 4 hospitals; MAE in units "
                        "of the target's training standard deviation; goal: FedAvg within 2 % of "
                        "pooled MAE, DP ε = 8 within 10 %"),
    "text": Dataset(SCENARIOS / "medical_text.toml", ("macro_f1", "accuracy"), 0.01, {},
                    "Medical Abstracts test split used as the whole data set (2,888 texts), own "
                    "70/15/15 split; macro-F1 over the 5 classes"),
}


def evaluate(model: torch.nn.Module, split: Split, task: Task, *, threshold: float = 0.5) -> dict[str, float]:
    """Return the product's metrics plus macro-F1 (scikit-learn) for multiclass tasks.

    The product's metric set is fixed (client/metrics.py; the DP evaluation release noises the
    same keys), so this benchmark adds macro-F1 to the evaluations it makes, and (below) to the
    pooled / site-alone baselines that ``run_scenario`` computes in this process.
    """
    out = product_evaluate(model, split, task, threshold=threshold)
    if task == "multiclass" and len(split):
        pred = predict(model, split).argmax(dim=1).numpy()
        y = split.targets.numpy()
        out["macro_f1"] = float(f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0))
    return out


baselines_module.evaluate = evaluate  # the baselines' evaluations get macro-F1 too (this process only)


def scenario_for(dataset: Dataset, seed: int, arm: str, *, mu: float, rounds: int | None = None,
                 overrides: tuple[str, ...] = ()) -> Scenario:  # fmt: skip
    """Return the data set's scenario for ``seed`` and ``arm`` (``rounds``: override the scenario's).

    ``overrides`` (``KEY=VALUE``, as ``fedcare simulate --set``) are applied to every arm first.
    """
    raw = tomllib.loads(dataset.scenario.read_text())
    if overrides:
        base = Scenario.model_validate(raw, context={"base_dir": dataset.scenario.parent})
        raw = apply_overrides(base, overrides).model_dump(exclude_unset=True, mode="json")
    raw["seed"] = seed
    if rounds is not None:
        raw["rounds"] = rounds
    raw["name"] = f"{raw['name']}-{arm}-s{seed}"
    if arm != "reference":
        raw["baselines"] = []
    if arm == "fedprox":
        raw["strategy"] = {"name": "fedprox", "proximal-mu": mu}
    elif arm in DP_EPSILON:
        eps = DP_EPSILON[arm]
        raw["privacy"] = {"enabled": True, "target_epsilon": eps, "delta": DELTA, "max_grad_norm": 1.0}
        # Every site's policy for the DP arms: DP required (the node default) and plain rounds
        # accepted (FedAvg's example-weighted mean, as in the other arms; SecAgg+ averages
        # unweighted). The ε = 8 arm is above the node default's caps (ε ≤ 3 per study, σ ≥ 0.5):
        # a site would have to raise them in its own policy file, as this benchmark does.
        policy = {k: v for k, v in raw.get("policy", {}).items() if k != "require_dp"}
        policy.update(require_secure_aggregation=False, max_epsilon_per_study=max(3.0, eps),
                      max_epsilon_total=max(6.0, eps), min_noise_multiplier=0.0 if eps > 3 else 0.5)
        raw["policy"] = policy
    return Scenario.model_validate(raw, context={"base_dir": dataset.scenario.parent})


def evaluate_final(model_path: Path, scenario: Scenario, *, stored_threshold: bool = False) -> dict[str, Any]:
    """Evaluate the federated final model on the pooled test split and on each site's test split.

    ``stored_threshold``: binary metrics at the operating threshold the model file stores (chosen
    on the sites' validation histograms), else at 0.5.
    """
    arrays, meta = load_model_file(model_path)
    sites = build_hospitals(scenario)
    model = build_saved_model(arrays, meta)
    pooled = pool_sites(sites)
    stored = meta.get("threshold")
    threshold = float(stored) if stored_threshold and stored is not None else 0.5
    return {
        "threshold": threshold,
        "pooled_test": {k: float(v) for k, v in evaluate(model, pooled.test, pooled.task, threshold=threshold).items()},
        "sites": {s.name: {k: float(v) for k, v in evaluate(model, s.test, s.task, threshold=threshold).items()}
                  for s in sites},
    }


def one_run(dataset: Dataset, seed: int, arm: str, work: Path, *, mu: float,
            rounds: int | None = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """Run one arm for one seed; return its figures and timings."""
    scenario = scenario_for(dataset, seed, arm, mu=mu, rounds=rounds, overrides=overrides)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    summary = run_scenario(scenario, work / scenario.name)
    wall = time.perf_counter() - t0
    if summary.status != "completed":
        raise RuntimeError(f"{scenario.name}: {summary.status} ({summary.reason})")
    run: dict[str, Any] = {
        "seed": seed,
        "arm": arm,
        "federated": evaluate_final(Path(summary.files["model"]), scenario, stored_threshold=dataset.stored_threshold),
        "privacy": summary.privacy,
        "wall_time_s": wall,
        "federated_time_s": summary.federated_time_s,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    if arm == "reference":
        pooled, local = summary.baselines["pooled"], summary.baselines["local"]
        site_models = local["site_pooled_test"]
        run["pooled"] = {"pooled_test": pooled["pooled_test"], "sites": pooled["sites"]}
        run["local"] = {
            "sites": local["sites"],  # each site's model on its own test split
            "site_pooled_test": site_models,  # each site's model on the pooled test split
            "mean_pooled_test": {m: statistics.fmean(s[m] for s in site_models.values())
                                 for m in next(iter(site_models.values()))},
        }
    return run


def _ms(values: list[float]) -> str:
    """Format mean ± sample std (± 0 for one value); '-' when nothing is finite."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return "-"
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return f"{float(arr.mean()):.3f} ± {sd:.3f}"


ROW_NAMES = {"fedprox": "FedProx", "dp1": "FedAvg + DP ε = 1", "dp3": "FedAvg + DP ε = 3", "dp8": "FedAvg + DP ε = 8"}


def rows(runs: list[dict[str, Any]]) -> list[tuple[str, dict[int, dict[str, float]]]]:
    """Return (model name, {seed: metrics on the pooled test split}) for every model trained."""
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in ARMS}
    out: list[tuple[str, dict[int, dict[str, float]]]] = []
    ref = by_arm["reference"]
    if ref:
        out.append(("pooled", {r["seed"]: r["pooled"]["pooled_test"] for r in ref}))
        for site in ref[0]["local"]["site_pooled_test"]:
            out.append((f"{site} alone", {r["seed"]: r["local"]["site_pooled_test"][site] for r in ref}))
        out.append(("local-only, mean of the site models", {r["seed"]: r["local"]["mean_pooled_test"] for r in ref}))
        out.append(("FedAvg", {r["seed"]: r["federated"]["pooled_test"] for r in ref}))
    for arm, name in ROW_NAMES.items():
        if by_arm[arm]:
            out.append((name, {r["seed"]: r["federated"]["pooled_test"] for r in by_arm[arm]}))
    return out


def paired_gap(model: dict[int, dict[str, float]], pooled: dict[int, dict[str, float]], metric: str) -> list[float]:
    """Return the model's metric minus the pooled model's, seed by seed (seeds both have)."""
    return [float(model[s][metric]) - float(pooled[s][metric]) for s in sorted(model) if s in pooled]


def max_epsilon(runs: list[dict[str, Any]], arm: str) -> float | None:
    """Return the largest ε any site of any run of ``arm`` spent (its ledger's figure)."""
    eps = [float(v["epsilon"]) for r in runs if r["arm"] == arm for v in r["privacy"].values()
           if v.get("epsilon") is not None]
    return max(eps) if eps else None


def table(runs: list[dict[str, Any]], dataset: Dataset) -> str:
    """Return the markdown table: model × metric on the pooled test split, paired gap to pooled."""
    m1, m2 = dataset.metrics
    found = rows(runs)
    pooled = dict(found).get("pooled", {})
    lines = [f"| model | {m1} | {m2} | {m1} − pooled, paired by seed | seeds |", "|---|---|---|---|---|"]
    for name, by_seed in found:
        vals = list(by_seed.values())
        gap = "" if name == "pooled" else _ms(paired_gap(by_seed, pooled, m1))
        gap = "" if gap == "-" else gap
        lines.append(f"| {name} | {_ms([v[m1] for v in vals])} | {_ms([v[m2] for v in vals])} | {gap} | {len(vals)} |")
    spent = {name: max_epsilon(runs, arm) for arm, name in ROW_NAMES.items() if arm in DP_EPSILON}
    spent_text = ", ".join(f"{n.split('= ')[1]}: {e:.3f}" for n, e in spent.items() if e is not None)
    if spent_text:
        lines += ["", f"Largest ε any site's ledger recorded, per target (δ = {DELTA:g}): {spent_text}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the seeds × arms for one data set, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--mu", type=float, help="FedProx proximal μ (default: the data set's)")
    parser.add_argument("--rounds", type=int, help="rounds (= epochs of the pooled and site-alone "
                        "baselines) for every arm (default: the scenario's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario value for every arm (as fedcare simulate --set; repeatable)")
    parser.add_argument("--table-from", type=Path, help="only print the table of an earlier JSON")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/utility_<dataset>.json)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out and run only the (arm, seed) pairs missing")
    args = parser.parse_args(argv)
    dataset = DATASETS[args.dataset]
    if dataset.dp_recipe and set(args.arms) - set(DP_EPSILON):
        parser.error(f"{args.dataset} is a DP recipe: give --arms among {sorted(DP_EPSILON)}")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    if args.table_from:
        print(table(json.loads(args.table_from.read_text())["runs"], dataset))
        return 0
    out = args.out or ROOT / "benchmarks" / "results" / f"utility_{args.dataset}.json"
    mu = dataset.mu if args.mu is None else args.mu
    earlier = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    rounds = args.rounds or scenario_for(dataset, 0, args.arms[0], mu=mu).rounds
    if earlier and earlier.get("rounds", rounds) != rounds:
        parser.error(f"{out} holds runs of {earlier['rounds']} rounds, not {rounds}: use another --out")
    runs: list[dict[str, Any]] = earlier.get("runs", [])
    commands = [*earlier.get("commands", []), " ".join([Path(sys.executable).name, *sys.argv])]
    done = {(r["arm"], r["seed"]) for r in runs}
    started = time.perf_counter()
    base = scenario_for(dataset, 0, args.arms[0], mu=mu)
    sizes = {s.name: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for s in build_hospitals(base)}
    with tempfile.TemporaryDirectory(prefix=f"fedcare-utility-{args.dataset}-") as tmp:
        for arm in args.arms:
            for seed in args.seeds:
                if (arm, seed) in done:
                    continue
                run = one_run(dataset, seed, arm, Path(tmp), mu=mu, rounds=rounds, overrides=tuple(args.overrides))
                runs.append(run)
                head = run["federated"]["pooled_test"][dataset.metrics[0]]
                extra = (f", pooled {run['pooled']['pooled_test'][dataset.metrics[0]]:.3f}"
                         if arm == "reference" else "")
                print(f"{args.dataset} {arm} seed {seed}: federated {dataset.metrics[0]} {head:.3f}{extra}, "
                      f"wall {run['wall_time_s']:.1f} s, load {run['loadavg_after'][0]:.2f}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({  # after every run: partial results survive
                    "commands": commands,
                    "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch CPU capability "
                               f"{torch.backends.cpu.get_cpu_capability()}",
                    "rounds": rounds,
                    "overrides": args.overrides,
                    "scenario": str(dataset.scenario.relative_to(ROOT)),
                    "metrics": dataset.metrics, "fedprox_mu": mu, "dp_delta": DELTA,
                    "reference": dataset.reference, "note": dataset.note,
                    "sites": sizes, "runs": runs,
                    "total_wall_s": earlier.get("total_wall_s", 0.0) + time.perf_counter() - started,
                }, indent=2))
    print(table(runs, dataset))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
