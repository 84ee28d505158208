"""Privacy report: the per-site ε written is exactly the ledger's; the Markdown has every section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedcare.privacy.membership import AttackResult, MembershipAuditResult
from fedcare.privacy.report import (
    ClientLevelPrivacy,
    GateSummary,
    PolicyCheck,
    PrivacyReport,
    SitePrivacy,
    load_report,
    write_report,
)

# What each site's ledger holds after the run (unrounded, as an accountant returns them).
LEDGER = {
    "heart-cleveland": (2.718281828459045, 1e-5, "rdp"),
    "heart-hungarian": (1.4142135623730951, 1e-5, "prv"),
}
H = "cd" * 32


def _report(**changes: object) -> PrivacyReport:
    attack = AttackResult(attack="lira_online", auc=0.512, ci_low=0.49, ci_high=0.534, confidence=0.95,
                          low_fpr=0.01, tpr_at_low_fpr=0.012, n_members=400, n_nonmembers=400,
                          n_bootstrap=1000, seed=0, n_shadow=16)  # fmt: skip
    values: dict[str, object] = {
        "study": "heart-disease",
        "run_id": "run-7",
        "round": 10,
        "model_sha256": H,
        "sites": [
            SitePrivacy(site=site, dp_enabled=True, epsilon=eps, delta=delta, accountant=acc,
                        noise_multiplier=1.1, max_grad_norm=1.0, rounds=10)  # fmt: skip
            for site, (eps, delta, acc) in LEDGER.items()
        ],
        "client_level": ClientLevelPrivacy(mechanism="server-side fixed clipping", epsilon=7.5, delta=1e-3,
                                           noise_multiplier=0.8, clipping_norm=5.0),  # fmt: skip
        "secure_aggregation": True,
        "policy_checks": [PolicyCheck(site=s, policy="strict default", rounds_checked=10, refusals=0) for s in LEDGER],
        "membership": MembershipAuditResult(attacks=(attack,)),
        "gate": GateSummary(max_auc=0.6, basis="upper", passed=True),
        "audit_log_head": H,
        "audit_log_entries": 13,
    }
    values.update(changes)
    return PrivacyReport(**values)


def test_per_site_epsilon_equals_the_ledger_values(tmp_path: Path) -> None:
    # Execute
    json_path, _ = write_report(_report(), tmp_path)

    # Assert: exact, not rounded
    written = json.loads(json_path.read_text(encoding="utf-8"))
    got = {s["site"]: (s["epsilon"], s["delta"], s["accountant"]) for s in written["sites"]}
    assert got == LEDGER
    assert load_report(json_path) == _report(created_at=load_report(json_path).created_at)


def test_markdown_has_every_section_and_the_values(tmp_path: Path) -> None:
    # Execute
    _, md_path = write_report(_report(), tmp_path)
    text = md_path.read_text(encoding="utf-8")

    # Assert
    for heading in (
        "# Privacy report — study `heart-disease`",
        "## Sample-level differential privacy (per site)",
        "## Client-level differential privacy",
        "## Secure aggregation",
        "## Site policy checks",
        "## Membership-inference audit",
        "## Audit log",
        "## Not a formal guarantee",
    ):
        assert heading in text
    assert "| heart-cleveland | yes | 2.7183 | 1.0e-05 | rdp |" in text
    assert "| heart-hungarian | yes | 1.4142 | 1.0e-05 | prv |" in text
    assert "server-side fixed clipping: ε = 7.5000" in text
    assert "| lira_online | 0.512 | 95%: 0.490–0.534 |" in text
    assert "Release gate (max AUC 0.600 on the upper confidence bound): passed." in text
    assert f"fedcare audit verify LOG --key PUB --anchor {H}" in text
    not_guaranteed = text.split("## Not a formal guarantee")[1]
    assert "Membership-inference audit" in not_guaranteed and "Data validation" in not_guaranteed


def test_markdown_flags_missing_protection(tmp_path: Path) -> None:
    # Prepare
    report = _report(sites=[SitePrivacy(site="heart-va", dp_enabled=False)], secure_aggregation=False,
                     client_level=None, membership=None, gate=None,
                     policy_checks=[PolicyCheck(site="heart-va", policy="strict default", rounds_checked=3, refusals=2)])  # fmt: skip

    # Execute
    _, md_path = write_report(report, tmp_path)
    text = md_path.read_text(encoding="utf-8")

    # Assert
    assert "| heart-va | **NO** | — |" in text
    assert "no sample-level guarantee for the records of: heart-va" in text
    assert "**Off:** the server saw each site's individual update." in text
    assert "| heart-va | strict default | 3 | 2 | REFUSED |" in text
    assert "## Membership-inference audit\n\nNot run." in text


def test_report_refuses_incomplete_site_values_and_overwrites() -> None:
    with pytest.raises(ValidationError, match="needs epsilon, delta and accountant"):
        SitePrivacy(site="a", dp_enabled=True, epsilon=1.0, delta=1e-5)
    with pytest.raises(ValidationError, match="each site appears once"):
        _report(sites=[SitePrivacy(site="a", dp_enabled=False)] * 2)


def test_write_report_does_not_overwrite(tmp_path: Path) -> None:
    write_report(_report(), tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_report(_report(), tmp_path)
    write_report(_report(round=11), tmp_path, overwrite=True)
    assert load_report(tmp_path / "privacy_report.json").round == 11


def test_report_states_secure_cohort_and_trust_assumptions() -> None:
    # Prepare
    from fedcare.privacy.report import TRUST_ASSUMPTIONS, render_markdown

    report = _report(secure_min_sites=3, trust_assumptions=TRUST_ASSUMPTIONS)

    # Execute
    text = render_markdown(report)

    # Assert
    assert "Fewest sites in one secure sum: 3." in text
    assert "## Trust assumptions" in text
    assert all(item in text for item in TRUST_ASSUMPTIONS)
    assert "Neighbouring relation: **" in text


def test_a_secure_cohort_without_secure_aggregation_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValidationError, match="secure_min_sites"):
        _report(secure_aggregation=False, secure_min_sites=3)
