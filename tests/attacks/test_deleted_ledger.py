"""Attack (issue 11, finding 10): delete a hospital's ledger file, or put an older copy back, to reset ε.

Written as the attacker: an operator at the site (or a careless restore) removes the study's
ledger JSON after the site has spent ε, or replaces it with a copy from before the last rounds.
Before the fix ``PrivacyLedger.open`` then started a fresh ledger at ε = 0 (or at the older ε) and
the site trained again on a reset budget.

Now every ledger write is appended to the site's hash-chained spend record
(``privacy.spend_record``); opening a ledger (each ClientApp round) and ``fedcare node start``
refuse a missing or rolled-back ledger with ``LedgerRollbackError`` saying how to restore it, and
ε is never reset. With ``FEDCARE_SPEND_RECORD_COPY`` set, even the deletion of the whole ledger
folder is caught (without a copy it cannot be: nothing inside a deleted folder survives).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context
from typer.testing import CliRunner

from fedcare.cli import app as fedcare_app
from fedcare.client.app import LocalSite, make_client_app
from fedcare.client.dataset import SiteData, Split
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import build_model
from fedcare.privacy.errors import LedgerRollbackError
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings
from fedcare.privacy.spend_record import COPY_ENV, SpendRecord
from fedcare.server.app import run_server
from fedcare.server.config import RunConfig
from fedcare.server.strategy import TooFewSitesError
from fedcare.simulations.builtin import load_builtin
from fedcare.simulations.partition import PartitionScheme, partition
from fedcare.simulations.runner import InProcessGrid

SITE, STUDY = "hospital-a", "cardio"
PRIVACY = PrivacySettings.with_noise(noise_multiplier=1.5, epsilon_budget=5.0)


def _data() -> SiteData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    split = Split(inputs=(x,), targets=(x[:, 0] > 0).long())
    return SiteData(name=SITE, kind="table", task="binary", num_classes=2, input_shape=(4,),
                    train=split, val=split, test=split)


def _train_round(folder: Path, round_index: int) -> float:
    """One real DP-SGD round through train_local with the site's persistent ledger; return ε after it."""
    ledger = PrivacyLedger.open(folder, site=SITE, study=STUDY)
    model = build_model("logistic", in_features=4)
    result = train_local(model, _data(), train=TrainSettings(batch_size=20, seed=round_index), privacy=PRIVACY,
                         ledger=ledger, planned_rounds=3, round_index=round_index)
    return result.epsilon


def test_a_deleted_ledger_stops_the_site_instead_of_restarting_at_zero(tmp_path: Path) -> None:
    # Prepare: the site spends ε in two DP rounds
    spent = [_train_round(tmp_path, 1), _train_round(tmp_path, 2)]
    assert 0 < spent[0] < spent[1]
    ledger_file = PrivacyLedger.path_for(tmp_path, site=SITE, study=STUDY)

    # Execute: the attacker deletes the ledger file
    ledger_file.unlink()

    # Assert: the site refuses to open the study, and to train, saying how to restore it
    with pytest.raises(LedgerRollbackError) as err:
        PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)
    message = str(err.value)
    assert "is missing" in message and "restore the ledger file from a backup" in message
    assert f"{spent[1]:.4f}" in message
    with pytest.raises(LedgerRollbackError):
        _train_round(tmp_path, 3)
    assert not ledger_file.exists()  # no fresh ledger at ε = 0 was written


def test_an_older_copy_put_back_is_refused_as_a_rollback(tmp_path: Path) -> None:
    # Prepare: keep a copy after round 1, spend more in round 2
    _train_round(tmp_path, 1)
    ledger_file = PrivacyLedger.path_for(tmp_path, site=SITE, study=STUDY)
    older = tmp_path.parent / f"{tmp_path.name}-round1.json"
    shutil.copy(ledger_file, older)
    after_round_2 = _train_round(tmp_path, 2)

    # Execute: the attacker puts the round-1 copy back
    shutil.copy(older, ledger_file)

    # Assert
    with pytest.raises(LedgerRollbackError, match="rolled back") as err:
        _train_round(tmp_path, 3)
    assert f"{after_round_2:.4f}" in str(err.value)
    with pytest.raises(LedgerRollbackError):
        PrivacyLedger.open(tmp_path, site=SITE, study=STUDY)


def test_a_deleted_ledger_of_another_study_also_stops_the_site(tmp_path: Path) -> None:
    # Prepare: ε spent in study "cardio"; the site is then asked to train another study
    _train_round(tmp_path, 1)
    PrivacyLedger.path_for(tmp_path, site=SITE, study=STUDY).unlink()

    # Execute / Assert: the site-wide total would be too low, so it refuses every study
    with pytest.raises(LedgerRollbackError, match="study 'cardio' is missing"):
        PrivacyLedger.open(tmp_path, site=SITE, study="another-study")


def test_the_node_refuses_to_start(tmp_path: Path) -> None:
    # Prepare: spend ε, then delete the ledger; a manifest naming the site
    ledgers = tmp_path / "ledger"
    _train_round(ledgers, 1)
    PrivacyLedger.path_for(ledgers, site=SITE, study=STUDY).unlink()
    csv = tmp_path / "a.csv"
    csv.write_text("x1,x2,y\n" + "".join(f"{i % 7},{i % 5},{i % 2}\n" for i in range(60)))
    manifest = tmp_path / "site.toml"
    manifest.write_text(f'site = "{SITE}"\ntask = "binary"\nclasses = [0, 1]\n'
                        '[data]\nkind = "table"\npath = "a.csv"\ntarget = "y"\n')

    # Execute: `fedcare node start` (it must stop before any SuperNode is launched)
    result = CliRunner().invoke(fedcare_app, [
        "node", "start", "--site", str(manifest), "--superlink", "127.0.0.1:1", "--port", "1",
        "--ledger-dir", str(ledgers), "--state", str(tmp_path / "state"), "--insecure",
    ])

    # Assert
    assert result.exit_code == 1, result.output
    assert "LedgerRollbackError" in result.output or "is missing" in result.output
    assert "restore the ledger file from a backup" in result.output
    assert not (tmp_path / "state" / "supernode.pid").exists()


@dataclasses.dataclass(frozen=True)
class _Sites:
    sites: tuple[LocalSite, ...]

    def __call__(self, context: Context) -> LocalSite:
        return self.sites[int(context.node_config["partition-id"])]


def test_the_client_app_refuses_to_train_after_the_ledger_is_deleted(tmp_path: Path) -> None:
    # Prepare: two hospitals train one federated DP round (real ClientApp, real ledgers)
    data = partition(load_builtin("breast_cancer"), scheme=PartitionScheme(kind="iid"), num_sites=2, seed=0)
    sites = _Sites(tuple(LocalSite(data=d, privacy=PRIVACY, ledger_dir=tmp_path / "ledgers", name=d.name, seed=i)
                         for i, d in enumerate(data)))

    def config(run: str) -> RunConfig:
        return RunConfig(study=STUDY, input_shape=(30,), num_rounds=1, min_sites=2, batch_size=64,
                         checkpoint_dir=tmp_path / run)

    run_server(InProcessGrid(make_client_app(sites), 2), config("first"))
    victim = PrivacyLedger.path_for(tmp_path / "ledgers", site="site-000", study=STUDY)
    recorded = SpendRecord(tmp_path / "ledgers", site="site-000").last_by_study()[STUDY][0]
    assert recorded > 0

    # Execute: the ledger of site-000 is deleted, and the coordinator starts the study again
    victim.unlink()
    with pytest.raises(TooFewSitesError) as err:
        run_server(InProcessGrid(make_client_app(sites), 2), config("second"))

    # Assert: site-000 refused (ledger error) and did not start over at ε = 0
    assert "site-000" in str(err.value) and "LedgerRollbackError" in str(err.value)
    assert not victim.exists()


def test_with_a_copy_even_the_whole_ledger_folder_deleted_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the hospital keeps a copy of the spend record outside the ledger folder
    monkeypatch.setenv(COPY_ENV, str(tmp_path / "record-copy"))
    ledgers = tmp_path / "ledgers"
    _train_round(ledgers, 1)

    # Execute: the whole ledger folder (ledgers and record) is deleted
    shutil.rmtree(ledgers)

    # Assert
    with pytest.raises(LedgerRollbackError, match="ledger folder was deleted or replaced"):
        PrivacyLedger.open(ledgers, site=SITE, study=STUDY)
