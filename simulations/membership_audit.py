"""``fedcare audit membership``: membership-inference audit of a saved model on one site's data.

Members are the site's training split, non-members its test split (validation when it has no
test split), cut to the same size (a seeded random subset of the larger one). The model is a
``final_model.npz`` as the runner / ServerApp write it (``server.checkpoint.save_model_file``:
arrays plus the model spec, task and shape). ``privacy.membership.membership_audit`` runs the
loss-threshold attack and online LiRA; the LiRA shadows are trained from scratch with
``client.training.train_local`` and **the recipe given on the command line** (rounds × local
epochs, batch size, learning rate, and the site's DP settings), which must be the one the model
was trained with, or the shadows do not model it. One site holds only its own data, so these
shadows are trained on that site alone, not federated like the target: the result says so
(``shadow_training``). With ``--max-auc`` the result goes through ``ReleaseGate``: a blocked
release exits with code 1, an *inconclusive* one (too few held-out patients for the limit) too,
and both say why.

The simulation path (``simulations.release``) has every hospital's data and trains its shadows
as the target was trained: :func:`federated_membership_pool` draws the audit pool from all
hospitals and :func:`make_federated_shadow_trainer` runs, for each shadow, a whole federation
(the study's own ``RunConfig``, ServerApp strategy and ClientApp, in process) in which every
hospital trains on its training patients outside the pool plus its pool patients in the
shadow's half, under the scenario's DP settings and a throw-away ledger.

The command itself is :func:`fedcare.simulations.cli.membership_command`, registered on the
``audit`` group by the root ``cli.py`` (``privacy/`` may not import ``client/``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..client.dataset import SiteData, Split
from ..client.loaders import load_site_file
from ..client.training import TrainSettings, train_local
from ..models import ModelSpec, build_for_data, set_weights
from ..privacy.ledger import PrivacyLedger
from ..privacy.membership import (
    MembershipAuditResult,
    ReleaseGate,
    ShadowTrainer,
    TrainFn,
    membership_audit,
)
from ..privacy.settings import PrivacySettings
from ..server.checkpoint import load_model_file, write_json_atomic

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..privacy.policy import SitePolicy
    from ..server.checkpoint import MetricsHistory
    from ..server.config import RunConfig

__all__ = [
    "FederatedPool",
    "MembershipAuditError",
    "audit_membership_file",
    "federated_membership_pool",
    "make_federated_shadow_trainer",
    "make_train_fn",
    "membership_splits",
]

logger = logging.getLogger(__name__)


SITE_SHADOWS = ("site-local: each shadow trained with the given recipe on its half of the audit pool of one "
                "site's data (the target was federated: an approximation)")


class MembershipAuditError(ValueError):
    """The audit cannot run as asked (model and site do not match, too little data, bad settings)."""


def membership_splits(data: SiteData, *, seed: int = 0) -> tuple[Split, Split]:
    """Return (members, non-members): the training split and the test (else validation) split, same size."""
    held_out = data.test if len(data.test) > 0 else data.val
    n = min(len(data.train), len(held_out))
    if n < 2:
        raise MembershipAuditError(
            f"site {data.name!r} has {len(data.train)} training and {len(held_out)} held-out examples; "
            "a membership audit needs at least 2 of each (give the manifest's [split] a test fraction)"
        )
    rng = np.random.default_rng(seed)

    def cut(split: Split) -> Split:
        return split if len(split) == n else split.subset(np.sort(rng.choice(len(split), n, replace=False)))

    return cut(data.train), cut(held_out)


@dataclasses.dataclass(frozen=True)
class FederatedPool:
    """A federation's membership-audit pool, with what each shadow federation trains on besides it.

    Attributes
    ----------
    members, nonmembers : Split
        The pool: training patients (members) and held-out patients (non-members), same size.
    site_of : numpy.ndarray
        Hospital index of each pool example (members first, then non-members).
    background : list of Split
        Per hospital, its training patients outside the pool: every shadow trains on them, as the
        target did, so a shadow's federation has the target's size and sites.
    """

    members: Split
    nonmembers: Split
    site_of: np.ndarray
    background: list[Split]


def federated_membership_pool(hospitals: list[SiteData], *, seed: int = 0) -> FederatedPool:
    """Return the audit pool of a federation: members from every training split, non-members from the held-out ones.

    Non-members are each hospital's test split (validation when no hospital has one); the larger
    side is cut at random (``seed``) to the size of the smaller, as :func:`membership_splits` does.
    """
    use_test = any(len(h.test) for h in hospitals)
    held = [h.test if use_test else h.val for h in hospitals]
    n_train, n_held = sum(len(h.train) for h in hospitals), sum(len(s) for s in held)
    n = min(n_train, n_held)
    if n < 2:
        raise MembershipAuditError(
            f"the hospitals hold {n_train} training and {n_held} held-out examples; a membership audit "
            "needs at least 2 of each (give the hospitals a test split)"
        )
    rng = np.random.default_rng(seed)
    train_site = np.concatenate([np.full(len(h.train), i) for i, h in enumerate(hospitals)])
    train_row = np.concatenate([np.arange(len(h.train)) for h in hospitals])
    held_site = np.concatenate([np.full(len(s), i) for i, s in enumerate(held)])
    held_row = np.concatenate([np.arange(len(s)) for s in held])
    pick_m = np.sort(rng.choice(n_train, n, replace=False)) if n < n_train else np.arange(n_train)
    pick_n = np.sort(rng.choice(n_held, n, replace=False)) if n < n_held else np.arange(n_held)
    # picks are sorted and sites are concatenated in order: per-site subsets keep the pool's order
    members = Split.concat([h.train.subset(train_row[pick_m][train_site[pick_m] == i]) for i, h in enumerate(hospitals)])
    nonmembers = Split.concat([s.subset(held_row[pick_n][held_site[pick_n] == i]) for i, s in enumerate(held)])
    in_pool = np.zeros(n_train, dtype=bool)
    in_pool[pick_m] = True
    background = [h.train.subset(train_row[(train_site == i) & ~in_pool]) for i, h in enumerate(hospitals)]
    return FederatedPool(members=members, nonmembers=nonmembers, background=background,
                         site_of=np.concatenate([train_site[pick_m], held_site[pick_n]]))  # fmt: skip


def make_federated_shadow_trainer(
    config: RunConfig,
    hospitals: list[SiteData],
    pool: FederatedPool,
    *,
    privacy: PrivacySettings,
    policy: SitePolicy | None,
    on_history: Callable[[MetricsHistory], None] | None = None,
) -> tuple[ShadowTrainer, str]:
    """Return ``(shadow_trainer, description)``: each shadow is a whole federation run like the target.

    ``shadow_trainer(pool_index, seed)`` gives every hospital its training patients outside the
    pool plus its pool patients in ``pool_index``, and runs the study (``config``: strategy,
    rounds, fraction of sites, local epochs, batch size, learning rate, model) through the real
    ServerApp and ClientApp in process (``InProcessGrid``), each hospital under ``privacy`` (its
    DP-SGD settings) and ``policy`` with a throw-away ledger; the seed changes the initial model,
    the site sampling and the sites' shuffles and noise. Artefact encryption, the audit log and
    resume are off. A secure-aggregation study's shadows run plain rounds: SecAgg+ does not change
    the aggregate, but the coordinator's client-level DP noise is left out (the description says so,
    with a warning): those shadows are less noisy than the target. ``on_history``, when given, is
    called with each shadow federation's metrics history (per-site ε, rounds).
    """
    from ..client.app import LocalSite, make_client_app  # noqa: PLC0415 - heavy, simulation only
    from ..server.app import run_server  # noqa: PLC0415
    from ..server.checkpoint import FINAL_MODEL_FILE  # noqa: PLC0415
    from .inprocess import InProcessGrid  # noqa: PLC0415 - light, but only needed here

    pool_x = torch.cat([pool.members.inputs[0], pool.nonmembers.inputs[0]])
    pool_y = torch.cat([pool.members.targets, pool.nonmembers.targets])
    update: dict[str, Any] = {"artefact_key": None, "audit_key": None, "resume": False}
    description = (f"federated like the target: {config.strategy}, {len(hospitals)} sites, {config.num_rounds} rounds, "
                   f"fraction-train {config.fraction_train:g}, sample-level DP {'on' if privacy.enabled else 'off'}")  # fmt: skip
    if config.secure_aggregation:
        update.update(secure_aggregation=False, client_dp_clipping_norm=0.0)
        if policy is not None:
            policy = policy.model_copy(update={"require_secure_aggregation": False})
        if config.client_dp:
            description += "; without the coordinator's client-level DP noise (shadows less noisy than the target)"
            message = (f"study {config.study}: the LiRA shadow federations run without client-level DP noise "
                       "(in-process shadows cannot run SecAgg+); they model a less noisy target, so LiRA is weaker")  # fmt: skip
            warnings.warn(message, stacklevel=2)
            logger.warning("%s", message)

    def trainer(index: np.ndarray, seed: int) -> nn.Module:
        chosen = np.zeros(len(pool.site_of), dtype=bool)
        chosen[np.asarray(index, dtype=np.int64)] = True
        sites = []
        for i, h in enumerate(hospitals):
            rows = torch.from_numpy(np.flatnonzero(chosen & (pool.site_of == i)))
            extra = Split(inputs=(pool_x[rows],), targets=pool_y[rows])
            sites.append(dataclasses.replace(h, train=Split.concat([pool.background[i], extra])))
        with tempfile.TemporaryDirectory(prefix="fedcare-shadow-") as tmp:
            folder = Path(tmp)
            local = [LocalSite(data=site, privacy=privacy, ledger_dir=folder / "ledgers", name=site.name,
                               seed=seed * 1000 + i, policy=policy) for i, site in enumerate(sites)]  # fmt: skip
            app = make_client_app(lambda context: local[int(context.node_config["partition-id"])])
            shadow_config = config.model_copy(update={**update, "checkpoint_dir": folder / "run", "seed": seed})
            history = run_server(InProcessGrid(app, num_nodes=len(local)), shadow_config)
            if on_history is not None:
                on_history(history)
            arrays, meta = load_model_file(folder / "run" / FINAL_MODEL_FILE)
        first = hospitals[0]
        model = build_for_data(ModelSpec.model_validate(meta["model_spec"]), task=first.task,
                               num_classes=first.num_classes, input_shape=first.input_shape, has_mask=False)  # fmt: skip
        set_weights(model, arrays)
        return model.eval()

    return trainer, description


def _pair(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    return split.inputs[0], split.targets


def make_train_fn(
    spec: ModelSpec, data: SiteData, *, train: TrainSettings, privacy: PrivacySettings, rounds: int = 1,
) -> TrainFn:
    """Return ``train_fn(x, y, seed)``: a fresh model trained with ``train_local`` and this recipe.

    ``rounds`` calls of ``train_local`` (each ``train.local_epochs`` epochs) on ``(x, y)``; under
    DP with an in-memory ledger calibrated to the same target over ``rounds`` rounds.
    """

    def train_fn(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = build_for_data(spec, task=data.task, num_classes=data.num_classes,
                               input_shape=data.input_shape, has_mask=False)  # fmt: skip
        empty = Split(inputs=(x[:0],), targets=y[:0])
        site = SiteData(name=f"{data.name}-shadow", kind=data.kind, task=data.task, num_classes=data.num_classes,
                        input_shape=data.input_shape, train=Split(inputs=(x,), targets=y), val=empty, test=empty)
        ledger = (PrivacyLedger.in_memory(site=site.name, study=f"shadow-{seed}") if privacy.enabled else None)
        for r in range(1, rounds + 1):
            train_local(model, site, train=train.model_copy(update={"seed": seed * 1000 + r}), privacy=privacy,
                        ledger=ledger, planned_rounds=rounds, round_index=r)
        return model.eval()

    return train_fn


def _load_model(model_path: Path | str, data: SiteData, key: str | None = None) -> tuple[nn.Module, ModelSpec]:
    """Load a saved model (decrypted with ``key`` when given) and check that the site's data fits it."""
    from ..server.safekeeping import load_artefact_key  # noqa: PLC0415

    arrays, meta = load_model_file(model_path, key=load_artefact_key(key))
    expected = (meta["task"], tuple(meta["input_shape"]), bool(meta["has_mask"]))
    found = (data.task, tuple(data.input_shape), data.has_mask)
    if expected != found or (data.task != "regression" and int(meta["num_classes"]) != data.num_classes):
        raise MembershipAuditError(
            f"site {data.name!r} has (task, input shape, mask) = {found} and {data.num_classes} classes; "
            f"the model expects {expected} and {meta['num_classes']}: audit on a site of the study"
        )
    if data.task == "regression" or data.has_mask:
        raise MembershipAuditError(
            "the membership audit scores classification models with one input (tables, images, "
            f"signals); site {data.name!r} is {data.task}{' with masked sequences' if data.has_mask else ''}"
        )
    spec = ModelSpec.model_validate(meta["model_spec"])
    model = build_for_data(spec, task=meta["task"], num_classes=int(meta["num_classes"]),
                           input_shape=tuple(meta["input_shape"]), has_mask=False)  # fmt: skip
    set_weights(model, arrays)
    return model.eval(), spec


def audit_membership_file(
    model_path: Path | str,
    site_path: Path | str,
    *,
    train: TrainSettings,
    privacy: PrivacySettings,
    rounds: int = 1,
    n_shadow: int = 16,
    n_bootstrap: int = 1000,
    seed: int = 0,
    max_auc: float | None = None,
    out: Path | str | None = None,
    key: str | None = None,
) -> tuple[dict[str, Any], MembershipAuditResult]:
    """Audit a saved model on a site manifest's data; write JSON; return (record, result).

    ``n_shadow = 0`` runs the loss-threshold attack only. The gate (when ``max_auc`` is given) is
    applied by the caller with ``ReleaseGate(max_auc=...).check(result)``; the record says whether
    it passed. JSON goes to ``out`` (default ``<model folder>/membership_<site>.json``). ``key`` (a
    key file, ``"env"`` or ``"env:NAME"``) decrypts a ``final_model.npz.enc``; the record carries
    the model file's SHA-256, which ``fedcare release`` checks.
    """
    from ..privacy.artefacts import sha256_file  # noqa: PLC0415

    data = load_site_file(site_path)
    model, spec = _load_model(model_path, data, key)
    members, nonmembers = membership_splits(data, seed=seed)
    train_fn = make_train_fn(spec, data, train=train, privacy=privacy, rounds=rounds) if n_shadow else None
    result = membership_audit(model, members=_pair(members), nonmembers=_pair(nonmembers), train_fn=train_fn,
                              shadow_training=SITE_SHADOWS if train_fn is not None else None,
                              n_shadow=n_shadow or 16, n_bootstrap=n_bootstrap, seed=seed)  # fmt: skip
    gate = ReleaseGate(max_auc=max_auc) if max_auc is not None else None
    decision = gate.decide(result) if gate is not None else None
    record: dict[str, Any] = {
        "model": str(model_path),
        "model_sha256": sha256_file(model_path),
        "site": data.name,
        "manifest": str(site_path),
        "members": len(members),
        "nonmembers": len(nonmembers),
        "nonmember_split": "test" if len(data.test) > 0 else "val",
        "recipe": {"rounds": rounds, "train": train.model_dump(), "privacy": privacy.model_dump()},
        "attacks": [a.model_dump() for a in result.attacks],
        "gate": None if decision is None else {**decision.model_dump(), "passed": decision.passed,
                                               "failed_attacks": list(decision.blocking)},
    }  # fmt: skip
    target = Path(out) if out is not None else Path(model_path).parent / f"membership_{data.name}.json"
    write_json_atomic(target, record)
    return {**record, "file": str(target)}, result
