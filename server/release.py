"""``fedcare release``: export a deployment's encrypted final model only if its membership audits pass.

The coordinator cannot audit membership itself (it holds no patient data). The flow:

1. the run writes ``final_model.npz.enc`` (encrypted), ``privacy_report.json`` and ``audit.jsonl``
   into its ``checkpoint-dir``;
2. whoever holds both the artefact key and a site's data (the site, given the key for the
   audit, or an auditing site the study agreed on) runs ``fedcare audit membership --model
   final_model.npz.enc --key KEY --site SITE.toml`` and returns the JSON it writes (attack AUCs
   and the model file's SHA-256; no patient data);
3. the coordinator runs ``fedcare release --model final_model.npz.enc --key KEY --membership
   membership_SITE.json [...] --max-auc 0.6 --out exported/`` which checks that every audit is
   of this very file, applies :class:`~fedcare.privacy.membership.ReleaseGate` to all of them
   together, and only then writes the unencrypted ``exported/final_model.npz``, the privacy
   report with the gate verdict (from ``--report``, the run's report) and a ``release`` entry in
   the audit log (``--audit-key`` / ``--audit-log``). A blocked release writes no model, records
   ``gate_passed = false`` and exits 1.

The gate has three verdicts (:meth:`~fedcare.privacy.membership.ReleaseGate.decide`): *pass*,
*block*, and *inconclusive* when the audits hold too few non-members to test ``--max-auc`` at all
(their minimum detectable AUC excess is larger than ``max-auc − 0.5``). An inconclusive audit
blocks the export like a failed one, unless ``--override-inconclusive "REASON"`` is given: then
the model is exported, with a warning, and the reason is written into the privacy report and the
audit log's ``release`` entry (``gate_verdict = "inconclusive"``, ``override_reason``). A *block*
cannot be overridden.

The release core (:func:`decide_release`, :func:`release`) is shared with the simulation's
release step (``simulations.release``), which audits the model on the virtual hospitals' data
itself and builds the one privacy report of a simulation from the run's history.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from ..privacy.artefacts import KeyFileError, sha256_file
from ..privacy.audit_log import GENESIS_HASH, AuditError, AuditLog, load_signing_key

if TYPE_CHECKING:
    import numpy as np

    from ..privacy.membership import MembershipAuditResult, ReleaseGate
    from ..privacy.report import GateSummary, PrivacyReport
    from .safekeeping import RunAudit

# numpy, torch and scikit-learn (.checkpoint, .safekeeping, ..privacy.membership, ..privacy.report)
# load inside the functions that use them: `fedcare --help` imports this module.

__all__ = [
    "Release",
    "ReleaseDecision",
    "ReleaseInputError",
    "ReleaseResult",
    "decide_release",
    "release",
    "release_command",
    "release_model_file",
    "released_report",
]

logger = logging.getLogger(__name__)
_out = Console()
_err = Console(stderr=True)


class ReleaseInputError(ValueError):
    """A membership audit file is unreadable, or audits another model than the one to release."""


class ReleaseResult(dict):  # type: ignore[type-arg]
    """What :func:`release_model_file` decided: ``released``, ``model``, ``report``, ``reason``, ``auc``, ``verdict``, ``override_reason``."""


def _read_audits(paths: list[Path], model_sha256: str) -> MembershipAuditResult:
    """Return every attack of the audit files, refusing files that audited another model."""
    from ..privacy.membership import AttackResult, MembershipAuditResult  # noqa: PLC0415 - torch, sklearn

    attacks: list[AttackResult] = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
            found = [AttackResult.model_validate(a) for a in record["attacks"]]
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            raise ReleaseInputError(
                f"membership audit {path} is unreadable ({type(exc).__name__}: {exc}); rerun "
                "`fedcare audit membership` for this model"
            ) from None
        if record.get("model_sha256") != model_sha256:
            raise ReleaseInputError(
                f"membership audit {path} is of a model with SHA-256 {record.get('model_sha256')}, not of "
                f"the model to release ({model_sha256}); audit this very file with `fedcare audit "
                "membership --model ... --key ...`"
            )
        attacks.extend(found)
    if not attacks:
        raise ReleaseInputError("give at least one --membership audit file")
    return MembershipAuditResult(attacks=tuple(attacks))


@dataclass(frozen=True)
class ReleaseDecision:
    """What the release gate decided about one model.

    Attributes
    ----------
    released : bool
        Whether the model may be exported (the gate passed, none is set, or an inconclusive
        verdict was overridden).
    reason : str or None
        Why not (None when released).
    gate : GateSummary or None
        The gate's settings, verdict and any override (None without a gate).
    worst_auc : float or None
        The worst attack's AUC on the gate's basis (upper bound or estimate; None without a gate).
    """

    released: bool
    reason: str | None
    gate: GateSummary | None
    worst_auc: float | None


@dataclass(frozen=True)
class Release:
    """What :func:`release` wrote: the exported model (None when blocked) and the report (None without one)."""

    model: Path | None
    report: Path | None


def decide_release(
    gate: ReleaseGate | None,
    membership: MembershipAuditResult | None,
    *,
    override_inconclusive: str | None,
    subject: str,
    override_by: str = "explicit override",
) -> ReleaseDecision:
    """Apply the gate to the membership audit; an inconclusive verdict passes only by a logged override.

    Without a gate (or an audit) the model is released. ``subject`` and ``override_by`` name the
    model and where the override came from in the PRIVACY WARNING an override logs.
    """
    from ..privacy.report import GateSummary  # noqa: PLC0415 - keep `fedcare --help` fast

    if gate is None or membership is None:
        return ReleaseDecision(released=True, reason=None, gate=None, worst_auc=None)
    decision = gate.decide(membership)
    reason: str | None = None if decision.passed else decision.reason
    override: str | None = None
    if decision.verdict == "inconclusive" and override_inconclusive is not None:
        override = override_inconclusive.strip()
        message = (f"PRIVACY WARNING: {subject}: releasing the model although its membership audit is "
                   f"inconclusive, by {override_by} ({override}): {decision.reason}")  # fmt: skip
        warnings.warn(message, stacklevel=2)
        logger.warning("%s", message)
        reason = None
    worst = membership.worst()
    return ReleaseDecision(
        released=reason is None, reason=reason, gate=GateSummary.from_decision(decision, override_reason=override),
        worst_auc=worst.ci_high if gate.basis == "upper" else worst.auc,
    )


def released_report(
    base: PrivacyReport,
    *,
    model_sha256: str,
    membership: MembershipAuditResult | None,
    gate: GateSummary | None,
    audit: RunAudit,
) -> PrivacyReport:
    """Return ``base`` stating the released (or withheld) model's digest, the audit, the gate and the log head."""
    head = audit.head_hash
    logged = head is not None and head != GENESIS_HASH
    return base.model_validate({
        **base.model_dump(), "model_sha256": model_sha256,
        "membership": None if membership is None else membership.model_dump(),
        "gate": None if gate is None else gate.model_dump(),
        "audit_log_head": head if logged else None, "audit_log_entries": audit.entries if logged else None,
    })  # fmt: skip


def release(
    arrays: Mapping[str, np.ndarray],
    meta: dict[str, Any],
    *,
    source: Path,
    out_dir: Path,
    decision: ReleaseDecision,
    membership: MembershipAuditResult | None,
    report: PrivacyReport | None,
    audit: RunAudit,
    round_: int,
) -> Release:
    """Export the model unencrypted to ``out_dir`` if released, write the report, record the release.

    A withheld model leaves no ``final_model.npz`` in ``out_dir``; the report (from ``report``, with
    :func:`released_report`) then names the digest of ``source``, the file that was not released.
    The audit log gets a ``release`` entry either way.
    """
    from ..privacy.report import write_report  # noqa: PLC0415 - keep `fedcare --help` fast
    from .checkpoint import FINAL_MODEL_FILE, save_model_file  # noqa: PLC0415 - torch

    out_dir.mkdir(parents=True, exist_ok=True)
    exported = out_dir / FINAL_MODEL_FILE
    if decision.released:
        save_model_file(exported, arrays, meta)  # the export: unencrypted, for use outside the federation
    else:
        exported.unlink(missing_ok=True)  # nothing in the export folder may look released
        logger.error("%s", decision.reason)
    model_path = exported if decision.released else source
    report_path: Path | None = None
    if report is not None:
        final = released_report(report, model_sha256=sha256_file(model_path), membership=membership,
                                gate=decision.gate, audit=audit)  # fmt: skip
        report_path, _ = write_report(final, out_dir, overwrite=True)
    gate = decision.gate
    audit.release(
        round_=round_, model_path=model_path,
        report_sha256=sha256_file(report_path) if report_path is not None else None,
        membership_auc=None if decision.worst_auc is None else min(max(decision.worst_auc, 0.0), 1.0),
        gate_passed=None if gate is None else gate.passed, gate_verdict=None if gate is None else gate.verdict,
        override_reason=None if gate is None else gate.override_reason,
    )  # fmt: skip
    return Release(model=exported if decision.released else None, report=report_path)


def release_model_file(
    model: Path,
    *,
    key: str | None,
    audits: list[Path],
    max_auc: float,
    out_dir: Path,
    basis: Literal["upper", "point"] = "upper",
    report: Path | None = None,
    audit_key: Path | None = None,
    audit_log: Path | None = None,
    override_inconclusive: str | None = None,
) -> ReleaseResult:
    """Gate ``model`` on the membership audits; export it unencrypted to ``out_dir`` only if it passes.

    ``override_inconclusive`` (a reason, logged) releases a model whose audit is inconclusive;
    it never releases a blocked one. The result's ``verdict`` is the gate's.

    Raises
    ------
    ReleaseInputError
        When an audit file is unreadable or of another model.
    CheckpointError
        When the model cannot be decrypted or authenticated.
    """
    from ..privacy.membership import ReleaseGate  # noqa: PLC0415 - torch, sklearn: keep --help fast
    from ..privacy.report import load_report  # noqa: PLC0415
    from .checkpoint import load_model_file  # noqa: PLC0415
    from .safekeeping import RunAudit, load_artefact_key  # noqa: PLC0415

    gate = ReleaseGate(max_auc=max_auc, basis=basis)
    if override_inconclusive is not None and not override_inconclusive.strip():
        raise ReleaseInputError("--override-inconclusive needs a reason (it is written to the report and the audit log)")
    if audit_key is not None and audit_log is None:
        raise ReleaseInputError("--audit-key needs --audit-log (the run's audit.jsonl)")
    membership = _read_audits(audits, sha256_file(model))
    arrays, meta = load_model_file(model, key=load_artefact_key(key))
    decision = decide_release(gate, membership, override_inconclusive=override_inconclusive, subject=str(model))
    base = load_report(report) if report is not None else None
    log = AuditLog(audit_log, load_signing_key(audit_key)) if audit_key is not None and audit_log is not None else None
    audit = RunAudit(log)
    try:
        done = release(arrays, meta, source=model, out_dir=out_dir, decision=decision, membership=membership,
                       report=base, audit=audit, round_=base.round if base is not None else 0)  # fmt: skip
    finally:
        audit.close()
    override = decision.gate.override_reason if decision.gate is not None else None
    return ReleaseResult(released=decision.released, model=None if done.model is None else str(done.model),
                         report=None if done.report is None else str(done.report), reason=decision.reason,
                         auc=decision.worst_auc, verdict=None if decision.gate is None else decision.gate.verdict,
                         override_reason=override)  # fmt: skip


def release_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="The run's final model (final_model.npz.enc).")],
    membership: Annotated[
        list[Path], typer.Option("--membership", help="A `fedcare audit membership` result JSON of this model (repeatable).")
    ],
    max_auc: Annotated[float, typer.Option("--max-auc", help="Largest attack AUC allowed (upper 95% bound by default).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the exported (unencrypted) model and report.")],
    key: Annotated[
        Optional[str], typer.Option("--key", help="Artefact key of the model: a key file, 'env' or 'env:NAME'.")
    ] = None,
    basis: Annotated[str, typer.Option("--basis", help="'upper' (95% bound) or 'point' (the estimate).")] = "upper",
    report: Annotated[
        Optional[Path], typer.Option("--report", help="The run's privacy_report.json: rewritten with the gate's verdict.")
    ] = None,
    audit_key: Annotated[Optional[Path], typer.Option("--audit-key", help="The coordinator's audit signing key.")] = None,
    audit_log: Annotated[Optional[Path], typer.Option("--audit-log", help="The run's audit log: gets a release entry.")] = None,
    override_inconclusive: Annotated[
        Optional[str], typer.Option("--override-inconclusive", help="Release despite an INCONCLUSIVE audit (too few "
                                    "non-members for --max-auc); the reason given is logged. Never overrides a block.")
    ] = None,
) -> None:
    """Release a model: export it unencrypted only if its membership-inference audits pass the gate."""
    from .checkpoint import CheckpointError  # noqa: PLC0415 - torch: keep `fedcare --help` fast

    try:
        if basis not in ("upper", "point"):
            raise ReleaseInputError(f"--basis must be 'upper' or 'point', got {basis!r}")
        result = release_model_file(model, key=key, audits=membership, max_auc=max_auc, out_dir=out,
                                    basis=basis, report=report, audit_key=audit_key, audit_log=audit_log,
                                    override_inconclusive=override_inconclusive)  # type: ignore[arg-type]  # fmt: skip
    except (ReleaseInputError, CheckpointError, KeyFileError, AuditError, ValidationError, ValueError, OSError) as exc:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if not result["released"]:
        _err.print(f"[bold red]{result['reason']}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if result["override_reason"] is not None:
        _err.print(f"[bold yellow]released although the membership audit is INCONCLUSIVE, by override: "
                   f"{result['override_reason']}[/]", highlight=False, soft_wrap=True)  # fmt: skip
        _out.print(f"released {result['model']} (override of an inconclusive audit; worst attack AUC "
                   f"{result['auc']:.3f})" + (f"; report {result['report']}" if result["report"] else ""),
                   highlight=False, soft_wrap=True)  # fmt: skip
        return
    _out.print(f"released {result['model']} (worst attack AUC {result['auc']:.3f} ≤ {max_auc:.3f})"
               + (f"; report {result['report']}" if result["report"] else ""), highlight=False, soft_wrap=True)
