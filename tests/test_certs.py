"""Certificates and node keys: SANs, signatures, key formats flwr loads, file modes, refusals.

The coordinator's folder holds the CA and server keys only; node keys are made at the hospital
(``generate_node_key``, ``fedcare node keygen``).
"""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from typer.testing import CliRunner

from fedcare.privacy.certs import (
    CertificateLayout,
    CertificateVerificationError,
    InvalidNodeNameError,
    InvalidSubjectAltNameError,
    KeyFileExistsError,
    MissingCertificateError,
    NodeKeyPaths,
    generate_node_key,
    init_certificates,
    load_certificate,
    verify_server_certificate,
)
from fedcare.server.cli import certs_app

NODES = ["hospital-a", "hospital-b"]


@pytest.fixture()
def layout(tmp_path: Path) -> CertificateLayout:
    """A certificate folder with a public name and one extra IP."""
    return init_certificates(tmp_path / "certs", server_name="fl.example.org", ips=["10.1.2.3"])


@pytest.fixture()
def node_keys(tmp_path: Path) -> dict[str, NodeKeyPaths]:
    """Two hospitals' key pairs, each made in the hospital's own folder."""
    return {n: generate_node_key(tmp_path / "hospitals" / n, n) for n in NODES}


def _sans(layout: CertificateLayout) -> x509.SubjectAlternativeName:
    cert = load_certificate(layout.server_cert)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_server_certificate_sans_always_include_loopback(layout: CertificateLayout) -> None:
    # Execute
    sans = _sans(layout)

    # Assert
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]


def test_loopback_added_once_when_given(tmp_path: Path) -> None:
    # Execute
    layout = init_certificates(tmp_path, server_name="localhost", ips=["127.0.0.1", "::1"])

    # Assert
    assert _sans(layout).get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_ca_signed_the_server_certificate(layout: CertificateLayout) -> None:
    # Prepare
    ca = load_certificate(layout.ca_cert)
    server = load_certificate(layout.server_cert)

    # Execute / Assert: raises on a bad signature
    server.verify_directly_issued_by(ca)
    verify_server_certificate(layout.ca_cert, layout.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"


def test_a_foreign_ca_does_not_verify_the_server_certificate(
    layout: CertificateLayout, tmp_path: Path
) -> None:
    # Prepare
    other = init_certificates(tmp_path / "other", server_name="fl.example.org")

    # Execute / Assert
    with pytest.raises(CertificateVerificationError, match="not issued by the CA"):
        verify_server_certificate(other.ca_cert, layout.server_cert)


def test_private_keys_are_0600_and_public_files_readable(
    layout: CertificateLayout, node_keys: dict[str, NodeKeyPaths]
) -> None:
    # Prepare
    private = [layout.ca_key, layout.server_key] + [node_keys[n].private_key for n in NODES]
    public = [layout.ca_cert, layout.server_cert] + [node_keys[n].public_key for n in NODES]

    # Assert
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in public:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 != 0o077
        assert stat.S_IMODE(path.stat().st_mode) & 0o600 == 0o600


def test_node_keys_are_p384_openssh_as_flwr_loads_them(node_keys: dict[str, NodeKeyPaths]) -> None:
    # Prepare
    node = node_keys["hospital-a"]

    # Execute: the loaders flower-supernode and `flwr supernode register` use
    private = load_ssh_private_key(node.private_key.read_bytes(), None)
    public = load_ssh_public_key(node.public_key.read_bytes())

    # Assert
    assert node.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()


def test_server_key_matches_server_certificate(layout: CertificateLayout) -> None:
    # Execute
    key = load_pem_private_key(layout.server_key.read_bytes(), None)
    cert = load_certificate(layout.server_cert)

    # Assert
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_refuses_to_overwrite_without_force(
    layout: CertificateLayout, node_keys: dict[str, NodeKeyPaths]
) -> None:
    # Prepare
    folders = [layout.root, node_keys["hospital-a"].private_key.parent]
    before = {p: p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file()}

    # Execute / Assert
    with pytest.raises(KeyFileExistsError, match="--force"):
        init_certificates(layout.root, server_name="fl.example.org")
    with pytest.raises(KeyFileExistsError):
        generate_node_key(node_keys["hospital-a"].private_key.parent, "hospital-a")
    assert {p: p.read_bytes() for p in before} == before


def test_force_replaces_keys_with_mode_0600(
    layout: CertificateLayout, node_keys: dict[str, NodeKeyPaths]
) -> None:
    # Prepare
    old_ca = layout.ca_key.read_bytes()
    old_key = node_keys["hospital-a"].private_key.read_bytes()

    # Execute
    init_certificates(layout.root, server_name="fl.example.org", force=True)
    new = generate_node_key(node_keys["hospital-a"].private_key.parent, "hospital-a", force=True)

    # Assert
    assert layout.ca_key.read_bytes() != old_ca
    assert new.private_key.read_bytes() != old_key
    for path in (layout.ca_key, new.private_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_bad_names_and_addresses_are_refused(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(InvalidSubjectAltNameError, match="not-an-ip"):
        init_certificates(tmp_path, server_name="fl.example.org", ips=["not-an-ip"])
    with pytest.raises(InvalidSubjectAltNameError, match="DNS name"):
        init_certificates(tmp_path, server_name="bad name")
    with pytest.raises(InvalidNodeNameError, match="hospital-a"):
        generate_node_key(tmp_path, "../hospital-a")
    assert not any(tmp_path.iterdir())


def test_require_names_missing_files(tmp_path: Path) -> None:
    # Prepare
    layout = CertificateLayout(tmp_path)

    # Execute / Assert
    with pytest.raises(MissingCertificateError, match="ca.crt"):
        layout.require(layout.ca_cert)


def test_cli_init_and_refusal(tmp_path: Path) -> None:
    # Prepare
    runner = CliRunner()
    args = ["init", "--out", str(tmp_path / "c"), "--server-name", "fl.example.org",
            "--ip", "10.0.0.1,10.0.0.2"]  # fmt: skip

    # Execute
    first = runner.invoke(certs_app, args)
    second = runner.invoke(certs_app, args)

    # Assert
    assert first.exit_code == 0, first.output
    layout = CertificateLayout(tmp_path / "c")
    assert len(_sans(layout).get_values_for_type(x509.IPAddress)) == 3
    assert sorted(p.name for p in layout.root.iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]
    assert second.exit_code == 1
    assert "--force" in second.output
