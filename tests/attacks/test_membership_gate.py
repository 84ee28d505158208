"""Attacks on the membership-inference release gate (issue 11, finding 12).

The attacker wants a model released and controls the audit's size, or the model memorises its
members. The gate must:

- block a model that memorises, even on a small audit (the excess is shown outright);
- never *pass* an audit too small to test its limit: a handful of non-members gives an interval
  so wide that the old gate passed a lucky draw (or, on the point estimate, anything near 0.5).
  The new gate says "inconclusive", which blocks like a failure (``ReleaseInconclusive`` is a
  ``ReleaseBlocked``);
- report the TPR at 0.1 % and 1 % FPR, saying when the non-member set cannot resolve the rate;
- train LiRA shadows the way the target was trained: for a federation, whole shadow federations
  of the same size (``simulations.membership_audit``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_curve
from torch import nn
from typer.testing import CliRunner

from fedcare.privacy.membership import (
    AttackResult,
    MembershipAuditResult,
    ReleaseBlocked,
    ReleaseGate,
    ReleaseInconclusive,
    auc_standard_error,
    auc_with_ci,
    logit_confidence,
    loss_threshold_attack,
    membership_audit,
    min_detectable_auc_excess,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Keep torch on one thread (shared machines) and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


D = 200  # noise features, random labels: a model can only memorise


def _noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def _memorise(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """A non-private model overfit on a tiny member set (full-batch Adam, no regularisation)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 2))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):  # bounded
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


def _blind(seed: int) -> nn.Module:
    """A model that never saw the data (it leaks nothing about membership)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 2)).eval()


def _attack(auc: float, low: float, high: float, n: int) -> AttackResult:
    return AttackResult(attack="loss_threshold", auc=auc, ci_low=low, ci_high=high, confidence=0.95, low_fpr=0.01,
                        tpr_at_low_fpr=0.0, n_members=n, n_nonmembers=n, n_bootstrap=1000, seed=0)  # fmt: skip


def test_a_memorising_model_is_blocked_even_on_a_small_audit() -> None:
    # Prepare: 30 members memorised, 30 non-members (too few to certify a limit of 0.6)
    members, nonmembers = _noise(30, seed=1), _noise(30, seed=2)
    model = _memorise(*members, seed=0)

    # Execute
    result = membership_audit(model, members=members, nonmembers=nonmembers, train_fn=_memorise, n_shadow=4, seed=0)
    decision = ReleaseGate(max_auc=0.6).decide(result)

    # Assert: the excess is shown outright (lower bound above the limit): block, not inconclusive
    assert decision.min_detectable_excess > 0.1
    assert decision.verdict == "block" and not decision.passed
    assert max(a.ci_low for a in result.attacks) > 0.6
    with pytest.raises(ReleaseBlocked, match="release blocked") as caught:
        ReleaseGate(max_auc=0.6).check(result)
    assert not isinstance(caught.value, ReleaseInconclusive)


def test_a_too_small_non_member_set_is_inconclusive_never_a_pass() -> None:
    # Prepare: a model that leaks nothing, audited on 12 members and 12 non-members
    members, nonmembers = _noise(12, seed=3), _noise(12, seed=4)
    result = MembershipAuditResult(attacks=(loss_threshold_attack(_blind(0), members=members, nonmembers=nonmembers),))

    # Execute
    decisions = [ReleaseGate(max_auc=0.6, basis=b).decide(result) for b in ("upper", "point")]

    # Assert
    assert [d.verdict for d in decisions] == ["inconclusive", "inconclusive"]
    assert decisions[0].min_detectable_excess == pytest.approx(min_detectable_auc_excess(12, 12))
    assert "release inconclusive" in decisions[0].reason and "12 non-members" in decisions[0].reason
    with pytest.raises(ReleaseInconclusive):
        ReleaseGate(max_auc=0.6).check(result)


def test_a_lucky_draw_on_a_small_audit_no_longer_passes() -> None:
    # Prepare: what the old gate passed: 30 / 30 audit, AUC 0.45, interval 0.30–0.58 (under 0.6)
    lucky = MembershipAuditResult(attacks=(_attack(0.45, 0.30, 0.58, n=30),))
    large = MembershipAuditResult(attacks=(_attack(0.51, 0.49, 0.53, n=3000),))

    # Execute / Assert
    assert ReleaseGate(max_auc=0.6).failures(lucky) == []  # under the limit on both bases...
    assert ReleaseGate(max_auc=0.6).decide(lucky).verdict == "inconclusive"  # ...but no pass
    assert ReleaseGate(max_auc=0.6, basis="point").decide(lucky).verdict == "inconclusive"
    assert ReleaseGate(max_auc=0.6).decide(large).verdict == "pass"
    assert ReleaseGate(max_auc=0.6).check(large).passed


def test_min_detectable_excess_is_hanley_mcneil_at_chance_and_matches_the_bootstrap() -> None:
    # Prepare: SE₀² = (1/4 + (n₁ + n₀ − 2)/12) / (n₁ n₀) for AUC 0.5 (Hanley & McNeil 1982)
    se0 = np.sqrt((0.25 + (111 + 111 - 2) / 12) / (111 * 111))
    rng = np.random.default_rng(0)
    null = [auc_with_ci(rng.normal(size=111), rng.normal(size=111), n_bootstrap=2000, seed=s) for s in range(10)]

    # Execute
    mde = min_detectable_auc_excess(111, 111)

    # Assert: the exact value, and the bootstrap's mean half-width agrees with z·SE₀ within 10 %
    assert auc_standard_error(0.5, 111, 111) == pytest.approx(se0, rel=1e-12)
    assert mde == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * se0, rel=1e-12)
    assert mde == pytest.approx(0.10880, abs=1e-5)  # > 0.1: heart disease's 111 / 111 cannot test max AUC 0.6
    half = np.mean([(high - low) / 2 for _, low, high in null])
    assert half == pytest.approx(norm.ppf(0.975) * se0, rel=0.10)
    assert min_detectable_auc_excess(1500, 1500) < 0.03


def test_tpr_at_low_fpr_is_reported_and_unresolved_rates_are_flagged() -> None:
    # Prepare: 60 memorised members, 1000 non-members (enough to resolve 0.1 % FPR)
    members, nonmembers = _noise(60, seed=5), _noise(1000, seed=6)
    model = _memorise(*members, seed=0)

    # Execute
    big = loss_threshold_attack(model, members=members, nonmembers=nonmembers, n_bootstrap=200)
    small = loss_threshold_attack(model, members=members, nonmembers=(nonmembers[0][:50], nonmembers[1][:50]),
                                  n_bootstrap=200)  # fmt: skip

    # Assert: values equal sklearn's ROC curve read at each FPR
    phi_m, phi_n = (logit_confidence(model, *s) for s in (members, nonmembers))
    scores = -np.logaddexp(0.0, -np.r_[phi_m, phi_n])
    fpr, tpr, _ = roc_curve(np.r_[np.ones(60), np.zeros(1000)], scores, drop_intermediate=False)
    assert [(p.fpr, p.resolvable) for p in big.tpr_at_fpr] == [(0.001, True), (0.01, True)]
    for point in big.tpr_at_fpr:
        assert point.tpr == pytest.approx(tpr[fpr <= point.fpr].max())
    assert all(p.tpr > 10 * p.fpr for p in big.tpr_at_fpr)  # memorised members given away far above chance
    assert [(p.fpr, p.resolvable) for p in small.tpr_at_fpr] == [(0.001, False), (0.01, False)]
    assert "TPR" in big.describe_tpr() and "(unresolved)" in small.describe_tpr()


def test_lira_needs_exactly_one_way_to_train_shadows() -> None:
    members, nonmembers = _noise(8, seed=7), _noise(8, seed=8)
    with pytest.raises(ValueError, match="exactly one of train_fn"):
        membership_audit(_blind(0), members=members, nonmembers=nonmembers, train_fn=_memorise,
                         shadow_trainer=lambda index, seed: _blind(seed), n_shadow=4)  # fmt: skip


def test_shadows_are_trained_by_the_caller_on_pool_indices_and_labelled() -> None:
    # Prepare: a trainer that records what it was asked to train on
    members, nonmembers = _noise(10, seed=9), _noise(10, seed=10)
    calls: list[np.ndarray] = []

    def trainer(index: np.ndarray, seed: int) -> nn.Module:
        calls.append(np.asarray(index))
        return _blind(seed)

    # Execute
    result = membership_audit(_blind(0), members=members, nonmembers=nonmembers, shadow_trainer=trainer,
                              shadow_training="federated like the target: test", n_shadow=4, n_bootstrap=100)  # fmt: skip

    # Assert: 4 shadows, each on exactly half of the 20-example pool, every example in exactly 2
    lira = result.attacks[1]
    assert len(calls) == 4 and all(len(c) == 10 for c in calls)
    assert np.bincount(np.concatenate(calls), minlength=20).tolist() == [2] * 20
    assert lira.shadow_training == "federated like the target: test" and lira.n_shadow == 4


@pytest.mark.slow
def test_federated_shadows_train_a_federation_of_the_targets_size() -> None:
    from fedcare.models import ModelSpec, get_weights
    from fedcare.privacy.policy import SitePolicy
    from fedcare.privacy.settings import PrivacySettings
    from fedcare.server.config import RunConfig
    from fedcare.simulations.membership_audit import federated_membership_pool, make_federated_shadow_trainer
    from fedcare.simulations.builtin import load_builtin
    from fedcare.simulations.partition import PartitionScheme, partition

    # Prepare: a 3-hospital breast-cancer federation, 2 rounds of FedAvg
    data = load_builtin("breast_cancer", seed=0)
    hospitals = partition(data, scheme=PartitionScheme(kind="iid", min_per_site=40), num_sites=3, seed=0)
    config = RunConfig(study="shadow-test", num_rounds=2, model=ModelSpec(family="logistic"), task="binary",
                       num_classes=2, input_shape=tuple(data.input_shape), min_sites=3, lr=0.5, seed=0)  # fmt: skip
    pool = federated_membership_pool(hospitals, seed=0)
    policy = SitePolicy.model_validate({"require_dp": False, "require_secure_aggregation": False})
    trainer, description = make_federated_shadow_trainer(config, hospitals, pool, privacy=PrivacySettings.disabled(),
                                                         policy=policy)  # fmt: skip
    n_pool = len(pool.members) + len(pool.nonmembers)
    half = np.arange(0, n_pool, 2)

    # Execute
    first, again, other = trainer(half, 1), trainer(half, 1), trainer(half + 1, 1)

    # Assert: each shadow federation trains on as many patients as the target did, site by site in
    # total, deterministically per (half, seed), through the study's own strategy
    total_train = sum(len(h.train) for h in hospitals)
    assert len(pool.members) == len(pool.nonmembers) == min(total_train, sum(len(h.test) for h in hospitals))
    assert sum(len(b) for b in pool.background) + n_pool // 2 == total_train
    assert pool.site_of.shape == (n_pool,) and set(pool.site_of.tolist()) == {0, 1, 2}
    assert description.startswith("federated like the target: fedavg, 3 sites, 2 rounds")
    w1, w2, w3 = (get_weights(m) for m in (first, again, other))
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert any(not np.array_equal(w1[k], w3[k]) for k in w1)


def _blind_deployment(folder: Path) -> tuple[Path, Path, Path]:
    """An encrypted model that never saw its site's data, 30 + 30 patients to audit it on, and a key."""
    from fedcare.models import ModelSpec, build_for_data, get_weights
    from fedcare.privacy.artefacts import generate_key
    from fedcare.server.checkpoint import save_model_file
    from fedcare.server.config import RunConfig
    from fedcare.server.safekeeping import artefact_metadata

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 10)), columns=[f"f{i}" for i in range(10)])
    frame["target"] = rng.integers(0, 2, size=60)
    frame.to_csv(folder / "site.csv", index=False)
    manifest = folder / "site.toml"
    manifest.write_text(
        'site = "small"\ntask = "binary"\nclasses = [0, 1]\n[split]\nval = 0.0\ntest = 0.5\nseed = 0\n'
        '[data]\nkind = "table"\npath = "site.csv"\ntarget = "target"\n'
    )
    key_file = folder / "artefact.key"
    key = generate_key(key_file)
    spec = ModelSpec(family="logistic")
    torch.manual_seed(0)
    model = build_for_data(spec, task="binary", num_classes=2, input_shape=(10,), has_mask=False)
    encrypted = folder / "final_model.npz.enc"
    save_model_file(encrypted, get_weights(model), {"model_spec": spec.model_dump(), "task": "binary", "num_classes": 2,
                    "input_shape": [10], "has_mask": False, "study": "small"},
                    key=key, metadata=artefact_metadata(RunConfig(study="small", input_shape=(10,)), "model", 1))  # fmt: skip
    return encrypted, manifest, key_file


def test_fedcare_release_refuses_an_inconclusive_audit_unless_overridden_with_a_logged_reason(tmp_path: Path) -> None:
    from fedcare.cli import app
    from fedcare.privacy.audit_log import generate_signing_key

    # Prepare: the attacker audits on 30 held-out patients, too few to test max AUC 0.6
    encrypted, manifest, key_file = _blind_deployment(tmp_path)
    audit_key, _ = generate_signing_key(tmp_path / "audit.key")
    audit_json = tmp_path / "membership.json"
    runner = CliRunner()
    audited = runner.invoke(app, ["audit", "membership", "--model", str(encrypted), "--key", str(key_file),
                                  "--site", str(manifest), "--shadows", "0", "--max-auc", "0.6",
                                  "--out", str(audit_json)])  # fmt: skip
    log = tmp_path / "audit.jsonl"
    common = ["release", "--model", str(encrypted), "--key", str(key_file), "--membership", str(audit_json),
              "--max-auc", "0.6", "--audit-key", str(audit_key), "--audit-log", str(log)]  # fmt: skip

    # Execute
    refused = runner.invoke(app, [*common, "--out", str(tmp_path / "refused")])
    overridden = runner.invoke(app, [*common, "--out", str(tmp_path / "released"), "--override-inconclusive",
                                     "ethics board ticket 42: single-site pilot"])  # fmt: skip

    # Assert: the audit itself says inconclusive (exit 1), the release is refused without override
    record = json.loads(audit_json.read_text())
    assert audited.exit_code == 1 and "release inconclusive" in " ".join(audited.output.split())
    assert record["gate"]["verdict"] == "inconclusive" and record["gate"]["passed"] is False
    assert record["nonmembers"] == 30
    assert refused.exit_code == 1 and "release inconclusive" in " ".join(refused.output.split())
    assert not (tmp_path / "refused" / "final_model.npz").exists()
    # Assert: the override exports, says so, and the audit log records verdict and reason
    assert overridden.exit_code == 0, overridden.output
    assert "INCONCLUSIVE, by override" in " ".join(overridden.output.split())
    assert (tmp_path / "released" / "final_model.npz").exists()
    releases = [json.loads(line)["fields"] for line in log.read_text().splitlines()]
    assert [(r["gate_passed"], r["gate_verdict"], r.get("override_reason")) for r in releases] == [
        (False, "inconclusive", None), (False, "inconclusive", "ethics board ticket 42: single-site pilot"),
    ]


def test_the_report_shows_the_inconclusive_verdict_the_detectable_excess_and_the_override() -> None:
    from fedcare.privacy.report import GateSummary, PrivacyReport, SitePrivacy, render_markdown

    # Prepare
    result = MembershipAuditResult(attacks=(loss_threshold_attack(_blind(0), members=_noise(12, seed=3),
                                                                  nonmembers=_noise(12, seed=4)),))  # fmt: skip
    decision = ReleaseGate(max_auc=0.6).decide(result)

    # Execute
    report = PrivacyReport(study="s", round=1, secure_aggregation=False, sites=(SitePrivacy(site="a", dp_enabled=False),),
                           membership=result, gate=GateSummary.from_decision(decision, override_reason="pilot"))  # fmt: skip
    markdown = render_markdown(report)

    # Assert
    assert "Release gate (max AUC 0.600 on the upper confidence bound): **INCONCLUSIVE**." in markdown
    assert f"detects an AUC excess over 0.5 of {decision.min_detectable_excess:.3f}" in markdown
    assert "too small an audit" in markdown and "explicit override of the inconclusive verdict:** pilot" in markdown
    assert "TPR at 0.1% FPR | TPR at 1% FPR" in markdown and "(unresolved)" in markdown
    with pytest.raises(ValueError, match="only an inconclusive verdict can be overridden"):
        GateSummary(max_auc=0.6, basis="upper", passed=True, verdict="pass", override_reason="x")
