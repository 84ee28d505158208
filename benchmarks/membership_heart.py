"""Does sample-level DP (ε = 1, δ = 1e-3) measurably reduce membership inference on heart disease?

Data: the 4 hospitals of the UCI heart disease federation (``docs/sites/heart_*.toml``, FLamby
Fed-Heart-Disease preparation), each split by its own manifest. Model: logistic regression.

Training (the same recipe with and without DP): FedAvg over the 4 hospitals, ``--rounds``
rounds of ``client.training.train_local`` (1 local epoch, batch 32, lr 0.5, SGD) at every site,
weighted by training size. With DP every site runs DP-SGD (Opacus, RDP accountant, C = 1) with
the noise calibrated so that ITS ε after all rounds is 1 at δ = 1e-3 (an in-memory ledger per
site; the benchmark checks the final ε). Without DP: plain SGD.

Audit (``privacy.membership.membership_audit``): members = the union of the hospitals'
training splits, non-members = the union of their test splits, the larger set cut at random to
the size of the smaller. Loss-threshold attack and online LiRA with ``--shadows`` shadow models;
a shadow is trained with the same recipe, pooled over its half of the audit pool (it does not
see the other sites' data as the real federation did: an approximation, see docs/privacy.md).
AUC with a 95 % percentile bootstrap interval (1000 resamples), TPR at 1 % FPR.

Usage::

    python benchmarks/membership_heart.py [--rounds 5] [--shadows 16] [--seeds 0 1 2]

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
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcare.client.dataset import SiteData, Split
from fedcare.client.loaders import load_site_file
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import ModelSpec, build_for_data, get_weights, set_weights
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.membership import membership_audit
from fedcare.privacy.settings import PrivacySettings
from fedcare.simulations.audit import make_train_fn

ROOT = Path(__file__).resolve().parents[1]
SITES = [ROOT / "docs" / "sites" / f"heart_{n}.toml" for n in ("cleveland", "hungarian", "switzerland", "va")]
RESULTS = ROOT / "benchmarks" / "results" / "membership_heart.json"
SPEC = ModelSpec(family="logistic")
TRAIN = TrainSettings(local_epochs=1, batch_size=32, lr=0.5, device="cpu")
DP = PrivacySettings.with_target(epsilon=1.0, delta=1e-3, max_grad_norm=1.0)
NO_DP = PrivacySettings.disabled()


def _concat(splits: list[Split]) -> Split:
    return Split(inputs=(torch.cat([s.inputs[0] for s in splits]),), targets=torch.cat([s.targets for s in splits]))


def _model(data: SiteData) -> nn.Module:
    return build_for_data(SPEC, task=data.task, num_classes=data.num_classes, input_shape=data.input_shape, has_mask=False)


def federated(sites: list[SiteData], privacy: PrivacySettings, *, rounds: int, seed: int) -> tuple[nn.Module, list[float]]:
    """FedAvg with train_local at every site; return the global model and each site's final ε."""
    torch.manual_seed(seed)
    global_model = _model(sites[0])
    ledgers = [PrivacyLedger.in_memory(site=s.name, study="membership-bench") if privacy.enabled else None for s in sites]
    epsilons = [float("inf")] * len(sites)
    for r in range(1, rounds + 1):
        updates, weights = [], []
        for i, (site, ledger) in enumerate(zip(sites, ledgers, strict=True)):
            local = _model(site)
            set_weights(local, get_weights(global_model))
            result = train_local(local, site, train=TRAIN.model_copy(update={"seed": seed * 100 + 10 * r + i}),
                                 privacy=privacy, ledger=ledger, planned_rounds=rounds, round_index=r)
            epsilons[i] = result.epsilon
            updates.append(get_weights(local))
            weights.append(len(site.train))
        total = sum(weights)
        set_weights(global_model, OrderedDict(
            (k, sum(w / total * u[k] for u, w in zip(updates, weights, strict=True))) for k in updates[0]
        ))
    return global_model.eval(), epsilons


def _accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        return float(((model(split.inputs[0]) > 0).long() == split.targets).float().mean())


def main() -> None:
    """Train with and without DP, audit both, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shadows", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("once")
    sites = [load_site_file(p) for p in SITES]
    members_all, held_out_all = _concat([s.train for s in sites]), _concat([s.test for s in sites])
    n = min(len(members_all), len(held_out_all))
    pooled = SiteData(name="heart-pooled", kind="table", task=sites[0].task, num_classes=sites[0].num_classes,
                      input_shape=sites[0].input_shape, train=members_all, val=members_all.subset(np.arange(0)),
                      test=held_out_all)
    rows = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        members = members_all.subset(np.sort(rng.choice(len(members_all), n, replace=False)))
        nonmembers = held_out_all.subset(np.sort(rng.choice(len(held_out_all), n, replace=False)))
        for label, privacy in (("DP-SGD ε=1, δ=1e-3", DP), ("no DP", NO_DP)):
            started = time.perf_counter()
            model, epsilons = federated(sites, privacy, rounds=args.rounds, seed=seed)
            train_fn = make_train_fn(SPEC, pooled, train=TRAIN, privacy=privacy, rounds=args.rounds)
            audit = membership_audit(model, members=(members.inputs[0], members.targets),
                                     nonmembers=(nonmembers.inputs[0], nonmembers.targets), train_fn=train_fn,
                                     n_shadow=args.shadows, seed=seed)
            row = {
                "setting": label,
                "seed": seed,
                "dp": privacy.enabled,
                "site_epsilon": {s.name: (e if privacy.enabled else None) for s, e in zip(sites, epsilons, strict=True)},
                "test_accuracy": _accuracy(model, held_out_all),
                "train_accuracy": _accuracy(model, members_all),
                "attacks": [a.model_dump() for a in audit.attacks],
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            print(f"seed {seed}, {label}: test acc {row['test_accuracy']:.3f}, train acc {row['train_accuracy']:.3f}, "
                  f"ε per site {row['site_epsilon']}")
            for a in audit.attacks:
                print(f"  {a.attack}: AUC {a.auc:.3f} (95% CI {a.ci_low:.3f}–{a.ci_high:.3f}), "
                      f"TPR@1%FPR {a.tpr_at_low_fpr:.3f}")
    record = {
        "question": "membership inference on heart disease, logistic regression, DP-SGD ε=1 vs no DP",
        "sites": [s.name for s in sites],
        "train_sizes": {s.name: len(s.train) for s in sites},
        "members": n, "nonmembers": n, "rounds": args.rounds, "shadows": args.shadows, "seeds": args.seeds,
        "recipe": {"train": TRAIN.model_dump(), "dp": DP.model_dump()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
