"""What a deployment refuses: unregistered nodes, plaintext nodes, silent plaintext, failed runs.

The integration tests share one real SuperLink (TLS + SuperNode authentication) on 127.0.0.1;
every process is stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import (  # noqa: E402
    NO_APP_PIN,
    TINY_APP,
    Federation,
    federation,
    free_port,
    heart_manifest,
)

from fedcare.client.deploy import (  # noqa: E402
    ConflictingNodeTlsError,
    NodeInsecureNotRequestedError,
    NodePlaintextWarning,
    NodeSettings,
    NodeTlsError,
    node_config_string,
    start_node,
)
from fedcare.server.cli import run_command, server_app  # noqa: E402
from fedcare.server.deploy import (  # noqa: E402
    ConflictingTlsOptionsError,
    FlowerConnection,
    InsecureNotRequestedError,
    NodeRegistrationError,
    SuperLinkSettings,
    register_node,
    superlink_command,
)
from fedcare.server.flower_app import (  # noqa: E402
    AppFolderExistsError,
    InvalidStudyError,
    build_flower_app,
    load_study,
)
from fedcare.supervise import ProcessExitedError  # noqa: E402

REGISTERED = "cleveland"
UNREGISTERED = "hungarian"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A TLS SuperLink with node authentication; only ``cleveland``'s key is registered."""
    root = tmp_path_factory.mktemp("refusals")
    with federation(
        root,
        nodes=[REGISTERED, UNREGISTERED],
        register=[REGISTERED],
        extra_env={"PYTHONPATH": str(TINY_APP)},
    ) as running:
        yield running


# --- no processes ---------------------------------------------------------------------------


def test_superlink_without_certs_needs_explicit_insecure(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(InsecureNotRequestedError, match="--insecure"):
        SuperLinkSettings(address="127.0.0.1:9300", state_dir=tmp_path)
    with pytest.raises(ConflictingTlsOptionsError):
        SuperLinkSettings(
            address="127.0.0.1:9300", state_dir=tmp_path, certs_dir=tmp_path, insecure=True
        )
    insecure = SuperLinkSettings(address="127.0.0.1:9300", state_dir=tmp_path, insecure=True)
    assert "--insecure" in superlink_command(insecure)
    assert "--enable-supernode-auth" not in superlink_command(insecure)


def test_cli_server_start_refuses_plaintext_without_flag(tmp_path: Path) -> None:
    # Execute
    result = CliRunner().invoke(
        server_app, ["start", "--address", "127.0.0.1:9300", "--state", str(tmp_path)]
    )

    # Assert
    assert result.exit_code == 1
    assert "--insecure" in result.output
    assert not (tmp_path / "superlink.pid").exists()


def test_node_without_certs_needs_explicit_insecure(tmp_path: Path, shared_data: Path) -> None:
    # Prepare
    manifest = heart_manifest(shared_data, REGISTERED, tmp_path)
    common = {"site_manifest": manifest, "superlink": "127.0.0.1:9300", "port": 9400,
              "state_dir": tmp_path}  # fmt: skip

    # Execute / Assert
    with pytest.raises(NodeInsecureNotRequestedError, match="--insecure"):
        NodeSettings(**common)
    with pytest.raises(ConflictingNodeTlsError):
        NodeSettings(**common, insecure=True, auth_key=manifest)


def test_connection_needs_ca_or_explicit_insecure(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(InsecureNotRequestedError):
        FlowerConnection(address="127.0.0.1:9300")
    with pytest.raises(FileNotFoundError):
        FlowerConnection(address="127.0.0.1:9300", root_certificates=tmp_path / "ca.crt")


def test_connection_write_keeps_other_connections(tmp_path: Path) -> None:
    # Prepare
    from flwr.cli.flower_config import read_superlink_connection

    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder")

    # Execute
    FlowerConnection(address="127.0.0.1:9300", root_certificates=ca).write(tmp_path)

    # Assert: read back with flwr's own reader
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", str(tmp_path))
        ours = read_superlink_connection("fedcare")
        theirs = read_superlink_connection(None)
    assert ours.address == "127.0.0.1:9300"
    assert ours.root_certificates == str(ca.resolve())
    assert not ours.insecure
    assert theirs.name == "local"


def test_node_config_string_round_trips_through_flwr_parser() -> None:
    # Prepare
    from flwr.common.config import parse_config_args

    values = {"site-manifest": "/data/a b/it's.toml", "site-name": "va", "ledger-dir": "/l\\x"}

    # Execute
    parsed = parse_config_args([node_config_string(values)])

    # Assert
    assert parsed == values


def test_study_with_an_invalid_run_config_is_refused(tmp_path: Path) -> None:
    # Prepare
    study = tmp_path / "bad.toml"
    study.write_text('[study]\nname = "bad"\n\n[run]\ninput-shape = "15"\nnum-rounds = 2\n')

    long_name = tmp_path / "long.toml"
    long_name.write_text('[study]\nname = "heart-disease-deployment-test"\n\n[run]\ninput-shape = "15"\n')

    # Execute / Assert: the key is num-server-rounds; flwr caps app names at 32 characters
    with pytest.raises(InvalidStudyError, match="num-rounds"):
        load_study(study)
    with pytest.raises(InvalidStudyError, match="32 characters"):
        load_study(long_name)


def test_built_app_ships_only_a_pyproject_pointing_at_installed_modules(tmp_path: Path) -> None:
    # Prepare
    study = tmp_path / "heart.toml"
    study.write_text('[study]\nname = "heart"\n\n[run]\ninput-shape = "15"\nmin-sites = 3\n')

    # Execute
    folder = build_flower_app(load_study(study), tmp_path / "app")

    # Assert
    assert [p.name for p in folder.iterdir()] == ["pyproject.toml"]
    doc = tomllib.loads((folder / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedcare.server.app:app",
        "clientapp": "fedcare.client.app:app",
    }
    config = doc["tool"]["flwr"]["app"]["config"]
    # the full run configuration, every key written and sorted: the hash depends on it alone
    # (plus the empty tracking keys `fedcare run --mlflow-uri/--tensorboard` may override)
    expected = {**load_study(study).run_config().to_run_config(), "tracking-mlflow-uri": "", "tracking-tensorboard": ""}
    assert config == dict(sorted(expected.items()))
    assert (config["study"], config["input-shape"], config["min-sites"]) == ("heart", "15", 3)
    assert list(config) == sorted(config)
    with pytest.raises(AppFolderExistsError):
        (folder / "stray.py").write_text("")
        build_flower_app(load_study(study), folder)


# --- real processes -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_unregistered_node_is_refused(fed: Federation, shared_data: Path) -> None:
    # Prepare
    manifest = heart_manifest(shared_data, UNREGISTERED, fed.root / "manifests")

    # Execute
    with pytest.raises(ProcessExitedError) as info:
        fed.start_node(UNREGISTERED, manifest, ready_timeout=60.0, trusted_app_hashes=(NO_APP_PIN,))

    # Assert: the SuperLink answered HTTP 412 "Failed to activate SuperNode"; flwr exits 305
    assert info.value.returncode not in (None, 0)
    assert "Failed to activate SuperNode" in info.value.log_tail
    assert "SuperNode ID" not in info.value.log_tail


@pytest.mark.integration
@pytest.mark.slow
def test_registering_a_key_twice_is_refused(fed: Federation) -> None:
    # Execute / Assert
    with pytest.raises(NodeRegistrationError, match="already in use"):
        register_node(fed.node_keys[REGISTERED].public_key, fed.connection)


@pytest.mark.integration
@pytest.mark.slow
def test_plaintext_node_cannot_connect_to_tls_superlink(
    fed: Federation, shared_data: Path, tmp_path: Path
) -> None:
    # Prepare
    manifest = heart_manifest(shared_data, REGISTERED, fed.root / "manifests")
    settings = NodeSettings(
        site_manifest=manifest,
        superlink=fed.address,
        port=free_port(),
        state_dir=tmp_path / "plain",
        insecure=True,
        max_wait_time=5.0,
        trusted_app_hashes=(NO_APP_PIN,),
    )
    # Execute
    with pytest.warns(NodePlaintextWarning), pytest.raises(NodeTlsError) as info:
        start_node(settings, ready_timeout=45.0)

    # Assert: refused before any SuperNode started, naming the cause (tests/test_tls_failures.py)
    assert "speaks TLS, but this node was started with --insecure" in str(info.value)
    assert not (tmp_path / "plain" / "supernode.pid").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_fedcare_run_exits_nonzero_when_the_serverapp_raises(
    fed: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the tiny app's ServerApp raises at once when fail = true (needs no node)
    monkeypatch.setenv("PYTHONPATH", str(TINY_APP))
    monkeypatch.syspath_prepend(str(TINY_APP))
    study = tmp_path / "failing.toml"
    study.write_text(
        '[study]\nname = "failing"\n\n'
        '[run]\nnum-server-rounds = 1\nmin-nodes = 1\nfail = true\nout-dir = ""\n\n'
        '[app]\nserverapp = "fedcare_tiny_app.server_app:app"\n'
        'clientapp = "fedcare_tiny_app.client_app:app"\n'
    )
    cli = typer.Typer()
    cli.command()(run_command)

    # Execute
    result = CliRunner().invoke(
        cli,
        [str(study), "--superlink", fed.coordinator_address, "--certs", str(fed.certs.root),
         "--control-token", str(fed.control_token), "--timeout", "240"],
    )  # fmt: skip

    # Assert
    assert result.exit_code == 1, result.output
    assert "finished:failed" in result.output
    assert "failing on purpose" in result.output
