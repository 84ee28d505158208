"""TLS certificates and SuperNode authentication keys for a deployed federation.

``init_certificates`` writes, with the ``cryptography`` library only (no ``openssl``):

- a certificate authority (``ca.crt``, ``ca.key``): EC P-384, self-signed, 10 years;
- the SuperLink's server certificate (``server.pem``, ``server.key``): EC P-384, signed by the
  CA, 825 days, SANs = the given DNS names and IP addresses, **always** including IP
  ``127.0.0.1`` (the SuperLink's own SuperExec connects there; without it runs hang);

It never writes a node's private key: each hospital makes its own authentication key pair with
:func:`generate_node_key` (``fedcare node keygen``), on its own machine: EC P-384, private key
in OpenSSH format without passphrase (what ``flower-supernode --auth-supernode-private-key``
loads with ``load_ssh_private_key``), public key as one OpenSSH line (what ``flwr supernode
register`` loads with ``load_ssh_public_key``). Only the ``.pub`` file goes to the coordinator.

Private keys are created with mode 0600 (:func:`fedcare.files.write_new`), never chmod-ed afterwards.
Nothing is written when any target file exists, unless ``force=True``.

Who gets what: the coordinator keeps ``ca.key`` and ``server.key``; each hospital gets the node
bundle :func:`write_node_bundle` writes (``fedcare certs node-bundle``: ``ca.crt`` only, never a
private key) and keeps the private key it made itself; the coordinator registers its ``.pub``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..files import write_new

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "LOOPBACK_IP",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertificateLayout",
    "CertsError",
    "CertificateVerificationError",
    "InvalidNodeNameError",
    "InvalidSubjectAltNameError",
    "KeyFileExistsError",
    "MissingCertificateError",
    "NodeBundleError",
    "NodeKeyPaths",
    "generate_node_key",
    "init_certificates",
    "load_certificate",
    "verify_server_certificate",
    "write_node_bundle",
]

logger = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
LOOPBACK_IP = ipaddress.IPv4Address("127.0.0.1")

CA_DAYS = 3650
SERVER_DAYS = 825
_CURVE = ec.SECP384R1
_NODE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertsError(Exception):
    """Base class of the certificate and key errors."""


class KeyFileExistsError(CertsError):
    """Raised when a key or certificate file would be overwritten without ``force``."""


class InvalidNodeNameError(CertsError):
    """Raised when a node name cannot be used as a key file name."""


class InvalidSubjectAltNameError(CertsError):
    """Raised when a DNS name or IP address for the server certificate is malformed."""


class MissingCertificateError(CertsError):
    """Raised when a certificate folder lacks a file a command needs."""


class CertificateVerificationError(CertsError):
    """Raised when the server certificate was not signed by the CA or has expired."""


class NodeBundleError(CertsError):
    """Raised when a node bundle would be written where it could mix with coordinator secrets."""


@dataclass(frozen=True)
class NodeKeyPaths:
    """Where one node's authentication key pair lives.

    Attributes
    ----------
    name : str
        The node (hospital) name.
    private_key : pathlib.Path
        OpenSSH private key, mode 0600; made at the hospital and never leaves it.
    public_key : pathlib.Path
        OpenSSH public key line; the only file the coordinator receives (it registers it).
    """

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertificateLayout:
    """The files of a certificate folder written by :func:`init_certificates`.

    Attributes
    ----------
    root : pathlib.Path
        The folder.
    """

    root: Path

    @property
    def ca_cert(self) -> Path:
        """Return the CA certificate path (given to every hospital and to ``flwr``)."""
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        """Return the CA private key path (stays with the coordinator, offline if possible)."""
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        """Return the SuperLink's certificate path."""
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        """Return the SuperLink's private key path."""
        return self.root / SERVER_KEY

    def require(self, *paths: Path) -> None:
        """Raise :class:`MissingCertificateError` unless every path is a file."""
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MissingCertificateError(
                f"missing certificate file(s): {', '.join(missing)}; create them with "
                f"`fedcare certs init --out {self.root} ...` or point --certs at the folder "
                "that holds them"
            )


def _check_node_name(name: str) -> None:
    if not _NODE_NAME.match(name):
        raise InvalidNodeNameError(
            f"invalid node name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting and ending with a letter or digit (e.g. hospital-a)"
        )


def _parse_dns_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        labels = name.rstrip(".").split(".")
        if not name or len(name) > 253 or not all(_DNS_LABEL.match(lab) for lab in labels):
            raise InvalidSubjectAltNameError(
                f"invalid DNS name {name!r} for the server certificate: give the host name "
                "hospitals use to reach the SuperLink (e.g. fl.example.org); IP addresses go "
                "in --ip"
            )
        if name not in out:
            out.append(name)
    return out


def _parse_ips(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [LOOPBACK_IP]
    for raw in ips:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            raise InvalidSubjectAltNameError(
                f"invalid IP address {raw!r} for the server certificate: give an IPv4 or "
                "IPv6 address (DNS names go in --server-name / --dns)"
            ) from None
        if ip not in out:
            out.append(ip)
    return out


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; it must not exist."""
    write_new(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0644 and write ``data``; it must not exist."""
    write_new(path, data, mode=0o644)


def _refuse_or_clear(paths: Sequence[Path], *, force: bool) -> None:
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise KeyFileExistsError(
            f"refusing to overwrite existing key/certificate file(s): "
            f"{', '.join(str(p) for p in existing)}; pass --force to replace them (hospitals "
            "holding the old keys or CA must then receive the new ones and nodes be "
            "re-registered)"
        )
    for path in existing:
        logger.warning("replacing %s (--force)", path)
        path.unlink()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _build_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    subject = _name("fedcare federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _build_server(
    now: dt.datetime,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_name: str,
    dns_names: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def generate_node_key(out_dir: Path, name: str = "node", *, force: bool = False) -> NodeKeyPaths:
    """Write a node's EC P-384 authentication key pair (OpenSSH format): run at the hospital.

    Parameters
    ----------
    out_dir : pathlib.Path
        The hospital's own folder; the keys go to ``out_dir/<name>.key`` (mode 0600) and
        ``out_dir/<name>.pub``. Only the ``.pub`` file is sent to the coordinator.
    name : str
        The node name (lowercase letters, digits, ``-``, ``_``); also the key's comment.
    force : bool
        Replace existing key files instead of refusing.

    Returns
    -------
    NodeKeyPaths
        Where the keys were written.

    Raises
    ------
    InvalidNodeNameError
        When ``name`` is not a usable file name.
    KeyFileExistsError
        When a key file exists and ``force`` is False.
    """
    _check_node_name(name)
    folder = Path(out_dir)
    paths = NodeKeyPaths(name, folder / f"{name}.key", folder / f"{name}.pub")
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_or_clear([paths.private_key, paths.public_key], force=force)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(paths.private_key, private)
    _write_public(paths.public_key, public + f" fedcare-{paths.name}\n".encode())
    logger.info("wrote node key pair %s / %s", paths.private_key, paths.public_key)
    return paths


def init_certificates(
    out_dir: Path,
    *,
    server_name: str,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
    force: bool = False,
) -> CertificateLayout:
    """Write a CA and a server certificate signed by it; never a node's private key.

    Parameters
    ----------
    out_dir : pathlib.Path
        Folder to write into (created if missing).
    server_name : str
        The SuperLink's public DNS name: subject CN and first DNS SAN.
    dns_names : sequence of str
        More DNS SANs.
    ips : sequence of str
        IP SANs; ``127.0.0.1`` is always added.
    force : bool
        Replace existing files instead of refusing.

    Returns
    -------
    CertificateLayout
        The folder's layout.

    Raises
    ------
    InvalidSubjectAltNameError
        When a DNS name or IP address is malformed.
    KeyFileExistsError
        When any file to write exists and ``force`` is False (nothing is written then).
    """
    layout = CertificateLayout(Path(out_dir))
    dns = _parse_dns_names([server_name, *dns_names])
    ip_list = _parse_ips(ips)

    targets = [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key]
    layout.root.mkdir(parents=True, exist_ok=True)
    _refuse_or_clear(targets, force=force)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = _build_ca(now)
    server_key, server_cert = _build_server(now, ca_key, ca_cert, server_name, dns, ip_list)

    _write_private(layout.ca_key, _pem_key(ca_key))
    _write_public(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(layout.server_key, _pem_key(server_key))
    _write_public(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    logger.info(
        "wrote CA and server certificate in %s (DNS %s, IP %s); node keys are made at the nodes",
        layout.root,
        ", ".join(dns),
        ", ".join(str(i) for i in ip_list),
    )
    return layout


def write_node_bundle(certs_dir: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Write what a hospital receives from the coordinator: the CA certificate, nothing secret.

    The bundle is ``out_dir/ca.crt`` (the federation CA's certificate, re-serialised from the
    parsed certificate so no other PEM block can ride along). The hospital's own key pair is
    made at the hospital (:func:`generate_node_key`); no private key is ever in a bundle.

    Parameters
    ----------
    certs_dir : pathlib.Path
        The coordinator's folder from :func:`init_certificates`.
    out_dir : pathlib.Path
        The bundle folder to write (created if missing); must not be ``certs_dir`` or inside it.
    force : bool
        Replace an existing ``ca.crt`` in ``out_dir``.

    Returns
    -------
    pathlib.Path
        The bundle's CA certificate path.

    Raises
    ------
    MissingCertificateError
        When ``certs_dir`` has no ``ca.crt``.
    NodeBundleError
        When ``out_dir`` is the certificate folder or inside it.
    KeyFileExistsError
        When the bundle's ``ca.crt`` exists and ``force`` is False.
    """
    layout = CertificateLayout(Path(certs_dir))
    layout.require(layout.ca_cert)
    out = Path(out_dir)
    root = layout.root.resolve()
    if out.resolve() == root or root in out.resolve().parents:
        raise NodeBundleError(
            f"node bundle folder {out} is the coordinator's certificate folder or inside it: "
            "write the bundle to its own folder (e.g. runs/deploy/bundle-NAME) and send only that"
        )
    ca = load_certificate(layout.ca_cert)
    out.mkdir(parents=True, exist_ok=True)
    target = CertificateLayout(out).ca_cert
    _refuse_or_clear([target], force=force)
    _write_public(target, ca.public_bytes(serialization.Encoding.PEM))
    logger.info("wrote node bundle %s (CA certificate only)", out)
    return target


def load_certificate(path: Path) -> x509.Certificate:
    """Return the PEM certificate at ``path``."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def verify_server_certificate(ca_cert_path: Path, server_cert_path: Path) -> None:
    """Check that the server certificate was signed by the CA and is valid now.

    Raises
    ------
    CertificateVerificationError
        When the signature does not verify, the issuer differs, or a validity period is over.
    """
    ca = load_certificate(ca_cert_path)
    server = load_certificate(server_cert_path)
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertificateVerificationError(
            f"{server_cert_path} was not issued by the CA in {ca_cert_path} ({err}); "
            "re-create the server certificate with `fedcare certs init --force`"
        ) from None
    now = dt.datetime.now(dt.timezone.utc)
    for label, cert in (("CA", ca), ("server", server)):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateVerificationError(
                f"the {label} certificate is not valid now (valid "
                f"{cert.not_valid_before_utc} to {cert.not_valid_after_utc}); re-create it "
                "with `fedcare certs init --force`"
            )
