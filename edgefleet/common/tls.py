"""TLS credentials for gRPC and the device identity that a certificate carries."""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

# A device certificate binds its device id in a URI subject alternative name of this form. The
# subject common name repeats the id for tools that show only the subject.
DEVICE_URI_PREFIX = "urn:edgefleet:device:"


class CredentialsError(ValueError):
    """A certificate or key file is missing or unreadable; the message names the file and the fix."""


def read_pem(path: Path | None, what: str, flag: str) -> bytes:
    """Return the bytes of a PEM file; raise CredentialsError naming flag when it is unset or unreadable."""
    if path is None:
        raise CredentialsError(
            f"missing {what}: set {flag} (create the files with `edgefleet pki init` and `edgefleet pki issue`), "
            "or pass --insecure to run without TLS"
        )
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CredentialsError(f"cannot read {what} {path} ({flag}): {error.strerror}") from None
    if b"-----BEGIN" not in data:
        raise CredentialsError(f"{what} {path} ({flag}) is not a PEM file")
    return data


def channel_credentials(
    ca_cert: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Return TLS channel credentials that trust ca_cert, with a client certificate when cert and key are set.

    Raises CredentialsError for a missing or unreadable file, or when only one of cert and key is set.
    """
    root = read_pem(ca_cert, "CA certificate", "--ca-cert")
    if (cert is None) != (key is None):
        raise CredentialsError("set both --cert and --key for a client certificate, or neither")
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=read_pem(key, "private key", "--key"),
        certificate_chain=read_pem(cert, "certificate", "--cert"),
    )


def warn_if_others_can_access(path: Path, flag: str) -> None:
    """Log a warning when users outside a private key's owner and group can read or write its file.

    Group access stays allowed, because a key owned by root with the service's group and mode 0640 is
    the usual way to hand it to a service user.
    """
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return  # Reading the key reports a missing or unreadable file with its fix.
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning(
            "private key %s (%s) has mode %04o, so every user on this host can read or change it; run `chmod o-rwx %s`",
            path,
            flag,
            stat.S_IMODE(mode),
            path,
        )


def check_key_pair(ca_cert: Path | None, cert: Path, key: Path, program: str) -> None:
    """Check that the CA certificate, the certificate and its key parse, and that the key matches.

    gRPC reads these files only when it binds a port or makes the first handshake, and then reports
    a bad file as a failed bind or a failed handshake that names no file. program names the daemon
    in the message for an encrypted key. Raises CredentialsError naming the file and the fix.
    """
    if ca_cert is not None:
        try:
            x509.load_pem_x509_certificates(read_pem(ca_cert, "CA certificate", "--ca-cert"))
        except ValueError as error:
            raise CredentialsError(
                f"CA certificate {ca_cert} (--ca-cert) is not a valid PEM certificate: {error}"
            ) from None
    try:
        certificate = x509.load_pem_x509_certificate(read_pem(cert, "certificate", "--cert"))
    except ValueError as error:
        raise CredentialsError(f"certificate {cert} (--cert) is not a valid PEM certificate: {error}") from None
    key_pem = read_pem(key, "private key", "--key")
    warn_if_others_can_access(key, "--key")
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CredentialsError(
            f"private key {key} (--key) is encrypted, but {program} needs an unencrypted PEM key; "
            f"write one with `openssl pkey -in {key} -out KEY` and pass it to --key"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CredentialsError(f"private key {key} (--key) is not a valid PEM private key: {error}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        certificate_public_key = certificate.public_key().public_bytes(*spki)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CredentialsError(f"certificate {cert} (--cert) has an unsupported public key: {error}") from None
    if private_key.public_key().public_bytes(*spki) != certificate_public_key:
        raise CredentialsError(
            f"private key {key} (--key) does not match certificate {cert} (--cert): their public "
            "keys differ; pass the key that was issued with this certificate (`edgefleet pki init` writes "
            "server.pem and server.key, `edgefleet pki issue` writes ID.pem and ID.key together)"
        )


def server_credentials(
    ca_cert: Path | None, cert: Path | None, key: Path | None, *, require_client_auth: bool
) -> grpc.ServerCredentials:
    """Return server TLS credentials; with require_client_auth, clients must present a certificate of ca_cert.

    Raises CredentialsError for a missing or unreadable file and, with require_client_auth, for files that do
    not parse or a key that does not match the certificate.
    """
    pair = (read_pem(key, "private key", "--key"), read_pem(cert, "certificate", "--cert"))
    if require_client_auth and key is not None and cert is not None:
        # Checked once per start: the orchestrator builds its agent port's credentials first.
        check_key_pair(ca_cert, cert, key, "the orchestrator")
    root = read_pem(ca_cert, "CA certificate", "--ca-cert") if require_client_auth else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=require_client_auth)


def load_certificate(pem: bytes) -> x509.Certificate:
    """Parse a PEM certificate; raise CredentialsError when it is not one."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise CredentialsError(f"invalid PEM certificate: {error}") from None


def certificate_fingerprint(pem: bytes) -> str:
    """Return the SHA-256 hex digest of a PEM certificate's DER encoding."""
    der = load_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def device_id_of(certificate: x509.Certificate) -> str:
    """Return the device id bound in a device certificate, or an empty string when it binds none.

    The URI subject alternative name urn:edgefleet:device:ID counts; the common name is not read,
    because any certificate of the CA has one.
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(DEVICE_URI_PREFIX):
            return uri[len(DEVICE_URI_PREFIX) :]
    return ""


def device_id_from_file(path: Path) -> str:
    """Return the device id bound in the certificate file at path; raise CredentialsError if it binds none."""
    certificate = load_certificate(read_pem(path, "certificate", "--cert"))
    device_id = device_id_of(certificate)
    if not device_id:
        subject = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        shown = str(subject[0].value) if subject else certificate.subject.rfc4514_string()
        raise CredentialsError(
            f"certificate {path} ({shown}) is not a device certificate: it has no {DEVICE_URI_PREFIX}ID name; "
            "issue one with `edgefleet pki issue --device-id ID`"
        )
    return device_id


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds "authorization: Bearer TOKEN" to the metadata of every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: list[tuple[str, str | bytes]],
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready


def operator_channel(
    address: str, *, token: str = "", ca_cert: Path | None = None, insecure: bool = False
) -> grpc.Channel:
    """Open a channel to the orchestrator's operator port that sends token with every call.

    With insecure it is plaintext; otherwise TLS that trusts ca_cert. Raises CredentialsError when
    ca_cert is missing or unreadable.
    """
    channel = grpc.insecure_channel(address) if insecure else grpc.secure_channel(address, channel_credentials(ca_cert))
    if not token:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(token))
