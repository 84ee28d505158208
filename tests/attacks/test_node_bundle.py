"""Attack: use what a hospital receives (or what the coordinator keeps) to impersonate others.

Issue 11, finding 6: the coordinator generated every hospital's node key, and the walk-through
handed each node the whole certificate folder: the CA key (sign a rogue SuperLink certificate)
and every other hospital's node key (join as that hospital). The attacker here is one hospital
(or whoever reads its disk) looking through its bundle, and whoever reads the coordinator's
folder looking for a hospital's key.

The commands are the walk-through's (``fedcare certs init``, ``fedcare node keygen`` at each
hospital, ``fedcare certs node-bundle``), run through the CLI.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from typer.testing import CliRunner

from fedcare.client.cli import node_app
from fedcare.server.cli import certs_app

HOSPITALS = ("cleveland", "hungarian", "va")
PRIVATE_MARKERS = (b"PRIVATE KEY-----", b"openssh-key-v1", b"BEGIN EC PRIVATE", b"BEGIN ENCRYPTED")


def _secrets_of(path: Path) -> list[bytes]:
    """Return byte strings that would reveal the private key in ``path`` if found elsewhere."""
    data = path.read_bytes()
    if data.startswith(b"-----BEGIN OPENSSH"):
        key = load_ssh_private_key(data, None)
    else:
        key = load_pem_private_key(data, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(48, "big")
    body = b"".join(line for line in data.splitlines() if not line.startswith(b"-----"))
    return [data, scalar, scalar.hex().encode(), base64.b64encode(scalar), body[:64]]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_hospital_bundle_and_coordinator_folder_hold_no_foreign_private_key(tmp_path: Path) -> None:
    # Prepare / Execute: the walk-through, as each party runs it
    runner = CliRunner()
    certs = tmp_path / "coordinator" / "certs"
    init = runner.invoke(certs_app, ["init", "--out", str(certs), "--server-name", "localhost"])
    keygen = {
        name: runner.invoke(node_app, ["keygen", "--out", str(tmp_path / f"hospital-{name}"), "--name", name])
        for name in HOSPITALS
    }
    bundles = {
        name: runner.invoke(certs_app, ["node-bundle", "--certs", str(certs),
                                        "--out", str(tmp_path / "coordinator" / f"bundle-{name}")])
        for name in HOSPITALS
    }  # fmt: skip
    # the coordinator receives each hospital's public key, and nothing else
    received = tmp_path / "coordinator" / "received"
    received.mkdir()
    for name in HOSPITALS:
        pub = tmp_path / f"hospital-{name}" / f"{name}.pub"
        (received / pub.name).write_bytes(pub.read_bytes())

    # Assert: the commands ran
    assert init.exit_code == 0, init.output
    assert all(r.exit_code == 0 for r in keygen.values()), {k: r.output for k, r in keygen.items()}
    assert all(r.exit_code == 0 for r in bundles.values()), {k: r.output for k, r in bundles.items()}

    # each hospital's key was made at the hospital, private and in the format flwr loads
    node_keys = {name: tmp_path / f"hospital-{name}" / f"{name}.key" for name in HOSPITALS}
    for key in node_keys.values():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert isinstance(load_ssh_private_key(key.read_bytes(), None), ec.EllipticCurvePrivateKey)

    secrets = [s for p in (certs / "ca.key", certs / "server.key", *node_keys.values()) for s in _secrets_of(p)]

    # a hospital's bundle: the CA certificate, no private key of anyone, no CA key bytes
    for name in HOSPITALS:
        bundle = tmp_path / "coordinator" / f"bundle-{name}"
        assert [p.name for p in _files(bundle)] == ["ca.crt"]
        for path in _files(bundle):
            data = path.read_bytes()
            assert not any(marker in data for marker in PRIVATE_MARKERS), path
            assert not any(secret in data for secret in secrets), path
        assert (bundle / "ca.crt").read_bytes() == (certs / "ca.crt").read_bytes()

    # the coordinator's folder: only its own two private keys; no hospital's private key
    coordinator_files = _files(tmp_path / "coordinator")
    holding_private = {p.relative_to(tmp_path / "coordinator").as_posix() for p in coordinator_files
                       if any(m in p.read_bytes() for m in PRIVATE_MARKERS)}  # fmt: skip
    assert holding_private == {"certs/ca.key", "certs/server.key"}
    node_secrets = [s for key in node_keys.values() for s in _secrets_of(key)]
    for path in coordinator_files:
        data = path.read_bytes()
        assert not any(secret in data for secret in node_secrets), path
