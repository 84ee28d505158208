"""What the coordinator keeps about a run: encrypted artefacts, the signed audit log, the privacy report.

The study lifecycle (:class:`~fedcare.server.lifecycle.Study`, both aggregation paths) and the
release step (``server.release``) use this module to

- load the artefact key named by ``RunConfig.artefact_key`` (:func:`load_artefact_key`) and bind
  each checkpoint and final model to the run (:func:`artefact_metadata`: study, kind, round and
  :func:`config_sha256` as AES-GCM associated data); encrypted files end in ``.enc``;
- append to the signed, hash-chained audit log (:class:`RunAudit`, a no-op without
  ``RunConfig.audit_key``): run start, each round (sites, their manifest digests, ε per site,
  SecAgg on/off, L2 norm of the aggregate update), refusals, failed rounds, checkpoints, releases. Only
  identifiers, digests and numbers are logged: a refusal's reason is logged only for budget,
  ledger and policy refusals (site-written sentences about ε, σ, cohort size); a data-validation
  refusal or a crash is logged with a fixed sentence, since its text could quote a data value;
- build the privacy report of the final model from what the sites reported
  (:func:`build_privacy_report`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from ..models import wire
from ..privacy.artefacts import DEFAULT_KEY_ENV, ArtefactKey, ArtefactMetadata, sha256_file
from ..privacy.audit_log import GENESIS_HASH, AuditLog, load_signing_key
from ..privacy.membership import MembershipAuditResult
from ..privacy.report import (
    TRUST_ASSUMPTIONS,
    ClientLevelPrivacy,
    GateSummary,
    PolicyCheck,
    PrivacyReport,
    SitePrivacy,
)
from .checkpoint import ENCRYPTED_SUFFIX, FINAL_MODEL_FILE, MetricsHistory, RoundRecord
from .config import RunConfig

__all__ = [
    "AUDIT_LOG_FILE",
    "FinalModelFile",
    "NODE_POLICY_LABEL",
    "RunAudit",
    "artefact_metadata",
    "artefact_path",
    "audit_log_path",
    "build_privacy_report",
    "config_sha256",
    "final_model_file",
    "load_artefact_key",
    "policy_checks",
    "refusal_rule",
    "run_identity",
    "safe_name",
    "site_privacy",
    "update_norm",
    "warn_plaintext",
]

logger = logging.getLogger(__name__)

AUDIT_LOG_FILE: Final = "audit.jsonl"
NODE_POLICY_LABEL: Final = "each node's own policy (applied at the site; outcome as the node reported it)"
#: run-config keys left out of the configuration hash: where files go and how to resume, not the study
_NOT_HASHED: Final = frozenset({"resume", "checkpoint-dir", "artefact-key", "audit-key", "audit-log"})
_NAME_BAD = re.compile(r"[^A-Za-z0-9._:-]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_POLICY_RULE = re.compile(r"\[(?P<rule>[a-z_]+)\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: refusal code -> rule logged; reasons of the codes in _REASON_LOGGED are the site's own sentences
_RULES: Final[Mapping[int, str]] = {
    wire.ERROR_DATA_INVALID: "data_invalid",
    wire.ERROR_BUDGET_SPENT: "budget_spent",
    wire.ERROR_LEDGER: "ledger_unusable",
    wire.ERROR_POLICY: "policy",
    wire.ERROR_UPDATE_REFUSED: "update_refused",
}
#: the coordinator's own update-check reasons name arrays, shapes, counts and norms, never values
_REASON_LOGGED: Final = frozenset({wire.ERROR_BUDGET_SPENT, wire.ERROR_LEDGER, wire.ERROR_POLICY,
                                   wire.ERROR_UPDATE_REFUSED})
NO_DIGEST: Final = "0" * 64  # a site that sent no manifest digest (documented in docs/privacy.md)


def safe_name(text: str) -> str:
    """Return ``text`` as an identifier the audit log and artefact headers accept (``[A-Za-z0-9._:-]``)."""
    cleaned = _NAME_BAD.sub("_", str(text))[:128]
    return cleaned or "unnamed"


def load_artefact_key(spec: str | None) -> ArtefactKey | None:
    """Return the artefact key ``spec`` names: a key file, ``"env"`` or ``"env:NAME"``; None for None.

    Raises
    ------
    fedcare.privacy.artefacts.KeyFileError
        When the file is missing, readable by others, or holds no 32-byte key, or the variable is unset.
    """
    if spec is None or not spec.strip():
        return None
    spec = spec.strip()
    if spec == "env":
        return ArtefactKey.from_env(DEFAULT_KEY_ENV)
    if spec.startswith("env:"):
        return ArtefactKey.from_env(spec.removeprefix("env:"))
    return ArtefactKey.from_file(Path(spec).expanduser())


def config_sha256(config: RunConfig) -> str:
    """Return the SHA-256 of the run configuration (without where files go and the resume flag)."""
    values = {k: v for k, v in config.to_run_config().items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def artefact_metadata(config: RunConfig, kind: str, round_: int | None) -> ArtefactMetadata:
    """Return the metadata bound to an artefact of this run: study, kind, round, configuration hash."""
    return ArtefactMetadata(study=safe_name(config.study), kind=kind, round=round_, config_sha256=config_sha256(config))


def artefact_path(folder: Path, name: str, key: ArtefactKey | None) -> Path:
    """Return where artefact ``name`` goes: ``name.enc`` when encrypted, ``name`` otherwise."""
    return folder / (f"{name}{ENCRYPTED_SUFFIX}" if key is not None else name)


class FinalModelFile(NamedTuple):
    """A run's final model file, the artefact key it is encrypted under (None: plaintext), the binding it must carry."""

    path: Path
    key: ArtefactKey | None
    expected: dict[str, str] | None


def final_model_file(config: RunConfig) -> FinalModelFile:
    """Return where the run's final model is and how to open it: ``load_model_file(path, key=key, expected=expected)``."""
    assert config.checkpoint_dir is not None
    key = load_artefact_key(config.artefact_key)
    expected = {"study": safe_name(config.study), "kind": "model"} if key is not None else None
    return FinalModelFile(artefact_path(config.checkpoint_dir, FINAL_MODEL_FILE, key), key, expected)


def audit_log_path(config: RunConfig) -> Path | None:
    """Return the run's audit log path (None without an audit key)."""
    if config.audit_key is None:
        return None
    if config.audit_log is not None:
        return config.audit_log
    assert config.checkpoint_dir is not None  # RunConfig refuses audit-key without either
    return config.checkpoint_dir / AUDIT_LOG_FILE


def update_norm(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of the aggregate update: all tensors of ``after - before`` as one vector."""
    total = 0.0
    for name, new in after.items():
        old = before.get(name)
        diff = np.asarray(new, dtype=np.float64) - (np.asarray(old, dtype=np.float64) if old is not None else 0.0)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def _finite(value: Any) -> float | None:
    """Return ``value`` as a float when it is a finite number, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _one_line(text: str, limit: int = 1000) -> str:
    """Return ``text`` on one line without control characters, at most ``limit`` characters."""
    return _CONTROL.sub(" ", text).strip()[:limit] or "(no reason given)"


def refusal_rule(code: int, reason: str) -> tuple[str, str]:
    """Return the (rule, reason) the audit log records for a refusal with this code and reason."""
    rule = _RULES.get(code, f"error_{code}")
    if code == wire.ERROR_POLICY and (match := _POLICY_RULE.search(reason)):
        rule = f"policy:{match.group('rule')}"
    if code in _REASON_LOGGED:
        return rule, _one_line(reason)
    if code == wire.ERROR_DATA_INVALID:
        return rule, "the site's data failed validation or does not fit the model (details stay in the site's log)"
    return rule, f"no result (Flower error code {code}); see the site's and the server's logs"


class RunAudit:
    """The server's signed audit trail of one run; every method is a no-op without an audit key.

    Parameters
    ----------
    log : AuditLog or None
        The open log (None: nothing is recorded).
    """

    def __init__(self, log: AuditLog | None) -> None:
        self.log = log

    @classmethod
    def open(cls, config: RunConfig) -> RunAudit:
        """Open (or create) the run's audit log, verifying what is there; a no-op without ``audit_key``.

        Raises
        ------
        fedcare.privacy.audit_log.AuditLogCorrupt
            When an existing log fails verification (nothing is appended to it).
        fedcare.privacy.artefacts.KeyFileError
            When the signing key cannot be read.
        """
        path = audit_log_path(config)
        if path is None or config.audit_key is None:
            return cls(None)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = AuditLog(path, load_signing_key(config.audit_key))
        logger.info("audit log %s open (%d entries so far)", path, log.entries)
        return cls(log)

    @property
    def enabled(self) -> bool:
        """Return whether entries are recorded."""
        return self.log is not None

    @property
    def head_hash(self) -> str | None:
        """Return the hash of the last entry (None without a log)."""
        return None if self.log is None else self.log.head_hash

    @property
    def entries(self) -> int | None:
        """Return the number of entries (None without a log)."""
        return None if self.log is None else self.log.entries

    def run_start(self, config: RunConfig, *, run_id: str, app_hash: str | None) -> None:
        """Record the start (or resumption) of the run: study, configuration hash, app hash."""
        if self.log is None:
            return
        self.log.append(
            "run_start", run_id=safe_name(run_id), study=safe_name(config.study), config_sha256=config_sha256(config),
            app_hash=app_hash if app_hash and _SHA256.match(app_hash) else None,
        )

    def round(self, record: RoundRecord, *, aggregate_update_norm: float, secure_aggregation: bool) -> None:
        """Record a complete round: each training site's manifest digest and ε, SecAgg, update norm."""
        if self.log is None or not record.site_train:
            return
        sites = []
        for site, metrics in sorted(record.site_train.items()):
            digest = str(record.site_info.get(site, {}).get("manifest_sha256", ""))
            delta = _finite(metrics.get(wire.DELTA))
            sites.append({
                "site": safe_name(site),
                "manifest_sha256": digest if _SHA256.match(digest) else NO_DIGEST,
                "epsilon_spent": _finite(metrics.get(wire.EPSILON)),
                "delta": delta if delta is not None and 0.0 < delta < 1.0 else None,
            })  # fmt: skip
        self.log.append(
            "round", round=record.round, sites=sites, secure_aggregation=bool(secure_aggregation),
            aggregate_update_norm=float(aggregate_update_norm),
        )

    def refusals(self, record: RoundRecord) -> None:
        """Record every refusal (error reply) of a round with its rule and a loggable reason."""
        if self.log is None:
            return
        for refusal in record.refusals:
            rule, reason = refusal_rule(int(refusal.get("code", 0)), str(refusal.get("reason", "")))
            self.log.append(
                "refusal", site=safe_name(str(refusal.get("site", "unknown"))), round=record.round,
                rule=f"{refusal.get('stage', 'train')}.{rule}", reason=reason,
            )

    def round_failed(
        self, round_: int, *, stage: str, failures: Sequence[tuple[str, int, str]], secure_aggregation: bool
    ) -> None:
        """Record a round that failed and stops the run: each failing site as a refusal, then the failure.

        Parameters
        ----------
        round_ : int
            The round that failed (the model was not updated).
        stage : str
            Where it failed (a SecAgg+ stage such as ``collect-masked-vectors``, or ``aggregate``).
        failures : sequence of (site, code, reason)
            Each site's error reply; the reason is logged only where :func:`refusal_rule` allows.
        secure_aggregation : bool
            Whether the round ran under SecAgg+.
        """
        if self.log is None:
            return
        stage_name = safe_name(stage)
        for site, code, reason in failures:
            rule, text = refusal_rule(int(code), str(reason))
            self.log.append("refusal", site=safe_name(site), round=round_, rule=f"{stage_name}.{rule}", reason=text)
        self.log.append(
            "round_failed", round=round_, stage=stage_name, failures=len(failures),
            secure_aggregation=bool(secure_aggregation),
            reason=f"the round failed in its {stage_name} stage ({len(failures)} site failure(s)); the model was "
            "NOT updated and the run stopped",
        )

    def checkpoint(self, round_: int, path: Path, key: ArtefactKey | None) -> None:
        """Record a checkpoint (or final model) file written: round, path, SHA-256, key id."""
        if self.log is None:
            return
        self.log.append(
            "checkpoint", round=round_, path=str(path), sha256=sha256_file(path),
            key_id=None if key is None else key.key_id,
        )

    def release(
        self,
        *,
        round_: int,
        model_path: Path,
        report_sha256: str | None,
        membership_auc: float | None,
        gate_passed: bool | None,
        gate_verdict: str | None = None,
        override_reason: str | None = None,
    ) -> None:
        """Record a release decision: the exported model's digest, the report's, the audit AUC, the gate and any override."""
        if self.log is None:
            return
        extra = {k: v for k, v in (("gate_verdict", gate_verdict), ("override_reason", override_reason)) if v is not None}
        self.log.append(
            "release", round=round_, model_sha256=sha256_file(model_path), report_sha256=report_sha256,
            membership_auc=membership_auc, gate_passed=gate_passed, **extra,
        )

    def close(self) -> None:
        """Close the log (releases its lock)."""
        if self.log is not None:
            self.log.close()


def run_identity(grid: Any, config: RunConfig) -> tuple[str, str | None]:
    """Return (run id, app hash) for the audit log: Flower's run id and FAB hash where the grid knows them."""
    try:
        run = grid.run
        run_id = f"flwr-{int(run.run_id)}"
        fab_hash = str(run.fab_hash or "")
    except Exception:  # noqa: BLE001 - grids without a Run (in-process tests) have none
        run_id, fab_hash = "", ""
    if not run_id:
        run_id = f"{safe_name(config.study)}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    return run_id, fab_hash if _SHA256.match(fab_hash) else None


def site_privacy(history: MetricsHistory) -> list[SitePrivacy]:
    """Return each training site's ε, δ, accountant, σ and C as it last reported them, and its rounds.

    A DP site that did not name its accountant (an older node, another reply path) is listed with
    accountant ``unreported``.
    """
    last: dict[str, tuple[dict[str, float], dict[str, Any]]] = {}
    rounds: dict[str, int] = {}
    for record in history.completed:
        for site, metrics in record.site_train.items():
            last[site] = (metrics, record.site_info.get(site, {}))
            rounds[site] = rounds.get(site, 0) + 1
    latest = _latest_privacy(history)
    out = []
    for site in sorted(last):
        metrics, info = last[site]
        spent = latest.get(site, metrics)  # the ledger only grows: its latest reply, train or evaluate
        epsilon, delta = _finite(spent.get(wire.EPSILON)), _finite(metrics.get(wire.DELTA))
        # a DP site reports a finite ε and 0 < δ < 1; a site without DP reports ε = inf, δ = 0
        dp = epsilon is not None and delta is not None and 0.0 < delta < 1.0
        accountant = safe_name(str(info["accountant"])) if info.get("accountant") else "unreported"
        out.append(SitePrivacy(
            site=safe_name(site), dp_enabled=dp, epsilon=epsilon if dp else None, delta=delta if dp else None,
            accountant=accountant if dp else None,
            noise_multiplier=_finite(metrics.get("noise-multiplier")) if dp else None,
            max_grad_norm=_finite(info.get("max_grad_norm")) if dp else None, rounds=rounds[site],
            **_mechanism_fields(spent, dp),
        ))  # fmt: skip
    return out


def _latest_privacy(history: MetricsHistory) -> dict[str, dict[str, float]]:
    """Return per site the reply (train or evaluate) reporting the most ε spent: its latest ledger state."""
    out: dict[str, dict[str, float]] = {}
    for record in history.completed:
        for per_site in (record.site_train, record.site_evaluate):
            for site, metrics in per_site.items():
                eps = metrics.get(wire.EPSILON)
                if eps is not None and (site not in out or float(eps) >= float(out[site][wire.EPSILON])):
                    out[site] = metrics
    return out


def _mechanism_fields(metrics: dict[str, float], dp: bool) -> dict[str, Any]:
    """Return the report's ε per mechanism and evaluation counts from a site's reply (when it sent them)."""
    out: dict[str, Any] = {}
    if dp:
        for key, name in ((wire.EPSILON_TRAINING, "epsilon_training"), (wire.EPSILON_COUNT, "epsilon_count"),
                          (wire.EPSILON_EVALUATION, "epsilon_evaluation")):
            out[name] = _finite(metrics.get(key))
    for key, name in ((wire.EVALUATION_QUERIES, "evaluation_queries"), (wire.EVALUATION_EXACT_QUERIES, "exact_evaluations")):
        value = metrics.get(key)
        out[name] = int(value) if value is not None and math.isfinite(float(value)) else None
    return out


def policy_checks(history: MetricsHistory, label: str = NODE_POLICY_LABEL) -> list[PolicyCheck]:
    """Return per site: training rounds asked (trained or refused) and the rounds its node refused."""
    asked: dict[str, int] = {}
    refused: dict[str, int] = {}
    for record in history.rounds:
        for site in record.site_train:
            asked[site] = asked.get(site, 0) + 1
        for refusal in record.refusals:
            if refusal.get("stage") == "train" and refusal.get("code") in (wire.ERROR_POLICY, wire.ERROR_BUDGET_SPENT):
                site = str(refusal.get("site"))
                asked[site] = asked.get(site, 0) + 1
                refused[site] = refused.get(site, 0) + 1
    return [
        PolicyCheck(site=safe_name(s), policy=label, rounds_checked=asked[s], refusals=refused.get(s, 0))
        for s in sorted(asked)
    ]


def build_privacy_report(
    config: RunConfig,
    history: MetricsHistory,
    *,
    model_sha256: str | None,
    secure_aggregation: bool = False,
    client_level: ClientLevelPrivacy | None = None,
    sites: Sequence[SitePrivacy] | None = None,
    policy_label: str = NODE_POLICY_LABEL,
    membership: MembershipAuditResult | None = None,
    gate: GateSummary | None = None,
    audit: RunAudit | None = None,
    run_id: str | None = None,
) -> PrivacyReport | None:
    """Return the privacy report of the run's model (None when no site trained in a complete round).

    ``sites`` defaults to :func:`site_privacy` (values as the sites reported them);
    ``secure_aggregation`` and ``client_level`` are what the server's aggregation path used.
    """
    per_site = list(sites) if sites is not None else site_privacy(history)
    if not per_site:
        return None
    head = audit.head_hash if audit is not None else None
    secure_sites = [len(r.site_train) for r in history.rounds if r.site_train] if secure_aggregation else []
    return PrivacyReport(
        study=safe_name(config.study), run_id=safe_name(run_id) if run_id else None, round=history.last_complete,
        model_sha256=model_sha256, config_sha256=config_sha256(config), sites=tuple(per_site),
        client_level=client_level, secure_aggregation=secure_aggregation,
        secure_min_sites=min(secure_sites) if secure_sites else None, trust_assumptions=TRUST_ASSUMPTIONS,
        policy_checks=tuple(policy_checks(history, policy_label)), membership=membership, gate=gate,
        audit_log_head=head if head is not None and head != GENESIS_HASH else None,
        audit_log_entries=audit.entries if head is not None and head != GENESIS_HASH else None,
    )  # fmt: skip


def warn_plaintext(config: RunConfig) -> None:
    """Log a warning that a deployment writes its checkpoints and final model unencrypted."""
    if config.checkpoint_dir is not None and config.artefact_key is None:
        logger.warning(
            "study %s writes checkpoints and the final model to %s UNENCRYPTED: create a key with "
            "`fedcare audit artefact-key KEYFILE` and set artefact-key = \"KEYFILE\" in the study's [run] "
            "table (or artefact-key = \"env\" with %s set)",
            config.study, config.checkpoint_dir, DEFAULT_KEY_ENV,
        )
