"""Security set-up at orchestrator start: the store, the first signing key, the bootstrap token and the ports."""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from sqlalchemy.engine import Engine

from edgefleet.common.config import flag_name
from edgefleet.common.tls import server_credentials
from edgefleet.orchestrator.config import OrchestratorConfig, parse_listen_address, resolve_listen_host
from edgefleet.orchestrator.security.auth import Security
from edgefleet.orchestrator.security.store import SqlSecurityStore
from edgefleet.orchestrator.security.tokens import ensure_bootstrap_token
from edgefleet.orchestrator.store.base import Store, StoreError

log = logging.getLogger(__name__)


def open_security(store: Store, config: OrchestratorConfig) -> Security:
    """Return the orchestrator's Security on the store's engine, with a signing key and an admin token.

    On an empty store it creates the first signing key and a bootstrap admin token, written to
    DATA_DIR/admin.token. Raises StoreError for a store without an SQL engine.
    """
    engine = getattr(store, "engine", None)
    if not isinstance(engine, Engine):
        raise StoreError(f"{type(store).__name__} has no SQL engine; security needs the SQL store")
    security = Security(SqlSecurityStore(engine), tls=not config.insecure)
    now = datetime.now(UTC)
    security.signer.ensure_key(now)
    token_file = ensure_bootstrap_token(security.store, config.data_dir, now)
    if token_file is not None:
        log.warning("created the first admin API token in %s (mode 0600); keep it secret", token_file)
    if config.insecure:
        log.warning(
            "serving WITHOUT TLS (--insecure): devices are trusted by the id they claim and operator calls "
            "without a token act as admin; use only for development on a trusted network"
        )
    return security


@dataclass(frozen=True)
class PortCredentials:
    """TLS credentials of the agent port and the operator port. None for a port served in plaintext or not served."""

    agent: grpc.ServerCredentials | None
    operator: grpc.ServerCredentials | None


def port_credentials(config: OrchestratorConfig) -> PortCredentials:
    """Read the TLS files and return the credentials of both ports. Both are None with config.insecure.

    Start-up calls it before it opens the database, so that a missing or mismatched file ends the start
    before the database or admin.token is written. Raises CredentialsError naming the file and the fix.
    """
    if config.insecure:
        return PortCredentials(agent=None, operator=None)
    agent = server_credentials(config.ca_cert, config.cert, config.key, require_client_auth=True)
    operator = None
    if config.operator_listen:
        operator = server_credentials(config.ca_cert, config.cert, config.key, require_client_auth=False)
    return PortCredentials(agent=agent, operator=operator)


def add_ports(
    server: grpc.aio.Server, config: OrchestratorConfig, credentials: PortCredentials | None = None
) -> tuple[int, int]:
    """Bind the agent port and, with TLS, the operator port; return both ports (the operator port is 0 without).

    The agent port requires client certificates of the fleet CA (mutual TLS). The operator port uses
    server-only TLS, because operators authenticate with API tokens. With config.insecure one plaintext
    port serves both. credentials defaults to port_credentials(config). Raises CredentialsError for
    missing TLS files and OSError naming the address when it cannot be bound, such as a port already
    in use by another process.
    """
    if config.insecure:
        return bind_port(server, config.listen, "listen", None), 0
    if credentials is None:
        credentials = port_credentials(config)
    agent_credentials, operator_credentials = credentials.agent, credentials.operator
    port = bind_port(server, config.listen, "listen", agent_credentials)
    operator_port = 0
    if operator_credentials is not None:
        operator_port = bind_port(server, config.operator_listen, "operator_listen", operator_credentials)
    return port, operator_port


def bind_port(server: grpc.aio.Server, address: str, name: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind address (HOST:PORT of config field name) with credentials, or plaintext without; return the port.

    The server must be created with the option ("grpc.so_reuseport", 0), or a port that another
    process listens on with SO_REUSEPORT binds again. Raises OSError naming the address and the flag.
    """
    check_address_free(address, name)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        # grpcio raises RuntimeError ("Failed to bind to address ...") and logs the reason to stderr.
        raise OSError(f"cannot listen on {address}: {error}; check {flag_name(name)}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}: gRPC could not bind it; check {flag_name(name)}")
    return port


def check_listen_addresses(config: OrchestratorConfig) -> None:
    """Probe every address the orchestrator listens on: the agent, operator and metrics ports.

    Start-up calls it before it creates the data directory, the database or admin.token, so that a
    port in use ends the start with nothing written and with the reason, which gRPC's bind does not
    give. Raises OSError from check_address_free.
    """
    # All ports are bound before the database opens, so one taken after this probe still ends the
    # start with nothing stored. The probe gives the reason, which the bind's error lacks.
    check_address_free(config.listen, "listen")
    if not config.insecure and config.operator_listen:
        check_address_free(config.operator_listen, "operator_listen")
    if config.metrics_listen:
        # An empty host serves /metrics on every IPv4 address (telemetry.Telemetry.bind).
        host, _, port = config.metrics_listen.rpartition(":")
        check_address_free(f"{host or '0.0.0.0'}:{port}", "metrics_listen")


def check_address_free(address: str, name: str) -> None:
    """Bind a probe socket to each address that HOST resolves to, so that a used port fails with a clear reason.

    gRPC's own bind failure gives no reason in its exception. The probe sets SO_REUSEADDR as gRPC
    does, so connections of an earlier process in TIME_WAIT do not count as use. Port 0 needs no probe.
    Raises OSError naming the address when a port is in use, or when no resolved address can be bound.
    """
    listen = parse_listen_address(address, name)
    if listen.port == 0:
        return
    flag = flag_name(name)
    host = listen.host.removeprefix("[").removesuffix("]")
    resolved = resolve_listen_host(address, host, listen.port, flag)
    failures: list[OSError] = []
    for family, kind, protocol, _, socket_address in resolved:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(socket_address)
            except OSError as error:
                failures.append(error)
    if any(error.errno == errno.EADDRINUSE for error in failures):
        raise OSError(
            f"cannot listen on {address}: the address is already in use by another process; stop that process "
            f"or choose another port with {flag}"
        )
    if failures and len(failures) == len(resolved):
        raise OSError(f"cannot listen on {address}: {failures[0].strerror}; check {flag}")
