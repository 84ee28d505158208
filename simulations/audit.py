"""``fedcare audit membership``: membership-inference audit of a saved model on one site's data.

Members are the site's training split, non-members its test split (validation when it has no
test split), cut to the same size (a seeded random subset of the larger one). The model is a
``final_model.npz`` as the runner / ServerApp write it (``server.checkpoint.save_model_file``:
arrays plus the model spec, task and shape). ``privacy.membership.membership_audit`` runs the
loss-threshold attack and online LiRA; the LiRA shadows are trained from scratch with
``client.training.train_local`` and **the recipe given on the command line** (rounds × local
epochs, batch size, learning rate, and the site's DP settings), which must be the one the model
was trained with, or the shadows do not model it. With ``--max-auc`` the result goes through
``ReleaseGate``: a blocked release exits with code 1 and says why.

Registered on the ``audit`` group from the root ``cli.py`` (``privacy/`` may not import ``client/``)::

    audit_app.command("membership")(membership_command)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer
from pydantic import ValidationError
from rich.console import Console
from torch import nn

from ..client.dataset import SiteData, Split
from ..client.errors import DataValidationError
from ..client.loaders import load_site_file
from ..client.training import TrainSettings, train_local
from ..models import ModelSpec, build_for_data, set_weights
from ..privacy.artefacts import KeyFileError
from ..privacy.ledger import PrivacyLedger
from ..privacy.membership import MembershipAuditResult, ReleaseBlocked, ReleaseGate, TrainFn, membership_audit
from ..privacy.settings import PrivacySettings
from ..server.checkpoint import CheckpointError, load_model_file, write_json_atomic

__all__ = ["MembershipAuditError", "audit_membership_file", "make_train_fn", "membership_command", "membership_splits"]

logger = logging.getLogger(__name__)
_out = Console()
_err = Console(stderr=True)


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
                              n_shadow=n_shadow or 16, n_bootstrap=n_bootstrap, seed=seed)  # fmt: skip
    gate = ReleaseGate(max_auc=max_auc) if max_auc is not None else None
    failures = gate.failures(result) if gate is not None else []
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
        "gate": None if gate is None else {"max_auc": gate.max_auc, "basis": gate.basis, "passed": not failures,
                                           "failed_attacks": [a.attack for a in failures]},
    }  # fmt: skip
    target = Path(out) if out is not None else Path(model_path).parent / f"membership_{data.name}.json"
    write_json_atomic(target, record)
    return {**record, "file": str(target)}, result


def _privacy_from_file(path: Path | None) -> PrivacySettings:
    """Read PrivacySettings from a TOML (top level or ``[privacy]``); None: training without DP."""
    if path is None:
        return PrivacySettings.disabled()
    import tomllib  # noqa: PLC0415

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return PrivacySettings.model_validate(raw.get("privacy", raw))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise MembershipAuditError(f"privacy settings {path} are invalid: {exc}") from None


def membership_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="A final_model.npz written by a run.")],
    site: Annotated[Path, typer.Option("--site", "-s", help="Site manifest TOML: its train split are the members.")],
    max_auc: Annotated[
        Optional[float], typer.Option("--max-auc", help="Release gate: exit 1 when an attack's upper 95% bound exceeds it.")
    ] = None,
    shadows: Annotated[int, typer.Option("--shadows", help="LiRA shadow models (even, ≥ 4; 0: loss attack only).")] = 16,
    rounds: Annotated[int, typer.Option("--rounds", help="Recipe: rounds the model was trained for.")] = 1,
    local_epochs: Annotated[int, typer.Option("--local-epochs", help="Recipe: local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Recipe: batch size.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Recipe: learning rate.")] = 0.1,
    privacy: Annotated[
        Optional[Path], typer.Option("--privacy", help="Recipe: the site's PrivacySettings TOML (absent: no DP).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the splits, shadows and bootstrap.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Result JSON (default beside the model).")] = None,
    key: Annotated[
        Optional[str], typer.Option("--key", help="Artefact key of an encrypted model: a key file, 'env' or 'env:NAME'.")
    ] = None,
) -> None:
    """Membership-inference audit (loss threshold + LiRA) of a saved model; optionally gate its release."""
    try:
        if shadows and (shadows < 4 or shadows % 2):
            raise MembershipAuditError(f"--shadows must be 0 or an even number ≥ 4, got {shadows}")
        if max_auc is not None:
            ReleaseGate(max_auc=max_auc)  # validate before the (slow) audit
        record, result = audit_membership_file(
            model, site, train=TrainSettings(local_epochs=local_epochs, batch_size=batch_size, lr=lr, device="cpu"),
            privacy=_privacy_from_file(privacy), rounds=rounds, n_shadow=shadows, seed=seed, max_auc=max_auc,
            out=out, key=key,
        )
    except (CheckpointError, DataValidationError, ValueError, ValidationError, KeyFileError) as exc:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _out.print(f"membership audit of {model} on site {record['site']} "
               f"({record['members']} members, {record['nonmembers']} non-members):", highlight=False)  # fmt: skip
    for attack in result.attacks:
        _out.print(f"  {attack.describe()}, TPR at {attack.low_fpr:.0%} FPR {attack.tpr_at_low_fpr:.3f}",
                   highlight=False)  # fmt: skip
    _out.print(f"written to {record['file']}", highlight=False, soft_wrap=True)
    if max_auc is not None:
        try:
            ReleaseGate(max_auc=max_auc).check(result)
        except ReleaseBlocked as exc:
            _err.print(f"[bold red]{exc}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        _out.print(f"release gate passed (max AUC {max_auc:.3f}, upper 95% bound)", highlight=False)
