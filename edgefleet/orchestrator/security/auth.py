"""Access control: device identity from client certificates, and operator roles from API tokens."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from edgefleet.common.errors import EdgefleetError
from edgefleet.common.logs import RepeatedErrors
from edgefleet.common.tls import CredentialsError, certificate_fingerprint, device_id_of, load_certificate
from edgefleet.orchestrator.security.signing import Signer
from edgefleet.orchestrator.security.store import ApiTokenRecord, EnrollmentRejected, SecurityStore
from edgefleet.orchestrator.security.tokens import ADMIN, OPERATOR, VIEWER, hash_secret, role_allows
from edgefleet.v1 import agent_pb2, operator_pb2

log = logging.getLogger(__name__)

OPERATOR_SERVICE = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name
AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

# The role each OperatorService call needs. A call missing here is rejected for every token, and
# tests/security checks that the table covers the whole service.
ROLE_BY_METHOD: dict[str, str] = {
    "ListDevices": VIEWER,
    "GetDevice": VIEWER,
    "ListModels": VIEWER,
    "GetModel": VIEWER,
    "ListVariants": VIEWER,
    "GetCompressionJob": VIEWER,
    "ListCompressionJobs": VIEWER,
    "ExplainSelection": VIEWER,
    "GetRollout": VIEWER,
    "ListRollouts": VIEWER,
    "QueryMetrics": VIEWER,
    "UploadModel": OPERATOR,
    "DeleteModel": OPERATOR,
    "CreateCompressionJob": OPERATOR,
    "CancelCompressionJob": OPERATOR,
    "Deploy": OPERATOR,
    "CreateRollout": OPERATOR,
    "UpdateRollout": OPERATOR,
    "CreateEnrollmentToken": ADMIN,
    "ListEnrollmentTokens": ADMIN,
    "RevokeEnrollmentToken": ADMIN,
    "RevokeDevice": ADMIN,
    "RemoveDevice": ADMIN,
    "CreateApiToken": ADMIN,
    "ListApiTokens": ADMIN,
    "RevokeApiToken": ADMIN,
    "ListSigningKeys": ADMIN,
    "RotateSigningKey": ADMIN,
    "RetireSigningKey": ADMIN,
}
# Results of token and device lookups are reused for this long. So a revocation made by another
# orchestrator process applies here within it, and the process that revokes applies it at once.
CACHE_S = 5.0


def unauthenticated(message: str) -> EdgefleetError:
    return EdgefleetError(message, code=grpc.StatusCode.UNAUTHENTICATED)


def permission_denied(message: str) -> EdgefleetError:
    return EdgefleetError(message, code=grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class DeviceIdentity:
    """The device a call comes from: the id from its verified certificate, or the claimed id without TLS."""

    device_id: str
    fingerprint: str  # SHA-256 hex of the client certificate; empty without TLS.


@dataclass(frozen=True)
class Caller:
    """The operator a call comes from."""

    name: str
    role: str
    token_id: str  # Empty for the anonymous admin of an insecure orchestrator.


class Security:
    """The orchestrator's authentication and authorization rules, over one SecurityStore and Signer.

    With tls off (the --insecure mode) devices are trusted by the id they claim, and an operator call
    without a token acts as admin. A call that presents a token is still checked.
    """

    def __init__(self, store: SecurityStore, *, tls: bool, cache_s: float = CACHE_S) -> None:
        self.store = store
        self.tls = tls
        self.signer = Signer(store)
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, ApiTokenRecord | None]] = {}
        self._devices: dict[str, tuple[float, bool, str | None]] = {}
        # A supervisor may restart a rejected agent again and again, so each device and reason is logged
        # once (then every 1000th time). Device ids come from certificates of the fleet's CA, which bounds the keys.
        self._unadmitted = RepeatedErrors(log)

    def forget(self, device_id: str = "") -> None:
        """Drop cached lookups: of one device, or of every device and token."""
        with self._lock:
            if device_id:
                self._devices.pop(device_id, None)
            else:
                self._devices.clear()
                self._tokens.clear()

    # Operators

    def caller_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller | None:
        """Return the operator that the call's authorization metadata names, or None without a token.

        Raises UNAUTHENTICATED for a malformed, unknown or revoked token.
        """
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return None
        value = values[0].decode() if isinstance(values[0], bytes) else values[0]
        scheme, _, secret = value.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise unauthenticated("invalid authorization metadata: expected 'Bearer TOKEN'")
        record = self._find_token(hash_secret(secret.strip()))
        if record is None:
            raise unauthenticated("the API token is not valid; create one with `edgefleet tokens create`")
        if record.revoked_at is not None:
            raise unauthenticated(f"API token {record.token_id} ({record.name}) was revoked; use another token")
        return Caller(name=record.name, role=record.role, token_id=record.token_id)

    def _find_token(self, token_hash: str) -> ApiTokenRecord | None:
        with self._lock:
            cached = self._tokens.get(token_hash)
        if cached is not None and time.monotonic() - cached[0] < self.cache_s:
            return cached[1]
        record = self.store.find_api_token(token_hash)
        with self._lock:
            self._tokens[token_hash] = (time.monotonic(), record)
        return record

    def authorize(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        """Return the caller of an OperatorService method if its role allows the call.

        Raises UNAUTHENTICATED without a valid token (unless tls is off) and PERMISSION_DENIED when the
        token's role is below the one ROLE_BY_METHOD names or the method has no entry.
        """
        caller = self.caller_of(metadata)
        if caller is None:
            if not self.tls:
                return Caller(name="anonymous", role=ADMIN, token_id="")
            raise unauthenticated(
                "missing API token: pass --token or set EDGEFLEET_TOKEN (the first admin token is in the "
                "orchestrator's DATA_DIR/admin.token)"
            )
        required = ROLE_BY_METHOD.get(method)
        if required is None:
            raise permission_denied(f"{method} has no access rule; no token may call it")
        if not role_allows(caller.role, required):
            raise permission_denied(
                f"{method} needs the {required} role; token {caller.token_id} ({caller.name}) has {caller.role}"
            )
        return caller

    # Devices

    def identify(self, auth_context: Mapping[str, Sequence[bytes]], claimed_device_id: str) -> DeviceIdentity:
        """Return the identity of an AgentService call from its TLS peer certificate.

        Raises UNAUTHENTICATED without a client certificate and PERMISSION_DENIED when the certificate
        binds no device id or another id than claimed_device_id (an empty claim matches any).
        """
        if not self.tls:
            return DeviceIdentity(device_id=claimed_device_id, fingerprint="")
        pems = auth_context.get("x509_pem_cert") or []
        if not pems:
            # The agent port's handshake requires a client certificate, so a call without one came in on
            # the operator port. That port requests none, so an agent that dials it gets here even with --cert.
            raise unauthenticated(
                "agent calls need the agent port (the orchestrator's --listen, default 50051) and a device "
                "certificate, but this call came in on the operator port without one; point the agent's "
                "--orchestrator (or EDGEFLEET_ORCHESTRATOR, which the CLI also reads) at the agent port and "
                "start it with --ca-cert, --cert and --key"
            )
        try:
            certificate = load_certificate(pems[0])
        except CredentialsError as error:
            raise unauthenticated(f"the client certificate cannot be read: {error}") from None
        device_id = device_id_of(certificate)
        if not device_id:
            raise permission_denied("the client certificate binds no device id; issue one with `edgefleet pki issue`")
        if claimed_device_id and claimed_device_id != device_id:
            log.warning(
                "rejected a call that claims device_id=%s with the certificate of %s", claimed_device_id, device_id
            )
            raise permission_denied(
                f"device id {claimed_device_id!r} does not match the certificate, which is issued to {device_id!r}"
            )
        return DeviceIdentity(device_id=device_id, fingerprint=certificate_fingerprint(pems[0]))

    def _device_state(self, device_id: str) -> tuple[bool, str | None]:
        with self._lock:
            cached = self._devices.get(device_id)
        if cached is not None and time.monotonic() - cached[0] < self.cache_s:
            return cached[1], cached[2]
        revoked = self.store.is_revoked(device_id)
        fingerprint = self.store.credential_of(device_id)
        with self._lock:
            self._devices[device_id] = (time.monotonic(), revoked, fingerprint)
        return revoked, fingerprint

    def check_device(self, identity: DeviceIdentity) -> None:
        """Raise PERMISSION_DENIED for a revoked device or one whose certificate is not the enrolled one."""
        if not identity.device_id:
            return
        revoked, enrolled = self._device_state(identity.device_id)
        if revoked:
            raise permission_denied(revoked_text(identity.device_id))
        if not self.tls:
            return
        if enrolled is None:
            raise permission_denied(
                f"device {identity.device_id!r} is not enrolled; register it with an enrollment token first"
            )
        if enrolled != identity.fingerprint:
            raise permission_denied(
                f"the certificate of device {identity.device_id!r} is not the one it enrolled with; "
                "enroll it again with a new token (`edgefleet enroll create`)"
            )

    def admit(
        self,
        identity: DeviceIdentity,
        enrollment_token: str,
        now: datetime,
        instance_key_hash: str = "",
        peer: str = "",
    ) -> None:
        """Admit a registration: consume its enrollment token when one is needed, else check the device.

        A device that registers with the certificate it enrolled with needs no token. A consumed token
        also binds the id to the registering agent's instance_key_hash, so a re-imaged device can
        register again. Raises
        UNAUTHENTICATED for a missing, unknown or expired token and PERMISSION_DENIED for a used one,
        one made for another device, a revoked device or another certificate. A rejection without a
        token is logged once per device and reason, with peer (the caller's address).
        """
        if not self.tls or not identity.device_id:
            self.check_device(identity)
            return
        revoked, enrolled = self._device_state(identity.device_id)
        if enrolled == identity.fingerprint and not revoked:
            return
        if not enrollment_token:
            if revoked:
                reason = "the device is revoked"
            elif enrolled is not None:
                reason = "its certificate is not the one the device enrolled with"
            else:
                reason = "the device is not enrolled"
            self._unadmitted.warning(
                f"{identity.device_id}\n{reason}",
                "rejected the registration of device_id=%s from %s: %s and it presented no enrollment token; "
                "create one with `edgefleet enroll create --device-id %s`",
                identity.device_id,
                peer or "an unknown peer",
                reason,
                identity.device_id,
            )
            if revoked or enrolled is not None:
                self.check_device(identity)
            raise unauthenticated(
                f"device {identity.device_id!r} is not enrolled; create a token with `edgefleet enroll create "
                f"--device-id {identity.device_id}` and start the agent with --enrollment-token"
            )
        try:
            rebound = self.store.enroll(
                hash_secret(enrollment_token), identity.device_id, identity.fingerprint, now, instance_key_hash
            )
        except EnrollmentRejected as rejection:
            log.warning("rejected the enrollment of device_id=%s: %s", identity.device_id, rejection)
            if rejection.reason in ("unknown", "expired"):
                raise unauthenticated(str(rejection)) from None
            raise permission_denied(str(rejection)) from None
        self.forget(identity.device_id)
        log.info("enrolled device_id=%s with certificate %s", identity.device_id, identity.fingerprint[:16])
        if rebound:
            log.warning(
                "device_id=%s now belongs to a new agent instance (key %s) by its enrollment token; the agent "
                "that registered it before is rejected from now on",
                identity.device_id,
                instance_key_hash[:12],
            )

    def rebind(self, identity: DeviceIdentity, enrollment_token: str, now: datetime, instance_key_hash: str) -> str:
        """Consume an enrollment token to give an enrolled device id to a new agent instance key.

        For a registration whose certificate is enrolled already but whose instance key differs, as
        after a device was re-imaged with its old certificate. Returns why the store rejected the
        token, changing nothing, or "" when it rebound the id or there was no token to try.
        """
        if not self.tls or not identity.device_id or not enrollment_token:
            return ""
        try:
            self.store.enroll(
                hash_secret(enrollment_token), identity.device_id, identity.fingerprint, now, instance_key_hash
            )
        except EnrollmentRejected as rejection:
            log.warning("rejected the new instance key of device_id=%s: %s", identity.device_id, rejection)
            return str(rejection)
        self.forget(identity.device_id)
        log.warning(
            "device_id=%s now belongs to a new agent instance (key %s) by its enrollment token; the agent "
            "that registered it before is rejected from now on",
            identity.device_id,
            instance_key_hash[:12],
        )
        return ""

    def revoke(self, device_id: str, reason: str) -> None:
        self.store.revoke_device(device_id, reason, datetime.now(UTC))
        self.forget(device_id)

    def is_revoked(self, device_id: str) -> bool:
        return self._device_state(device_id)[0]

    # Signing

    def sign_message(self, device_id: str, message: agent_pb2.OrchestratorMessage) -> agent_pb2.OrchestratorMessage:
        """Return a copy of a desired-state message with signed assignments and the current key set."""
        signed = agent_pb2.OrchestratorMessage()
        signed.CopyFrom(message)
        rollbacks = self.store.rollback_orders(device_id) if message.desired_state.models else {}
        signed.desired_state.CopyFrom(self.signer.sign_desired_state(device_id, message.desired_state, rollbacks))
        return signed


def _rejecting_handler(handler: grpc.RpcMethodHandler, error: EdgefleetError) -> grpc.RpcMethodHandler:
    """Return a handler of the same shape as handler that ends every call with error's status."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(error.code, error.message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(error.code, error.message)
        yield  # Unreachable; makes this an async generator.

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


def revoked_text(device_id: str) -> str:
    """Return the message that an agent of a revoked device gets, naming how to readmit it."""
    return (
        f"device {device_id!r} is revoked; to readmit it, create an enrollment token with "
        f"`edgefleet enroll create --device-id {device_id}` and start the agent with --enrollment-token"
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API token and role of every OperatorService call before its handler runs.

    AgentService calls are checked in the servicer, because that needs the request's device id and
    the TLS peer. The health and reflection services are open to every client.
    """

    def __init__(self, security: Security | None) -> None:
        # None until start-up has opened the store; the server starts serving only after it is set.
        self.security = security

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if service != OPERATOR_SERVICE or handler is None:
            return handler
        assert self.security is not None, "the server started before its security state was set"
        try:
            caller = await asyncio.to_thread(self.security.authorize, method, handler_call_details.invocation_metadata)
        except EdgefleetError as error:
            log.info("[OperatorService.%s] %s: %s", method, error.code.name, error.message)
            return _rejecting_handler(handler, error)
        log.debug("OperatorService.%s by %s (%s)", method, caller.name, caller.role)
        return handler
