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
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from ..privacy.artefacts import KeyFileError, sha256_file
from ..privacy.audit import AuditError, AuditLog, load_signing_key
from ..privacy.membership import AttackResult, MembershipAuditResult, ReleaseGate
from ..privacy.report import GateSummary, load_report, write_report
from .checkpoint import FINAL_MODEL_FILE, CheckpointError, load_model_file, save_model_file
from .safekeeping import RunAudit, load_artefact_key

__all__ = ["ReleaseInputError", "ReleaseResult", "release_command", "release_model_file"]

logger = logging.getLogger(__name__)
_out = Console()
_err = Console(stderr=True)


class ReleaseInputError(ValueError):
    """A membership audit file is unreadable, or audits another model than the one to release."""


class ReleaseResult(dict):  # type: ignore[type-arg]
    """What :func:`release_model_file` decided: ``released``, ``model``, ``report``, ``reason``, ``auc``, ``verdict``, ``override_reason``."""


def _read_audits(paths: list[Path], model_sha256: str) -> MembershipAuditResult:
    """Return every attack of the audit files, refusing files that audited another model."""
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
    gate = ReleaseGate(max_auc=max_auc, basis=basis)
    if override_inconclusive is not None and not override_inconclusive.strip():
        raise ReleaseInputError("--override-inconclusive needs a reason (it is written to the report and the audit log)")
    model_sha = sha256_file(model)
    membership = _read_audits(audits, model_sha)
    arrays, meta = load_model_file(model, key=load_artefact_key(key))
    decision = gate.decide(membership)
    reason: str | None = None if decision.passed else decision.reason
    override: str | None = None
    if decision.verdict == "inconclusive" and override_inconclusive is not None:
        override = override_inconclusive.strip()
        message = (f"PRIVACY WARNING: releasing {model} although its membership audit is inconclusive, by "
                   f"explicit override ({override}): {decision.reason}")  # fmt: skip
        warnings.warn(message, stacklevel=2)
        logger.warning("%s", message)
        reason = None
    worst = membership.worst()
    value = worst.ci_high if basis == "upper" else worst.auc
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = out_dir / FINAL_MODEL_FILE
    if reason is None:
        save_model_file(exported, arrays, meta)
    else:
        exported.unlink(missing_ok=True)  # nothing in the export folder may look released
    log = None
    if audit_key is not None:
        if audit_log is None:
            raise ReleaseInputError("--audit-key needs --audit-log (the run's audit.jsonl)")
        log = AuditLog(audit_log, load_signing_key(audit_key))
    audit = RunAudit(log)
    report_path: Path | None = None
    round_ = 0
    try:
        if report is not None:
            base = load_report(report)
            round_ = base.round
            updated = base.model_validate({
                **base.model_dump(), "model_sha256": sha256_file(exported) if reason is None else model_sha,
                "membership": membership.model_dump(),
                "gate": GateSummary.from_decision(decision, override_reason=override).model_dump(),
                "audit_log_head": audit.head_hash, "audit_log_entries": audit.entries,
            })  # fmt: skip
            report_path, _ = write_report(updated, out_dir, overwrite=True)
        audit.release(
            round_=round_,
            model_path=exported if reason is None else model,
            report_sha256=sha256_file(report_path) if report_path is not None else None,
            membership_auc=min(max(value, 0.0), 1.0), gate_passed=decision.passed,
            gate_verdict=decision.verdict, override_reason=override,
        )  # fmt: skip
    finally:
        audit.close()
    return ReleaseResult(released=reason is None, model=str(exported) if reason is None else None,
                         report=None if report_path is None else str(report_path), reason=reason, auc=value,
                         verdict=decision.verdict, override_reason=override)  # fmt: skip


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
