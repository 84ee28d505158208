"""Does the membership release gate tell DP-SGD (ε = 1, δ = 1e-3) from no DP on heart disease?

Data: the 4 hospitals of the UCI heart disease federation (``simulations/sites/heart_*.toml``, FLamby
Fed-Heart-Disease preparation), each split by its own manifest. Model: logistic regression.

Training (the same recipe with and without DP): the study's own ServerApp (FedAvg, every site
every round) and ClientApp, run in process (``simulations.runner.InProcessGrid``), ``--rounds``
rounds of 1 local epoch, batch 32, lr 0.5, SGD. With DP every site runs DP-SGD (Opacus, RDP,
C = 1) calibrated so that ITS ε after all rounds is 1 at δ = 1e-3 (a throw-away ledger per
site; the benchmark reads each site's final ε from the run's history). Without DP: plain SGD.

Audit (``simulations.membership_audit.federated_membership_pool`` + ``privacy.membership.membership_audit``):
members = a random subset of the hospitals' training patients, non-members = their test patients,
same size. Loss-threshold attack and online LiRA with ``--shadows`` shadows; each shadow is a
whole federation trained exactly as the target (``make_federated_shadow_trainer``: every hospital
trains on its training patients outside the pool plus its pool patients in the shadow's half).
The target itself is trained by the same function with the members as its half, so target and
shadows share every line of training code. AUC with a 95 % percentile bootstrap interval (1000
resamples), TPR at 0.1 % and 1 % FPR, and the verdict of ``ReleaseGate(max_auc=--max-auc)``
(upper bound; "inconclusive" when the minimum detectable AUC excess of the audit exceeds
``max_auc − 0.5``).

Usage::

    python benchmarks/membership_heart.py [--rounds 5] [--shadows 8] [--seeds 0 1 2] [--max-auc 0.6]

Each seed draws its own member subset, training noise / shuffling and shadows.

Writes ``benchmarks/results/membership_heart.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcare.client.dataset import Split
from fedcare.client.loaders import load_site_file
from fedcare.models import ModelSpec
from fedcare.privacy.membership import ReleaseGate, membership_audit
from fedcare.privacy.policy import SitePolicy
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.checkpoint import MetricsHistory
from fedcare.server.config import RunConfig
from fedcare.simulations.membership_audit import federated_membership_pool, make_federated_shadow_trainer

ROOT = Path(__file__).resolve().parents[1]
SITES = [ROOT / "simulations" / "sites" / f"heart_{n}.toml" for n in ("cleveland", "hungarian", "switzerland", "va")]
RESULTS = ROOT / "benchmarks" / "results" / "membership_heart.json"
SPEC = ModelSpec(family="logistic")
DP = PrivacySettings.with_target(epsilon=1.0, delta=1e-3, max_grad_norm=1.0)
NO_DP = PrivacySettings.disabled()
# the benchmark's hospitals accept plain rounds, δ = 1e-3 and (for the non-private arm) no DP
POLICY = SitePolicy.model_validate({"require_secure_aggregation": False, "require_dp": False, "max_delta": 1e-3})


def _accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        return float(((model(split.inputs[0]).reshape(-1) > 0).long() == split.targets).float().mean())


def main() -> None:
    """Train with and without DP, audit both with federated shadows, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-auc", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one federation per shadow: keep the round logs out
    warnings.simplefilter("once")  # each privacy warning shown once, not once per shadow federation
    torch.set_num_threads(args.threads)
    sites = [load_site_file(p) for p in SITES]
    first = sites[0]
    gate = ReleaseGate(max_auc=args.max_auc)
    all_train, all_test = Split.concat([s.train for s in sites]), Split.concat([s.test for s in sites])
    rows = []
    for seed in args.seeds:
        pool = federated_membership_pool(sites, seed=seed)
        n = len(pool.members)
        for label, privacy in (("DP-SGD ε=1, δ=1e-3", DP), ("no DP", NO_DP)):
            started = time.perf_counter()
            config = RunConfig(study="membership-heart", num_rounds=args.rounds, model=SPEC, task=first.task,
                               num_classes=first.num_classes, input_shape=tuple(first.input_shape), min_sites=4,
                               local_epochs=1, batch_size=32, lr=0.5, seed=seed)  # fmt: skip
            histories: list[MetricsHistory] = []
            trainer, description = make_federated_shadow_trainer(config, sites, pool, privacy=privacy, policy=POLICY,
                                                                 on_history=histories.append)  # fmt: skip
            model = trainer(np.arange(n), seed)  # the target: every member in, every non-member out
            target_history = histories[0]
            site_eps = {name: m.get("epsilon") for name, m in target_history.completed[-1].site_train.items()}
            audit = membership_audit(model, members=(pool.members.inputs[0], pool.members.targets),
                                     nonmembers=(pool.nonmembers.inputs[0], pool.nonmembers.targets),
                                     shadow_trainer=trainer, shadow_training=description, n_shadow=args.shadows,
                                     seed=seed)  # fmt: skip
            decision = gate.decide(audit)
            row = {
                "setting": label,
                "seed": seed,
                "dp": privacy.enabled,
                "site_epsilon": site_eps if privacy.enabled else None,
                "test_accuracy": _accuracy(model, all_test),
                "train_accuracy": _accuracy(model, all_train),
                "attacks": [a.model_dump() for a in audit.attacks],
                "gate": decision.model_dump(),
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            eps = "—" if not privacy.enabled else f"{min(site_eps.values()):.3f}–{max(site_eps.values()):.3f}"
            print(f"seed {seed}, {label}: test acc {row['test_accuracy']:.3f}, train acc {row['train_accuracy']:.3f}, "
                  f"ε per site {eps}, gate {decision.verdict} (MDE {decision.min_detectable_excess:.3f}), "
                  f"{row['seconds']:.1f} s")  # fmt: skip
            for a in audit.attacks:
                print(f"  {a.describe()}, {a.describe_tpr()}")
    record = {
        "question": "does the membership gate tell DP-SGD ε=1 from no DP on heart disease (federated shadows)?",
        "sites": [s.name for s in sites],
        "train_sizes": {s.name: len(s.train) for s in sites},
        "members": n, "nonmembers": n, "rounds": args.rounds, "shadows": args.shadows, "seeds": args.seeds,
        "gate": {"max_auc": gate.max_auc, "basis": gate.basis, "power": gate.power},
        "recipe": {"strategy": "fedavg", "local_epochs": 1, "batch_size": 32, "lr": 0.5, "dp": DP.model_dump()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
                    "threads": args.threads},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
