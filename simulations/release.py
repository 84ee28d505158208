"""Releasing a simulated model: encrypted artefacts, audit log, privacy report and the membership gate.

A scenario turns these on with three optional tables (relative paths resolve against the
scenario file's folder)::

    [artefacts]
    key = "keys/artefact.key"     # AES-256-GCM key of checkpoints and the final model: a key file
                                  # (mode 0600, `fedcare audit artefact-key`), "env"
                                  # (FEDCARE_ARTEFACT_KEY) or "env:NAME"; absent: plaintext

    [audit]
    signing_key = "keys/audit.key"  # Ed25519 key (`fedcare audit keygen`): the server signs an
                                    # audit log, out/checkpoints/audit.jsonl; absent: no log

    [release]
    max_membership_auc = 0.6      # release gate: block when an attack's AUC exceeds it; absent: no gate
    basis = "upper"               # "upper": the 95 % bound (default), "point": the estimate
    attack = "lira"               # "loss" (loss threshold only) or "lira" (loss + online LiRA)
    shadows = 16                  # LiRA shadow models (even, >= 4)
    bootstrap = 1000              # bootstrap resamples of the AUC interval
    seed = 0
    power = 0.8                   # an audit that cannot tell AUC 0.5 from the limit with this power
                                  # is "inconclusive", which blocks like a failure unless:
    override_inconclusive = "…"   # absent: no override; a reason: release an inconclusive model
                                  # (warned; the reason goes into the report and the audit log)

After a completed run, :func:`release_model` checks that every site's ε as reported equals its
ledger file, runs the membership audit when a gate is set (members: every hospital's training
split; non-members: their test splits, else validation; the larger cut at random to the size of
the smaller; each LiRA shadow is a whole federation trained as the target was, in process, with
the study's RunConfig, strategy and DP settings: ``simulations.membership_audit.make_federated_shadow_trainer``),
and only if the gate's verdict is *pass* (or none is set, or an *inconclusive* verdict is
overridden with a logged reason; a *block* never is) writes the
**unencrypted exported model** ``out/final_model.npz``. It writes ``out/privacy_report.json`` /
``.md`` either way (the simulation's only report: its ServerApp runs with ``write_report=False``)
and appends a ``release`` entry (gate verdict, AUC, model and report digests) to the audit log. A
blocked release leaves no exported model and says why. The gate, export, report and audit steps
are ``fedcare release``'s own (:func:`fedcare.server.release.release`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..client.dataset import SiteData, Split
from ..config_base import FrozenModel
from ..models import ModelSpec, build_for_data, set_weights
from ..privacy.ledger import PrivacyLedger
from ..privacy.membership import MembershipAuditResult, ReleaseGate, membership_audit
from ..privacy.policy import SitePolicy
from ..privacy.report import SitePrivacy
from ..server.checkpoint import MetricsHistory, load_model_file
from ..server.client_dp import client_level_privacy
from ..server.config import RunConfig
from ..server.release import decide_release, release
from ..server.safekeeping import RunAudit, build_privacy_report, final_model_file, site_privacy
from .membership_audit import MembershipAuditError, federated_membership_pool, make_federated_shadow_trainer

__all__ = [
    "ArtefactSettings",
    "AuditSettings",
    "LedgerMismatchError",
    "ReleaseOutcome",
    "ReleaseSettings",
    "check_against_ledgers",
    "release_model",
    "security_fields",
]

logger = logging.getLogger(__name__)


class LedgerMismatchError(RuntimeError):
    """A site's ε as reported to the server differs from its own ledger file: the report is not written."""


_Frozen = FrozenModel  # the shared base: fedcare.config_base


def _resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve a relative path against the scenario's folder (``context["base_dir"]``)."""
    if value is None:
        return None
    value = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    return Path(base) / value if base is not None and not value.is_absolute() else value


class ArtefactSettings(_Frozen):
    """The scenario's ``[artefacts]`` table: the AES key of checkpoints and the final model."""

    key: str | None = Field(default=None, min_length=1)

    @field_validator("key")
    @classmethod
    def _resolve_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Resolve a key file path against the scenario's folder; keep ``env`` / ``env:NAME``."""
        if value is None or value == "env" or value.startswith("env:"):
            return value
        return str(_resolve_path(Path(value), info))


class AuditSettings(_Frozen):
    """The scenario's ``[audit]`` table: the Ed25519 key the server signs the audit log with."""

    signing_key: Path | None = None

    _resolve = field_validator("signing_key")(_resolve_path)


class ReleaseSettings(_Frozen):
    """The scenario's ``[release]`` table: the membership-inference release gate."""

    max_membership_auc: float | None = Field(default=None, gt=0.5, le=1.0)
    basis: Literal["upper", "point"] = "upper"
    attack: Literal["loss", "lira"] = "lira"
    shadows: int = Field(default=16, ge=4)
    bootstrap: int = Field(default=1000, ge=0)
    seed: int = 0
    power: float = Field(default=0.8, ge=0.5, lt=1.0)
    override_inconclusive: str | None = Field(default=None, min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f|]+$")

    @field_validator("shadows")
    @classmethod
    def _even(cls, value: int) -> int:
        """LiRA puts every example in exactly half of the shadows: an even number."""
        if value % 2:
            raise ValueError(f"shadows must be even (each example is in half of them), got {value}")
        return value


def security_fields(artefacts: ArtefactSettings, audit: AuditSettings) -> dict[str, Any]:
    """Return the RunConfig fields a scenario's ``[artefacts]`` and ``[audit]`` tables set."""
    return {"artefact_key": artefacts.key, "audit_key": audit.signing_key}


class ReleaseOutcome(BaseModel):
    """What the release step decided (part of ``summary.json``)."""

    model_config = ConfigDict(frozen=True)

    released: bool
    model: str | None = None
    reason: str | None = None
    gate: dict[str, Any] | None = None
    report: str | None = None
    encrypted_model: str | None = None


def check_against_ledgers(sites: list[SitePrivacy], ledger_dir: Path, study: str) -> None:
    """Check that each DP site's reported ε equals the ε its ledger file holds.

    Raises
    ------
    LedgerMismatchError
        Naming the site and both values.
    """
    for site in sites:
        if not site.dp_enabled:
            continue
        spent = PrivacyLedger.open(ledger_dir, site=site.site, study=study).spent_epsilon()
        reported = float(site.epsilon)  # type: ignore[arg-type]
        if not (math.isfinite(spent) and math.isclose(spent, reported, rel_tol=1e-9, abs_tol=1e-12)):
            raise LedgerMismatchError(
                f"site {site.site!r} reported ε = {reported!r} but its ledger in {ledger_dir} holds "
                f"{spent!r}: the privacy report would be wrong, so nothing is released. Check the "
                "ledger folder and rerun"
            )


def _pooled(hospitals: list[SiteData]) -> SiteData:
    """Return every hospital's data as one site (train: all training splits; test: all test splits)."""
    first = hospitals[0]
    empty = first.train.subset(torch.zeros(0, dtype=torch.long).numpy())
    tests = [h.test for h in hospitals if len(h.test)] or [h.val for h in hospitals if len(h.val)]
    return SiteData(
        name="pooled-audit", kind=first.kind, task=first.task, num_classes=first.num_classes,
        input_shape=first.input_shape, has_mask=first.has_mask, train=Split.concat([h.train for h in hospitals]),
        val=empty, test=Split.concat(tests) if tests else empty,
    )  # fmt: skip


def _membership(
    settings: ReleaseSettings,
    config: RunConfig,
    scenario: Any,
    hospitals: list[SiteData],
    arrays: Any,
    meta: dict[str, Any],
    policy: SitePolicy,
) -> MembershipAuditResult:
    """Run the membership audit of the final model on the hospitals' held-in and held-out patients."""
    data = _pooled(hospitals)
    if data.task == "regression" or data.has_mask:
        raise MembershipAuditError(
            "the release gate's membership audit scores classification models with one input; this "
            f"study is {data.task}{' with masked sequences' if data.has_mask else ''}: remove "
            "[release] max_membership_auc"
        )
    spec = ModelSpec.model_validate(meta["model_spec"])
    model = build_for_data(spec, task=data.task, num_classes=data.num_classes, input_shape=data.input_shape,
                           has_mask=False)  # fmt: skip
    set_weights(model, arrays)
    model.eval()
    pool = federated_membership_pool(hospitals, seed=settings.seed)
    trainer, description = None, None
    if settings.attack == "lira":
        trainer, description = make_federated_shadow_trainer(config, hospitals, pool, privacy=scenario.privacy,
                                                             policy=policy)  # fmt: skip
    members, nonmembers = pool.members, pool.nonmembers
    return membership_audit(
        model, members=(members.inputs[0], members.targets), nonmembers=(nonmembers.inputs[0], nonmembers.targets),
        shadow_trainer=trainer, shadow_training=description, n_shadow=settings.shadows,
        n_bootstrap=settings.bootstrap, seed=settings.seed,
    )  # fmt: skip


def release_model(
    scenario: Any,
    hospitals: list[SiteData],
    config: RunConfig,
    history: MetricsHistory,
    out: Path,
    *,
    ledger_dir: Path,
    policy: SitePolicy,
    policy_label: str,
) -> ReleaseOutcome:
    """Check ε against the ledgers, gate the final model, export it if allowed, write the one report.

    The gate, the export, the report and the audit log's ``release`` entry are ``fedcare
    release``'s (:func:`fedcare.server.release.release`); this step adds what only a simulation
    has: every hospital's ledger and data, and shadows trained as federations.

    Parameters
    ----------
    scenario : Scenario
        The scenario (``release`` settings, DP settings for the LiRA shadows).
    hospitals : list of SiteData
        The virtual hospitals (the audit's members and non-members).
    config : RunConfig
        The run the ServerApp ran (artefact key, audit key, study).
    history : MetricsHistory
        The run's rounds as the ServerApp recorded them (``history.json``).
    out : Path
        The scenario's output folder: receives ``final_model.npz`` (released only) and the report.
    ledger_dir : Path
        The virtual hospitals' ledger folder.
    policy : SitePolicy
        Every virtual hospital's policy (the LiRA shadows' sites run under it).
    policy_label : str
        How the sites' policy is described in the report.

    Raises
    ------
    LedgerMismatchError
        When a site's reported ε differs from its ledger.
    fedcare.server.checkpoint.CheckpointError
        When the final model cannot be read (tampered, wrong key).
    """
    assert config.checkpoint_dir is not None
    settings: ReleaseSettings = scenario.release
    source, key, expected = final_model_file(config)
    arrays, meta = load_model_file(source, key=key, expected=expected)
    sites = site_privacy(history)
    check_against_ledgers(sites, ledger_dir, config.study)

    membership: MembershipAuditResult | None = None
    gate: ReleaseGate | None = None
    if settings.max_membership_auc is not None:
        gate = ReleaseGate(max_auc=settings.max_membership_auc, basis=settings.basis, power=settings.power)
        membership = _membership(settings, config, scenario, hospitals, arrays, meta, policy)
    decision = decide_release(gate, membership, override_inconclusive=settings.override_inconclusive,
                              subject=f"scenario {scenario.name!r}",
                              override_by="the scenario's [release] override_inconclusive")  # fmt: skip
    audit = RunAudit.open(config)
    try:
        report = build_privacy_report(
            config, history, model_sha256=None, sites=sites, secure_aggregation=config.secure_aggregation,
            policy_label=policy_label, client_level=client_level_privacy(config, history), audit=audit,
        )  # fmt: skip
        done = release(arrays, meta, source=source, out_dir=out, decision=decision, membership=membership,
                       report=report, audit=audit, round_=history.last_complete)  # fmt: skip
    finally:
        audit.close()
    gate_record = None
    if decision.gate is not None and membership is not None:
        gate_record = {**decision.gate.model_dump(), "attacks": [a.model_dump() for a in membership.attacks]}
    return ReleaseOutcome(
        released=decision.released, model=None if done.model is None else str(done.model), reason=decision.reason,
        gate=gate_record, report=None if done.report is None else str(done.report),
        encrypted_model=str(source) if key is not None else None,
    )  # fmt: skip
