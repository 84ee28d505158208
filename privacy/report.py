"""One privacy report per released model: ``privacy_report.json`` and ``privacy_report.md``.

The report states, for the model released, the sample-level ε and δ each site's own ledger
holds (values passed in, never recomputed here), client-level DP where the server used it,
whether secure aggregation was on, the site policy checks, the membership-inference audit and
the audit log's head hash, and a section saying plainly what is *not* a formal guarantee.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from .. import __version__
from ..config_base import FiniteFrozenModel
from ..files import atomic_write
from .membership import GateDecision, MembershipAuditResult
from .release_mechanisms import NEIGHBOURING_RELATION

__all__ = [
    "JSON_NAME",
    "MARKDOWN_NAME",
    "ClientLevelPrivacy",
    "GateSummary",
    "PolicyCheck",
    "PrivacyReport",
    "SitePrivacy",
    "TRUST_ASSUMPTIONS",
    "load_report",
    "render_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

JSON_NAME = "privacy_report.json"
MARKDOWN_NAME = "privacy_report.md"

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f|]+$")]


class SitePrivacy(FiniteFrozenModel):
    """Sample-level DP of one site, as its ledger records it for this study.

    Attributes
    ----------
    site : str
        The site.
    dp_enabled : bool
        Whether the site trained with DP-SGD.
    epsilon, delta : float or None
        The ε spent and δ, from the site's ledger (required when ``dp_enabled``).
    accountant : str or None
        The accountant that computed ε (``rdp``, ``prv``, ``gdp``).
    noise_multiplier, max_grad_norm : float or None
        The DP-SGD settings, where known.
    rounds : int or None
        Rounds the site took part in.
    epsilon_training, epsilon_count, epsilon_evaluation : float or None
        ``epsilon`` per mechanism, as the site's ledger holds them (``epsilon`` is their sum, basic
        composition): DP-SGD, the noised example count, the DP evaluations together.
    evaluation_queries, exact_evaluations : int or None
        DP evaluations charged, and exact evaluations released (policy opt-in, outside ε).
    """

    site: Name
    dp_enabled: bool
    epsilon: float | None = Field(default=None, ge=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    accountant: Name | None = None
    noise_multiplier: float | None = Field(default=None, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    rounds: int | None = Field(default=None, ge=0)
    epsilon_training: float | None = Field(default=None, ge=0)
    epsilon_count: float | None = Field(default=None, ge=0)
    epsilon_evaluation: float | None = Field(default=None, ge=0)
    evaluation_queries: int | None = Field(default=None, ge=0)
    exact_evaluations: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.dp_enabled and (self.epsilon is None or self.delta is None or self.accountant is None):
            raise ValueError(f"site {self.site}: DP enabled needs epsilon, delta and accountant from its ledger")
        if not self.dp_enabled and self.epsilon is not None:
            raise ValueError(f"site {self.site}: an epsilon is given but DP is not enabled")
        parts = (self.epsilon_training, self.epsilon_count, self.epsilon_evaluation)
        if self.epsilon is not None and all(p is not None for p in parts):
            total = sum(parts)  # type: ignore[arg-type]
            if abs(total - self.epsilon) > 1e-6 * max(1.0, self.epsilon):
                raise ValueError(f"site {self.site}: ε per mechanism sums to {total:.6g}, not to ε = {self.epsilon:.6g}")
        return self


class ClientLevelPrivacy(FiniteFrozenModel):
    """Client-level (site-level) DP applied by the server on aggregation, where used.

    Attributes
    ----------
    mechanism : str
        What was done (who clips, who adds the noise).
    epsilon, delta : float
        The client-level guarantee over all complete rounds.
    noise_multiplier, clipping_norm : float
        σ and the L2 bound C of each site's update (noise std σ C / m on the mean of m updates).
    accountant : str or None
        The accountant that computed ε (e.g. dp_accounting's RDP accountant, sampling without
        replacement, one event per round).
    sample_rate : float or None
        Sites sampled / sites available per round (the largest, when it varied).
    rounds : int or None
        Rounds accounted.
    neighbouring : str or None
        The neighbouring relation ε is stated for (e.g. replace-one site, number of sites public).
    sampling : str or None
        How sites were assumed sampled each round (e.g. a fixed-size subset without replacement).
    """

    mechanism: Label
    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float = Field(ge=0)
    clipping_norm: float = Field(gt=0)
    accountant: Label | None = None
    sample_rate: float | None = Field(default=None, gt=0, le=1)
    rounds: int | None = Field(default=None, ge=0)
    neighbouring: Label | None = None
    sampling: Label | None = None


class PolicyCheck(FiniteFrozenModel):
    """The outcome of a site's policy checks over the run."""

    site: Name
    policy: Label = Field(description="'strict default' or 'file sha256:<hex>'")
    rounds_checked: int = Field(ge=0)
    refusals: int = Field(ge=0)

    @property
    def passed(self) -> bool:
        """Return whether no round was refused."""
        return self.refusals == 0


class GateSummary(FiniteFrozenModel):
    """The release gate's settings and verdict.

    ``passed`` is true only for the verdict ``"pass"``. ``verdict`` (absent in older reports) is
    ``"pass"``, ``"block"`` or ``"inconclusive"`` (the audit was too small for ``max_auc``: its
    minimum detectable AUC excess, at the gate's ``power``, exceeds ``max_auc − 0.5``).
    ``override_reason`` is set when an inconclusive model was released by an explicit override.
    """

    max_auc: float = Field(gt=0.5, le=1)
    basis: Literal["upper", "point"]
    passed: bool
    verdict: Literal["pass", "block", "inconclusive"] | None = None
    power: float | None = Field(default=None, ge=0.5, lt=1)
    min_detectable_excess: float | None = Field(default=None, ge=0)
    override_reason: Label | None = None

    @classmethod
    def from_decision(cls, decision: GateDecision, *, override_reason: str | None = None) -> GateSummary:
        """Return the summary of a :class:`~fedcare.privacy.membership.GateDecision` (and any override)."""
        return cls(max_auc=decision.max_auc, basis=decision.basis, passed=decision.passed, verdict=decision.verdict,
                   power=decision.power, min_detectable_excess=decision.min_detectable_excess,
                   override_reason=override_reason)  # fmt: skip

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.verdict is not None and self.passed != (self.verdict == "pass"):
            raise ValueError(f"gate: passed = {self.passed} contradicts verdict {self.verdict!r}")
        if self.override_reason is not None and self.verdict != "inconclusive":
            raise ValueError("gate: only an inconclusive verdict can be overridden")
        return self


class PrivacyReport(FiniteFrozenModel):
    """Everything said about the privacy of one released model (frozen)."""

    study: Name
    run_id: Name | None = None
    round: int = Field(ge=0)
    model_sha256: Sha256 | None = None
    config_sha256: Sha256 | None = None
    created_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    fedcare_version: str = __version__
    sites: tuple[SitePrivacy, ...] = Field(min_length=1)
    neighbouring_relation: Label = NEIGHBOURING_RELATION
    client_level: ClientLevelPrivacy | None = None
    secure_aggregation: bool
    secure_min_sites: int | None = Field(default=None, ge=1)
    trust_assumptions: tuple[str, ...] = ()
    policy_checks: tuple[PolicyCheck, ...] = ()
    membership: MembershipAuditResult | None = None
    gate: GateSummary | None = None
    audit_log_head: Sha256 | None = None
    audit_log_entries: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _unique_sites(self) -> Self:
        names = [s.site for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"each site appears once in a report; got {names}")
        if self.gate is not None and self.membership is None:
            raise ValueError("a release gate verdict needs the membership audit it judged")
        if self.secure_min_sites is not None and not self.secure_aggregation:
            raise ValueError("secure_min_sites is stated only for a run with secure aggregation")
        return self


#: Who is trusted for what, stated in every report (docs/privacy.md, "Threat model").
TRUST_ASSUMPTIONS: tuple[str, ...] = (
    "**Each hospital's node** (its host, the installed fedcare code and the OS entropy source) is "
    "trusted: it checks the site's policy before every round, keeps the ledger, draws the DP noise "
    "and runs only the app the hospital pinned. Nothing the coordinator sends sets a seed, a budget "
    "or a policy.",
    "**The coordinator** is trusted to run the rounds it announced and, where used, to add the "
    "client-level noise; it is not trusted with patient data: it sees only DP-noised updates (or "
    "their secure sum), noised counts and DP evaluation statistics.",
    "**Other hospitals** are trusted to follow the SecAgg+ protocol (an honest majority of the "
    "share-holders); each site refuses a secure round smaller than its `min_secure_cohort`.",
    "**The network** is not trusted: TLS, node keys generated at each hospital, and a Control API "
    "that listens on loopback behind a token.",
)


def _num(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


NOT_GUARANTEED = (
    "**Membership-inference audit.** The attack AUCs are empirical: they say these attacks, "
    "with these shadow models and this audit split, did not separate members from non-members "
    "better than reported. A stronger attack may do better. Only ε is a bound.",
    "**Data validation.** Manifest checks, cohort-size minimums and schema validation keep bad "
    "data out; they protect no one's privacy formally.",
    "**Secure aggregation.** SecAgg+ hides each site's update from the server under its threat "
    "model (an honest-but-curious server, fewer colluding or dropped clients than its threshold); "
    "it adds no ε, and the aggregate itself is revealed.",
    "**Patients, not records.** Sample-level ε protects one record. A patient with k records at a "
    "site (several stays, beats, images) is protected only at about k·ε (group privacy).",
    "**Across sites and studies.** Each site's ε covers its own records in this study. The same "
    "patient at two sites, or in two studies, composes: the ε values add up.",
    "**What is outside the accountant.** Hyper-parameter tuning on the private data, exact "
    "evaluations a site's policy opted in to (`evaluation = \"exact\"`), whether a site refused an "
    "evaluation for a small test split, the training time and the number of DP-SGD steps (which "
    "reveal the training-set size to within a batch), and any data-dependent choice of the "
    "training recipe are not counted in ε. Opacus ran without `secure_mode` (no cryptographically secure noise source).",
    "**Policy checks.** They show each site's node refused rounds outside its policy, as the node "
    "software reported it; they are as trustworthy as that software.",
)


CLIENT_LEVEL_CAVEAT = (
    "**Client-level DP.** The client-level DP noise is added by the coordinator, who sees the "
    "pre-noise sum: it protects against whoever sees the released model, not against the "
    "coordinator. Its ε also assumes each site's node clipped its update to the stated norm."
)
SECURE_METRICS_CAVEAT = (
    "**What SecAgg+ leaves visible.** Under secure aggregation the coordinator still sees each "
    "site's plaintext metrics (noised example count, training loss, sample-level ε and δ) and per-site "
    "evaluation results."
)


def _run_caveats(report: PrivacyReport) -> tuple[str, ...]:
    """Return the caveats that apply to this run only (client-level DP, secure aggregation)."""
    caveats: list[str] = []
    if report.client_level is not None:
        caveats.append(CLIENT_LEVEL_CAVEAT)
    if report.secure_aggregation:
        caveats.append(SECURE_METRICS_CAVEAT)
    return tuple(caveats)


def _mechanism_lines(report: PrivacyReport) -> list[str]:
    """Return the table of ε per site and mechanism (training, count, evaluation) and exact evaluations."""
    lines = [
        "", "### ε per mechanism", "",
        "| Site | Training (DP-SGD) | Count (Laplace, once) | Evaluation (Laplace) | DP evaluations | Exact evaluations | Total ε |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report.sites:
        lines.append(
            f"| {s.site} | {_num(s.epsilon_training)} | {_num(s.epsilon_count)} | {_num(s.epsilon_evaluation)} | "
            f"{'—' if s.evaluation_queries is None else s.evaluation_queries} | "
            f"{'—' if s.exact_evaluations is None else s.exact_evaluations} | {_num(s.epsilon)} |"
        )
    exact = [s.site for s in report.sites if s.exact_evaluations]
    if exact:
        lines += ["", "**Warning:** exact evaluations (policy `evaluation = \"exact\"`) released metrics of the "
                  f"test patients of {', '.join(exact)} outside ε: those patients have no guarantee."]
    return lines


def render_markdown(report: PrivacyReport) -> str:
    """Return the report as readable Markdown."""
    lines: list[str] = [f"# Privacy report — study `{report.study}`", ""]
    lines += [
        f"- Model: round {report.round}" + (f", SHA-256 `{report.model_sha256}`" if report.model_sha256 else ""),
        f"- Run: `{report.run_id or '—'}`; configuration SHA-256 `{report.config_sha256 or '—'}`",
        f"- Created: {report.created_at.isoformat()} by fedcare {report.fedcare_version}",
        "",
        "## Sample-level differential privacy (per site)",
        "",
        "Each site trained with DP-SGD (Opacus) and kept its own privacy ledger. For a record held at "
        "a site, everything the site released (the model updates, its noised example count and its "
        "DP evaluations) is (ε, δ)-differentially private with that site's ε and δ below: the named "
        "accountant's DP-SGD ε plus the ε of each other release (basic composition).",
        "",
        f"Neighbouring relation: **{report.neighbouring_relation}**. No site sends its exact example "
        "count (the count is Laplace-noised once per study), so the add/remove ε below is the one that "
        "holds; under replace-one (group privacy of 2) it would be (2ε, (1 + e^ε)δ).",
        "",
        "| Site | DP | ε | δ | Accountant | Noise multiplier | Clipping norm | Rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report.sites:
        lines.append(
            f"| {s.site} | {'yes' if s.dp_enabled else '**NO**'} | {_num(s.epsilon)} | {_num(s.delta, '.1e')} | "
            f"{s.accountant or '—'} | {_num(s.noise_multiplier, '.3f')} | {_num(s.max_grad_norm, '.3f')} | "
            f"{'—' if s.rounds is None else s.rounds} |"
        )
    without = [s.site for s in report.sites if not s.dp_enabled]
    if without:
        lines += ["", f"**Warning:** no sample-level guarantee for the records of: {', '.join(without)}."]
    lines += _mechanism_lines(report)
    lines += ["", "## Client-level differential privacy", ""]
    if report.client_level is None:
        lines.append("Not used: the server added no noise on aggregation.")
    else:
        c = report.client_level
        lines.append(
            f"{c.mechanism}: ε = {_num(c.epsilon)}, δ = {_num(c.delta, '.1e')} (noise multiplier "
            f"{_num(c.noise_multiplier, '.3f')}, clipping norm {_num(c.clipping_norm, '.3f')}"
            f"{', accountant ' + c.accountant if c.accountant else ''}"
            f"{'' if c.sample_rate is None else f', sampled fraction of sites {c.sample_rate:.3g}'}"
            f"{'' if c.rounds is None else f', {c.rounds} rounds'}); this bounds what the model "
            "reveals about any one site's whole contribution."
        )
        if c.neighbouring or c.sampling:
            lines += ["", f"- Neighbouring relation: {c.neighbouring or 'not stated'}",
                      f"- Sampling assumption: {c.sampling or 'not stated'}"]  # fmt: skip
    lines += ["", "## Secure aggregation", ""]
    lines.append(
        "On (SecAgg+): the server saw only the sum of the sites' updates."
        if report.secure_aggregation
        else "**Off:** the server saw each site's individual update."
    )
    if report.secure_aggregation and report.secure_min_sites is not None:
        lines.append(
            f"Fewest sites in one secure sum: {report.secure_min_sites}. Each site refused any secure "
            "round below its own policy's `min_secure_cohort` (default 3) before a share left it."
        )
    if report.trust_assumptions:
        lines += ["", "## Trust assumptions", ""]
        lines += [f"- {item}" for item in report.trust_assumptions]
    lines += ["", "## Site policy checks", ""]
    if not report.policy_checks:
        lines.append("No policy check results were reported.")
    else:
        lines += ["| Site | Policy | Rounds checked | Refusals | Result |", "|---|---|---|---|---|"]
        for p in report.policy_checks:
            lines.append(
                f"| {p.site} | {p.policy} | {p.rounds_checked} | {p.refusals} | {'passed' if p.passed else 'REFUSED'} |"
            )
    lines += ["", "## Membership-inference audit", ""]
    if report.membership is None:
        lines.append("Not run.")
    else:
        lines += ["| Attack | AUC | Confidence interval | TPR at 0.1% FPR | TPR at 1% FPR | Members / non-members | Shadows |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for a in report.membership.attacks:
            level = round(a.confidence * 100)
            tpr = {p.fpr: f"{p.tpr:.3f}" + ("" if p.resolvable else " (unresolved)") for p in a.tpr_at_fpr}
            tpr.setdefault(a.low_fpr, f"{a.tpr_at_low_fpr:.3f}")
            lines.append(
                f"| {a.attack} | {a.auc:.3f} | {level}%: {a.ci_low:.3f}–{a.ci_high:.3f} | "
                f"{tpr.get(0.001, '—')} | {tpr.get(0.01, '—')} | {a.n_members} / {a.n_nonmembers} | "
                f"{'—' if a.n_shadow is None else a.n_shadow} |"
            )
        shadows = sorted({a.shadow_training for a in report.membership.attacks if a.shadow_training})
        for text in shadows:
            lines += ["", f"Shadow models: {text}."]
        if any(not p.resolvable for a in report.membership.attacks for p in a.tpr_at_fpr):
            lines += ["", '"Unresolved": fewer than 1 / FPR non-members; the value is the TPR at zero false positives.']
        if report.gate is not None:
            g = report.gate
            basis = "upper confidence bound" if g.basis == "upper" else "point estimate"
            verdict = {"pass": "passed", "block": "**BLOCKED**", "inconclusive": "**INCONCLUSIVE**"}[
                g.verdict or ("pass" if g.passed else "block")
            ]
            lines += ["", f"Release gate (max AUC {g.max_auc:.3f} on the {basis}): {verdict}."]
            if g.min_detectable_excess is not None:
                lines.append(
                    f"The audit detects an AUC excess over 0.5 of {g.min_detectable_excess:.3f} "
                    f"(at {g.power or 0.8:.0%} power); the limit allows {g.max_auc - 0.5:.3f}"
                    + (": too small an audit to show the model below the limit." if g.verdict == "inconclusive" else ".")
                )
            if g.override_reason is not None:
                lines.append(f"**Released by an explicit override of the inconclusive verdict:** {g.override_reason}")
    lines += ["", "## Audit log", ""]
    if report.audit_log_head is None:
        lines.append("No audit log head recorded.")
    else:
        lines.append(
            f"Signed audit log head when this report was written: `{report.audit_log_head}` "
            f"({report.audit_log_entries} entries). Verify with "
            f"`fedcare audit verify LOG --key PUB --anchor {report.audit_log_head}`."
        )
    lines += ["", "## Not a formal guarantee", "", "Only the ε and δ values above are formal bounds. These are not:", ""]
    lines += [f"- {item}" for item in (*NOT_GUARANTEED, *_run_caveats(report))]
    return "\n".join(lines) + "\n"


def write_report(report: PrivacyReport, out_dir: Path | str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``privacy_report.json`` and ``privacy_report.md`` into ``out_dir``; return both paths."""
    if not isinstance(report, PrivacyReport):
        raise TypeError("report must be a PrivacyReport")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME
    if not overwrite:
        for path in (json_path, md_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; write the report elsewhere or pass overwrite=True")
    payload = json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(json_path, payload.encode("utf-8"), mode=0o644)
    atomic_write(md_path, render_markdown(report).encode("utf-8"), mode=0o644)
    logger.info("wrote privacy report %s and %s", json_path, md_path)
    return json_path, md_path


def load_report(path: Path | str) -> PrivacyReport:
    """Read a ``privacy_report.json`` back into a ``PrivacyReport``."""
    return PrivacyReport.model_validate_json(Path(path).read_text(encoding="utf-8"))
