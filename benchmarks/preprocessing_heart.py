"""Preprocessing carried by the model: per-site vs global (federated) standardisation, 4 heart hospitals.

Question (issue 14, item 5): a model whose inputs every site standardises with its own statistics
scores differently when the same patients are grouped differently; does standardising with one set
of statistics, computed from the sites' summed moments and carried in the model file, fix that,
and what does it cost?

Method. The 4 UCI heart-disease manifests (simulations/sites/heart_*.toml, their splits) are loaded with
``standardize = false`` (raw numeric features, imputed; one-hot categoricals). Two choices:

- **per-site**: every site standardises all its features with its own training split's mean / std
  (``Preprocessing`` fitted on that site's moments only);
- **global**: one mean / std from the 4 sites' summed moments (``global_standardiser``), stored
  with the model and applied by every site.

Training: FedAvg in process (each round every site runs the product's ``train_local`` from the
global weights, the server takes the example-weighted mean), logistic regression, 20 rounds × 1
epoch, batch 16, lr 0.1 (``heart_disease.toml``), seeds 0-4 (initial weights and shuffling).
Evaluation set "set B" = the 4 hospitals' test splits (111 patients), scored by the global AUROC
over all of them (exact, scikit-learn), in two groupings: **as four sites** (each test split
standardised by its own site's statistics under per-site) and **as one site** (one evaluating
site holding all 4 hospitals' records, whose own statistics are the union's). Under global
standardisation both groupings apply the carried statistics, so they agree by construction.

Usage::

    python benchmarks/preprocessing_heart.py --seeds 0 1 2 3 4 --out benchmarks/results/preprocessing_heart.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedcare.client.dataset import SiteData, Split
from fedcare.client.loaders import load_site
from fedcare.client.manifest import load_manifest
from fedcare.client.metrics import predict
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import ModelSpec, build_for_data, get_weights, set_weights
from fedcare.models.preprocessing import Preprocessing, global_standardiser, site_moments
from fedcare.privacy.settings import PrivacySettings

from seeded import mean_std, seeded_arguments, write_seeded_results

ROOT = Path(__file__).resolve().parents[1]
SITES = [ROOT / "simulations" / "sites" / f"heart_{n}.toml" for n in ("cleveland", "hungarian", "switzerland", "va")]


def raw_sites() -> list[SiteData]:
    """Return the 4 hospitals with raw (unstandardised) features."""
    out = []
    for path in SITES:
        manifest = load_manifest(path)
        raw = manifest.model_copy(update={"data": manifest.data.model_copy(update={"standardize": False})})
        out.append(load_site(raw))
    return out


def transformed(site: SiteData, pre: Preprocessing) -> SiteData:
    """Return ``site`` with every split's features transformed by ``pre``."""
    def apply(split: Split) -> Split:
        return dataclasses.replace(split, inputs=(pre.apply(split.inputs[0]),))
    return dataclasses.replace(site, train=apply(site.train), val=apply(site.val), test=apply(site.test))


def fedavg(sites: list[SiteData], seed: int, rounds: int = 20) -> torch.nn.Module:
    """Return a logistic model trained by in-process FedAvg over ``sites``."""
    torch.manual_seed(seed)
    first = sites[0]
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=tuple(first.input_shape))
    privacy = PrivacySettings.disabled()
    for r in range(1, rounds + 1):
        start = get_weights(model)
        updates, weights = [], []
        for site in sites:
            set_weights(model, start)
            settings = TrainSettings(local_epochs=1, batch_size=16, lr=0.1, device="cpu",
                                     seed=zlib.crc32(f"{seed}:{site.name}:{r}".encode()) & 0x7FFFFFFF)
            train_local(model, site, train=settings, privacy=privacy, ledger=None, planned_rounds=rounds, round_index=r)
            updates.append(get_weights(model))
            weights.append(len(site.train))
        total = sum(weights)
        set_weights(model, {k: sum(u[k] * w for u, w in zip(updates, weights)) / total for k in start})
    return model.eval()


def auroc(model: torch.nn.Module, splits: list[Split]) -> float:
    """Return the exact AUROC over ``splits`` together."""
    scores = torch.cat([predict(model, s) for s in splits]).numpy()
    y = torch.cat([s.targets for s in splits]).numpy()
    return float(roc_auc_score(y, scores))


def main() -> int:
    """Run both choices for each seed; print and write the figures."""
    args = seeded_arguments(__doc__, ROOT / "benchmarks" / "results" / "preprocessing_heart.json")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    raw = raw_sites()
    own = [global_standardiser([site_moments(s.train.inputs[0])]) for s in raw]
    union = global_standardiser([site_moments(torch.cat([s.train.inputs[0] for s in raw]))])
    federated = global_standardiser([site_moments(s.train.inputs[0]) for s in raw])
    if not np.allclose(union.mean, federated.mean) or not np.allclose(union.std, federated.std):
        raise RuntimeError("summed site moments differ from the union's statistics")
    per_site = [transformed(s, p) for s, p in zip(raw, own, strict=True)]
    global_ = [transformed(s, federated) for s in raw]
    runs = []
    for seed in args.seeds:
        m_site = fedavg(per_site, seed)
        m_glob = fedavg(global_, seed)
        run = {
            "seed": seed,
            "per_site_as_four": auroc(m_site, [s.test for s in per_site]),
            "per_site_as_one": auroc(m_site, [transformed(s, union).test for s in raw]),
            "global_as_four": auroc(m_glob, [s.test for s in global_]),
            "global_as_one": auroc(m_glob, [transformed(s, federated).test for s in raw]),
        }
        runs.append(run)
        print(json.dumps(run), flush=True)
    summary = {k: mean_std(r[k] for r in runs) for k in runs[0] if k != "seed"}
    write_seeded_results(args.out, "preprocessing_heart.py", args.seeds, runs, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
