"""Clear failures (issue 13 item 6): a node whose TLS settings do not fit the SuperLink fails in
seconds with a message that names the cause, instead of waiting out its ready timeout.

Real SuperLinks on 127.0.0.1 (one with TLS + node authentication, one plaintext), started and
stopped by PID (``deploy_support.federation``); the node under test is refused before any
SuperNode process starts. Times are printed, never asserted (house rule); the bound that matters
is the ready timeout given to ``start_node`` (120 s, flwr's usual wait), which a refusal by the
probe never reaches.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from deploy_support import NO_APP_PIN, Federation, federation, free_port, heart_manifest  # noqa: E402

from fedcare.client.deploy import (  # noqa: E402
    NodeSettings,
    NodeTlsError,
    _tls_error_from_log,
    probe_superlink_tls,
    start_node,
)
from fedcare.privacy.certs import init_certificates, write_node_bundle  # noqa: E402
from fedcare.server.deploy import SuperLinkSettings, start_superlink  # noqa: E402
from fedcare.supervise import ProcessHandle, stop_process  # noqa: E402

SITE = "cleveland"

#: what flwr 1.42's SuperNode logged (exit code 305) with a wrong CA and against a plaintext
#: SuperLink (measured on this machine with the integration setting below)
WRONG_CA_LOG = """\
ERROR :     SSL/TLS handshake error detected.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)
"""
PLAINTEXT_LOG = """\
ERROR :     SSL/TLS handshake error detected.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)
"""


def _settings(tmp_path: Path, **values: object) -> NodeSettings:
    for name in ("site.toml", "ca.crt", "node.key"):
        (tmp_path / name).touch()
    manifest = tmp_path / "site.toml"
    return NodeSettings(site_manifest=manifest, port=free_port(), state_dir=tmp_path / "node",
                        trusted_app_hashes=(NO_APP_PIN,), **values)  # type: ignore[arg-type]


# --- no processes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("log", "cause"), [(WRONG_CA_LOG, "did not sign"), (PLAINTEXT_LOG, "does not speak TLS")])
def test_a_supernode_s_tls_error_line_names_the_cause(tmp_path: Path, log: str, cause: str) -> None:
    settings = _settings(tmp_path, superlink="127.0.0.1:9300", ca_cert=tmp_path / "ca.crt", auth_key=tmp_path / "node.key")
    error = _tls_error_from_log(settings, log)
    assert isinstance(error, NodeTlsError) and cause in str(error)
    assert _tls_error_from_log(settings, "Failed to activate SuperNode") is None


def test_a_superlink_that_does_not_answer_is_left_to_flwr_s_retries(tmp_path: Path) -> None:
    settings = _settings(tmp_path, superlink=f"127.0.0.1:{free_port()}", insecure=True)
    assert probe_superlink_tls(settings, timeout=2.0) is False


# --- real SuperLinks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[tuple[Federation, str, Path, Path]]:
    """A TLS SuperLink (node auth), a plaintext one, another federation's CA, and a site manifest."""
    root = tmp_path_factory.mktemp("tls")
    plain: ProcessHandle | None = None
    with federation(root, nodes=[SITE]) as fed:
        try:
            other = write_node_bundle(init_certificates(root / "other-certs", server_name="localhost").root,
                                      root / "other-bundle")
            plain_address = f"127.0.0.1:{free_port()}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the plaintext SuperLink's own (expected) warning
                plain = start_superlink(SuperLinkSettings(address=plain_address, state_dir=root / "plain-link",
                                                          insecure=True))
            yield fed, plain_address, other, heart_manifest(shared_data, SITE, root / "manifests")
        finally:
            if plain is not None:
                stop_process(plain)


def _refused(settings: NodeSettings) -> tuple[NodeTlsError, float]:
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the --insecure node's plaintext warning (tested elsewhere)
        with pytest.raises(NodeTlsError) as info:
            start_node(settings, ready_timeout=120.0)
    return info.value, time.monotonic() - started


@pytest.mark.integration
@pytest.mark.slow
def test_an_insecure_node_against_a_tls_superlink_is_refused_naming_tls(
    links: tuple[Federation, str, Path, Path], tmp_path: Path
) -> None:
    fed, _, _, manifest = links
    settings = NodeSettings(site_manifest=manifest, superlink=fed.address, port=free_port(),
                            state_dir=tmp_path / "insecure", insecure=True, trusted_app_hashes=(NO_APP_PIN,))
    error, took = _refused(settings)
    print(f"--insecure against TLS refused after {took:.1f} s: {error}")
    assert "speaks TLS, but this node was started with --insecure" in str(error)
    assert "--ca" in str(error)
    assert not (tmp_path / "insecure" / "supernode.pid").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_a_node_with_another_federation_s_ca_is_refused_naming_the_ca(
    links: tuple[Federation, str, Path, Path], tmp_path: Path
) -> None:
    fed, _, other_ca, manifest = links
    settings = NodeSettings(site_manifest=manifest, superlink=fed.address, port=free_port(),
                            state_dir=tmp_path / "wrong-ca", ca_cert=other_ca,
                            auth_key=fed.node_keys[SITE].private_key, trusted_app_hashes=(NO_APP_PIN,))
    error, took = _refused(settings)
    print(f"wrong CA refused after {took:.1f} s: {error}")
    assert f"the CA certificate {other_ca} (--ca) did not sign" in str(error)
    assert not (tmp_path / "wrong-ca" / "supernode.pid").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_a_tls_node_against_a_plaintext_superlink_is_refused_naming_the_mismatch(
    links: tuple[Federation, str, Path, Path], tmp_path: Path
) -> None:
    fed, plain_address, _, manifest = links
    settings = NodeSettings(site_manifest=manifest, superlink=plain_address, port=free_port(),
                            state_dir=tmp_path / "tls-vs-plain", ca_cert=fed.bundle_ca,
                            auth_key=fed.node_keys[SITE].private_key, trusted_app_hashes=(NO_APP_PIN,))
    error, took = _refused(settings)
    print(f"TLS against plaintext refused after {took:.1f} s: {error}")
    assert "does not speak TLS" in str(error) and "--certs" in str(error)


@pytest.mark.integration
@pytest.mark.slow
def test_matching_settings_pass_the_probe(links: tuple[Federation, str, Path, Path], tmp_path: Path) -> None:
    fed, plain_address, _, manifest = links
    tls = NodeSettings(site_manifest=manifest, superlink=fed.address, port=free_port(), state_dir=tmp_path / "a",
                       ca_cert=fed.bundle_ca, auth_key=fed.node_keys[SITE].private_key,
                       trusted_app_hashes=(NO_APP_PIN,))
    plain = NodeSettings(site_manifest=manifest, superlink=plain_address, port=free_port(),
                         state_dir=tmp_path / "b", insecure=True, trusted_app_hashes=(NO_APP_PIN,))
    assert probe_superlink_tls(tls) is True
    assert probe_superlink_tls(plain) is True
