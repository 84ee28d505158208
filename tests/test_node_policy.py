"""The site policy enforced at the node: the real ClientApp train handler refuses before training."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import OrderedDict
from collections.abc import Iterable
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare.client.app import LocalSite, make_client_app
from fedcare.models import ModelSpec, build_for_data, get_weights, wire
from fedcare.privacy.errors import PrivacyWarning
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.policy import (
    NO_SECURE_AGGREGATION_WARNING,
    Rule,
    SitePolicy,
    node_default_policy,
)
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import run_server, train_config
from fedcare.server.config import RunConfig
from fedcare.server.strategy import TooFewSitesError
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import InProcessGrid

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from scenarios import write_wdbc_site  # noqa: E402

APP = "cd" * 32
#: ε = 3 over 3 rounds at δ = 1e-5: the node default policy accepts it (σ ≈ 0.9 on ~200 patients).
DEFAULT_DP = PrivacySettings.with_target(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
#: The strict default, except that the hospital's file accepts plain rounds (the rule tests below
#: send plain rounds; without this every one would be refused on secure_aggregation first).
PLAIN_OK = node_default_policy().model_copy(update={"require_secure_aggregation": False})


@dataclasses.dataclass(frozen=True)
class _Provider:
    site: LocalSite

    def __call__(self, context: Context) -> LocalSite:
        return self.site


def _site(tmp_path: Path, *, privacy: PrivacySettings = DEFAULT_DP, policy: SitePolicy | None = None,
          num_sites: int = 2) -> LocalSite:
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=num_sites, seed=0)[0]
    return LocalSite(data=data, privacy=privacy, ledger_dir=tmp_path / "ledgers", name="hospital-a", seed=1,
                     policy=policy if policy is not None else PLAIN_OK)


def _train_message(*, study: str = "heart", family: str = "logistic", rounds: int = 3) -> tuple[Message, dict[str, np.ndarray]]:
    config = RunConfig(input_shape=(30,), num_rounds=rounds, min_sites=1, checkpoint_dir=Path("/nonexistent"),
                       batch_size=32, lr=0.5, study=study)
    record = train_config(config)
    record[wire.MODEL_SPEC] = ModelSpec(family=family).model_dump_json()
    record[wire.SERVER_ROUND] = 1
    model = build_for_data(ModelSpec(family=family), task="binary", num_classes=2, input_shape=(30,), has_mask=False)
    weights = get_weights(model)
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in weights.items())),
        wire.CONFIG: record,
    })
    if TaskIdentity._run_id is None:  # what flwr sets in a running app (as InProcessGrid does)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "msg-1"
    return msg, weights


def _context(node_config: dict[str, Any] | None = None) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config or {"partition-id": 0}, state=RecordDict(), run_config={})


def _ledger_files(site: LocalSite) -> list[Path]:
    return sorted(Path(site.ledger_dir).glob("*.json")) if Path(site.ledger_dir).exists() else []


@pytest.mark.parametrize(
    ("changes", "msg_changes", "env_hash", "rule", "in_reason"),
    [
        ({"policy": {"allowed_model_families": ["lstm"]}}, {}, None, Rule.MODEL_FAMILY, "'logistic' is not allowed"),
        ({"policy": {"allowed_app_hashes": [APP]}}, {}, "ef" * 32, Rule.APP_HASH, "not one the site pinned"),
        ({"policy": {"allowed_app_hashes": [APP]}}, {}, None, Rule.APP_HASH, "app hash None"),
        ({"policy": {"require_secure_aggregation": True}}, {}, None, Rule.SECURE_AGGREGATION, "must enable SecAgg+"),
        ({"policy": {"min_cohort_size": 1000}}, {}, None, Rule.COHORT_SIZE, "below the minimum 1000"),
        ({"privacy": PrivacySettings.disabled()}, {}, None, Rule.DP_REQUIRED, "must enable privacy"),
        ({"privacy": PrivacySettings.with_target(epsilon=3.0, delta=1e-4)}, {}, None, Rule.DELTA, "exceeds the site's ceiling 1e-05"),
        ({"policy": {"min_noise_multiplier": 5.0}}, {}, None, Rule.NOISE_MULTIPLIER, "below the site's minimum 5"),
        ({"privacy": PrivacySettings.with_target(epsilon=3.0, max_grad_norm=3.0)}, {}, None, Rule.MAX_GRAD_NORM, "exceeds the site's maximum 2"),
        ({"privacy": PrivacySettings.with_target(epsilon=5.0)}, {"rounds": 1}, None, Rule.EPSILON_STUDY, "per-study maximum 3"),
        ({"policy": {"max_epsilon_per_study": 0.5, "max_epsilon_total": 0.5}}, {}, None, Rule.EPSILON_STUDY, "per-study maximum 0.5"),
    ],
)
def test_each_violation_is_refused_at_the_node_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], msg_changes: dict[str, Any],
    env_hash: str | None, rule: Rule, in_reason: str,
) -> None:
    # Prepare
    policy = (SitePolicy.model_validate({**PLAIN_OK.model_dump(), **changes["policy"]})
              if "policy" in changes else None)
    site = _site(tmp_path, privacy=changes.get("privacy", DEFAULT_DP), policy=policy)
    if env_hash is None:
        monkeypatch.delenv("FEDCARE_APP_HASH", raising=False)
    else:
        monkeypatch.setenv("FEDCARE_APP_HASH", env_hash)
    msg, _ = _train_message(**msg_changes)

    # Execute
    reply = make_client_app(_Provider(site))(msg, _context())

    # Assert
    assert reply.has_error() and not reply.has_content()  # no model goes back
    assert reply.error.code == wire.ERROR_POLICY
    assert reply.error.reason.startswith("site 'hospital-a' refused to train: site policy refuses the round")
    assert f"[{rule.value}]" in reply.error.reason and in_reason in reply.error.reason
    assert _ledger_files(site) == []  # nothing charged, nothing written


def test_total_epsilon_counts_the_sites_other_studies(tmp_path: Path) -> None:
    # Prepare: another study of this site already spent ε ≈ 5.39 (a second site's ledger is ignored);
    # the round below trains to 3 − 0.6 (the policy's reserve for the count and evaluations), so its
    # first of 3 rounds projects well above the 0.61 left
    site = _site(tmp_path)
    for name, steps in (("hospital-a", 40), ("hospital-b", 2000)):
        other = PrivacyLedger.open(site.ledger_dir, site=name, study="earlier-study", accountant="rdp",
                                   delta=1e-5, epsilon_budget=1e6)
        other.commit_round(round_index=1, noise_multiplier=1.0, sample_rate=0.1, steps=steps)
    spent = PrivacyLedger.open(site.ledger_dir, site="hospital-a", study="earlier-study").spent_epsilon()
    assert 5.0 < spent < 6.0  # the round below (its projection > 0.61) takes the total past 6
    before = {p: p.read_bytes() for p in _ledger_files(site)}
    msg, _ = _train_message()

    # Execute
    reply = make_client_app(_Provider(site))(msg, _context())

    # Assert
    assert reply.has_error() and reply.error.code == wire.ERROR_POLICY
    assert "[epsilon_total]" in reply.error.reason and f"(spent {spent:.6g})" in reply.error.reason
    assert {p: p.read_bytes() for p in _ledger_files(site)} == before


def test_a_conforming_plain_round_that_the_policy_allows_trains_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the hospital's policy accepts plain rounds (require_secure_aggregation = false)
    site = _site(tmp_path, policy=PLAIN_OK)
    msg, weights = _train_message()

    # Execute
    with pytest.warns(PrivacyWarning, match=re.escape(NO_SECURE_AGGREGATION_WARNING)):
        reply = make_client_app(_Provider(site))(msg, _context())

    # Assert
    assert not reply.has_error()
    trained = {k: v.numpy() for k, v in reply.content[wire.ARRAYS].items()}
    assert any(not np.array_equal(trained[k], weights[k]) for k in weights)
    assert 0 < float(reply.content[wire.METRICS][wire.EPSILON]) <= 3.0
    assert len(_ledger_files(site)) == 1
    assert NO_SECURE_AGGREGATION_WARNING in caplog.text
    assert "allowed by the site's policy" in NO_SECURE_AGGREGATION_WARNING




def test_a_missing_policy_file_gives_the_strict_default_secagg_included(tmp_path: Path) -> None:
    # Prepare: a node with no "policy" key in its node config; a plain round
    from fedcare.client.app import app

    node = {"site-manifest": str(write_wdbc_site(tmp_path)), "ledger-dir": str(tmp_path / "ledger")}
    msg, _ = _train_message()

    # Execute
    reply = app(msg, _context(node))

    # Assert
    default = node_default_policy()
    assert default == SitePolicy.strict_default() and default.require_secure_aggregation
    assert (default.max_epsilon_per_study, default.max_epsilon_total, default.max_delta) == (3.0, 6.0, 1e-5)
    assert (default.min_noise_multiplier, default.max_grad_norm, default.min_cohort_size) == (0.5, 2.0, 20)
    assert default.require_dp and default.weakening_settings() == []
    assert reply.has_error() and reply.error.code == wire.ERROR_POLICY
    assert "site 'wdbc' refused to train" in reply.error.reason and "[secure_aggregation]" in reply.error.reason
    assert "secure-aggregation = true" in reply.error.reason  # says what the coordinator must do
    assert not (tmp_path / "ledger").exists() or not list((tmp_path / "ledger").glob("*.json"))


def test_a_node_without_a_policy_file_applies_the_strict_epsilon_limit_in_a_secure_round(tmp_path: Path) -> None:
    # Prepare: ε = 5 is within the site's own budget but above the default policy's 3 per study;
    # the round is marked as running inside secaggplus_mod (what client.secure sets), so the
    # secure_aggregation rule passes and the ε rule refuses
    from fedcare.client.app import app
    from fedcare.client.secure import SECURE_ROUND_STATE

    (tmp_path / "privacy.toml").write_text("[privacy]\ntarget_epsilon = 5.0\n")
    node = {"site-manifest": str(write_wdbc_site(tmp_path)), "ledger-dir": str(tmp_path / "ledger"),
            "privacy-settings": str(tmp_path / "privacy.toml")}
    msg, _ = _train_message(rounds=1)  # + the default retry reserve of 2: noise planned over 3 rounds
    context = _context(node)
    context.state.config_records[SECURE_ROUND_STATE] = ConfigRecord({"active": True})

    # Execute
    reply = app(msg, context)

    # Assert
    assert reply.has_error() and reply.error.code == wire.ERROR_POLICY
    assert "site 'wdbc' refused to train" in reply.error.reason and "[epsilon_study]" in reply.error.reason
    assert not (tmp_path / "ledger").exists() or not list((tmp_path / "ledger").glob("*.json"))


class _WireGrid(InProcessGrid):
    """InProcessGrid that copies every message, as the wire does (SecAgg+'s mod pops record keys)."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        copies = [Message(content=copy.deepcopy(m.content), metadata=copy.copy(m.metadata)) for m in messages]
        return super().send_and_receive(copies, timeout=timeout)


def test_nodes_without_a_policy_file_refuse_a_plain_study_and_train_in_a_secure_one(tmp_path: Path) -> None:
    # Prepare: three deployed ClientApps, each with its own manifest name and ledger, no policy file,
    # the default privacy settings (DP-SGD to ε = 3)
    from fedcare.client.app import app

    manifest = write_wdbc_site(tmp_path)
    grid_nodes = {"site-manifest": str(manifest)}

    def grid() -> _WireGrid:
        g = _WireGrid(app, 3, node_config=grid_nodes)  # 3: the default policy's min_secure_cohort
        for node_id, name in zip(g.get_node_ids(), ("hospital-a", "hospital-b", "hospital-c"), strict=True):
            g._contexts[node_id].node_config.update(  # noqa: SLF001 - one site per node
                {"site-name": name, "ledger-dir": str(tmp_path / "ledgers" / name)}
            )
        return g

    common = dict(input_shape=(30,), num_rounds=2, min_sites=3, lr=0.5, batch_size=32, study="secure-default",
                  round_timeout_s=60.0)
    plain = RunConfig(checkpoint_dir=tmp_path / "plain", **common)  # type: ignore[arg-type]
    secure = RunConfig(checkpoint_dir=tmp_path / "secure", secure_aggregation=True, **common)  # type: ignore[arg-type]

    # Execute / Assert: the plain study is refused by both sites on the secure_aggregation rule
    with pytest.raises(TooFewSitesError, match=r"secure_aggregation"):
        run_server(grid(), plain)
    assert not list((tmp_path / "ledgers").rglob("*.json"))  # nothing charged

    history = run_server(grid(), secure)

    assert len(history.rounds) == 2 and all(r.complete for r in history.rounds)
    last = history.rounds[-1]
    assert set(last.site_train) == {"hospital-a", "hospital-b", "hospital-c"}
    assert all(0 < m["epsilon"] <= 3.0 for m in last.site_train.values())
    assert last.train["secure-aggregation"] == 1.0


def test_a_node_policy_file_is_read_and_an_invalid_one_refuses_every_round(tmp_path: Path) -> None:
    # Prepare
    from fedcare.client.app import app

    policy = tmp_path / "policy.toml"
    policy.write_text('require_secure_aggregation = false\nallowed_model_families = ["cnn"]\n')
    node = {"site-manifest": str(write_wdbc_site(tmp_path)), "ledger-dir": str(tmp_path / "ledger"), "policy": str(policy)}
    msg, _ = _train_message()

    # Execute
    with pytest.warns(UserWarning, match="require_secure_aggregation = false"):
        refused = app(msg, _context(node))
    policy.write_text("max_epsilon = 3\n")
    broken = app(_train_message()[0], _context(node))

    # Assert
    assert refused.error.code == wire.ERROR_POLICY and "[model_family]" in refused.error.reason
    assert broken.error.code == wire.ERROR_POLICY and "max_epsilon: Extra inputs are not permitted" in broken.error.reason


def test_virtual_hospitals_get_the_node_default_or_the_scenarios_policy_table() -> None:
    # Prepare
    from fedcare.simulations.runner import _site_policy
    from fedcare.simulations.scenario import Scenario

    base = {"name": "x", "data": {"kind": "sklearn", "name": "breast_cancer"}}

    # Execute
    default = _site_policy(Scenario.model_validate(base))
    looser = _site_policy(Scenario.model_validate({**base, "policy": {"max_epsilon_per_study": 20.0,
                                                                        "max_epsilon_total": 40.0}}))

    # Assert
    assert default == node_default_policy() == SitePolicy.strict_default()
    assert (looser.max_epsilon_per_study, looser.max_epsilon_total) == (20.0, 40.0)
    assert looser.require_secure_aggregation and looser.max_delta == 1e-5  # other keys: node default


def test_the_default_scenario_passes_the_node_default_policy(tmp_path: Path) -> None:
    # Prepare: the built-in scenario's DP settings, one of its virtual hospitals, its 5 rounds, in
    # a round marked as running inside secaggplus_mod (the scenario turns SecAgg+ on)
    from fedcare.client.secure import SECURE_ROUND_STATE
    from fedcare.simulations.runner import _site_policy, build_hospitals
    from fedcare.simulations.scenario import DEFAULT_SCENARIO, load_scenario

    scenario = load_scenario(DEFAULT_SCENARIO)
    assert scenario.secure_aggregation.enabled and _site_policy(scenario) == node_default_policy()
    data = build_hospitals(scenario)[0]
    site = LocalSite(data=data, privacy=scenario.privacy, ledger_dir=tmp_path / "ledgers", name=data.name, seed=0,
                     policy=node_default_policy())
    msg, _ = _train_message(rounds=scenario.rounds)
    context = _context()
    context.state.config_records[SECURE_ROUND_STATE] = ConfigRecord({"active": True})

    # Execute
    reply = make_client_app(_Provider(site))(msg, context)

    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0 < float(reply.content[wire.METRICS][wire.EPSILON]) <= 3.0


def test_a_site_that_accepts_non_dp_rounds_keeps_training_and_refuses_dp_after_them(tmp_path: Path) -> None:
    # Prepare
    permissive = SitePolicy.model_validate({**PLAIN_OK.model_dump(), "require_dp": False})
    site = _site(tmp_path, privacy=PrivacySettings.disabled(), policy=permissive)
    app = make_client_app(_Provider(site))

    # Execute: two non-DP rounds, then the same site switched to DP in another study
    replies = []
    for server_round in (1, 2):
        msg, _ = _train_message()
        msg.content[wire.CONFIG][wire.SERVER_ROUND] = server_round
        replies.append(app(msg, _context()))
    dp_app = make_client_app(_Provider(dataclasses.replace(site, privacy=DEFAULT_DP)))
    dp_reply = dp_app(_train_message(study="later-study")[0], _context())

    # Assert
    assert [r.has_error() for r in replies] == [False, False]
    assert dp_reply.has_error() and dp_reply.error.code == wire.ERROR_POLICY
    assert "[epsilon_total]" in dp_reply.error.reason and "another study of this site" in dp_reply.error.reason
    assert "WITHOUT differential privacy" in dp_reply.error.reason


def test_node_start_checks_the_policy_file_before_starting_anything(tmp_path: Path) -> None:
    # Prepare
    from typer.testing import CliRunner

    from fedcare.cli import app as cli

    bad = tmp_path / "policy.toml"
    bad.write_text("max_epsilon = 3\n")
    common = ["node", "start", "--site", str(tmp_path / "site.toml"), "--superlink", "127.0.0.1:9",
              "--port", "9", "--insecure", "--state", str(tmp_path / "state")]

    # Execute
    invalid = CliRunner().invoke(cli, [*common, "--policy", str(bad)])
    missing = CliRunner().invoke(cli, [*common, "--policy", str(tmp_path / "nope.toml")])

    # Assert
    assert invalid.exit_code == 1 and "max_epsilon" in invalid.output
    assert missing.exit_code == 1 and "site policy file" in missing.output and "--policy" in missing.output
    assert not (tmp_path / "state").exists()  # no SuperNode was started
