"""The fleet's certificate authority: CA, orchestrator server certificate and device certificates."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.common.tls import DEVICE_URI_PREFIX
from edgefleet.orchestrator import validation

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEVICES_DIR = "devices"
DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")
CA_DAYS = 3650
CERT_DAYS = 397  # The maximum leaf validity that public CAs issue (397 days); a fleet CA may choose more.
# Backdating covers device clocks that run a little behind the CA's.
BACKDATE = timedelta(minutes=5)


class PkiError(ValueError):
    """The CA directory is missing, incomplete or would be overwritten; the message names the path and the fix."""


class PkiExistsError(PkiError):
    """A CA or certificate already exists where a new one would be written."""


# A DNS name that a certificate can carry: dot-separated labels of letters, digits and inner hyphens
# (RFC 1123), at most 253 characters in all. The first label may be a whole-label wildcard, as in
# *.fleet.internal (RFC 6125 section 6.4.3), followed by at least two labels.
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$)(?:{_DNS_LABEL}(?:\.{_DNS_LABEL})*|\*\.{_DNS_LABEL}(?:\.{_DNS_LABEL})+)")


@dataclass(frozen=True)
class IssuedCertificate:
    cert_path: Path
    key_path: Path
    subject: str
    not_after: datetime


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600, refusing to replace an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def check_hosts(hosts: Sequence[str]) -> None:
    """Raise PkiError for a host that is neither an IP address nor a DNS name, before anything is written."""
    if not hosts:
        raise PkiError("name at least one host (IP address or DNS name) for the server certificate")
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise PkiError(
                    f"invalid --host {host!r}: give an IP address (127.0.0.1, ::1 without brackets) or a DNS name "
                    "of letters, digits, hyphens and dots (orchestrator.plant-1.internal, or *.plant-1.internal "
                    "for every name under it)"
                ) from None


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def init_ca(directory: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = CA_DAYS) -> IssuedCertificate:
    """Create a fleet CA in directory and the orchestrator's server certificate for hosts; return the CA.

    Raises PkiExistsError when directory already contains a CA, so that an existing fleet keeps its trust
    root, and PkiError for a host that is neither an IP address nor a DNS name.
    """
    check_hosts(hosts)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
        raise PkiExistsError(
            f"{directory} already contains a CA ({CA_CERT}); use another --dir or delete the old CA first"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = _name("edgefleet fleet CA", "fleet CA")
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / CA_KEY, _key_pem(key))
    (directory / CA_CERT).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    log.info("created fleet CA %s", directory / CA_CERT)
    issue_server_certificate(directory, hosts=hosts)
    return IssuedCertificate(
        directory / CA_CERT, directory / CA_KEY, subject.rfc4514_string(), now + timedelta(days=days)
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        certificate = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as error:
        raise PkiError(
            f"no CA in {directory}: {error.filename} is missing; run `edgefleet pki init --dir DIR`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / CA_KEY} is not an EC private key; create the CA with `edgefleet pki init`")
    return certificate, key


def _issue(
    directory: Path,
    *,
    subject: x509.Name,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    cert_path: Path,
    key_path: Path,
    days: int,
) -> IssuedCertificate:
    ca_certificate, ca_key = _load_ca(directory)
    if cert_path.exists() or key_path.exists():
        raise PkiExistsError(f"{cert_path} already exists; delete it and its key to issue a new certificate")
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca_certificate.not_valid_after_utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return IssuedCertificate(cert_path, key_path, subject.rfc4514_string(), not_after)


def issue_server_certificate(
    directory: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = CERT_DAYS
) -> IssuedCertificate:
    """Issue the orchestrator's server certificate, valid for hosts (IP addresses or DNS names).

    Raises PkiError when no CA is in directory or when a host is missing or invalid, and PkiExistsError
    when a server certificate exists.
    """
    check_hosts(hosts)
    issued = _issue(
        directory,
        subject=_name(hosts[0], "orchestrator"),
        names=_host_names(hosts),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        cert_path=directory / SERVER_CERT,
        key_path=directory / SERVER_KEY,
        days=days,
    )
    log.info("issued the orchestrator certificate %s for %s", issued.cert_path, ", ".join(hosts))
    return issued


def issue_device_certificate(
    directory: Path, device_id: str, *, out_dir: Path | None = None, days: int = CERT_DAYS
) -> IssuedCertificate:
    """Issue a client certificate that binds device_id, as DEVICE_URI_PREFIX + id and as common name.

    Writes ID.pem and ID.key to out_dir (default DIR/devices). Raises PkiError without a CA or when
    the files exist, and InvalidArgument for an invalid device id.
    """
    validation.check_device_id(device_id, "--device-id")
    target = out_dir or directory / DEVICES_DIR
    issued = _issue(
        directory,
        subject=_name(device_id, "device"),
        names=[x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        cert_path=target / f"{device_id}.pem",
        key_path=target / f"{device_id}.key",
        days=days,
    )
    log.info("issued a device certificate for device_id=%s at %s", device_id, issued.cert_path)
    return issued
