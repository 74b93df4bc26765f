"""Security set-up at orchestrator start: the store, the first signing key, the bootstrap token and the ports."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import grpc
from sqlalchemy.engine import Engine

from edgefleet.common.tls import server_credentials
from edgefleet.orchestrator.config import OrchestratorConfig
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


def add_ports(server: grpc.aio.Server, config: OrchestratorConfig) -> tuple[int, int]:
    """Bind the agent port and, with TLS, the operator port; return both ports (the operator port is 0 without).

    The agent port requires client certificates of the fleet CA (mutual TLS). The operator port uses
    server-only TLS, because operators authenticate with API tokens. With config.insecure one plaintext
    port serves both. Raises CredentialsError for missing TLS files and OSError when an address
    cannot be bound.
    """
    if config.insecure:
        port = server.add_insecure_port(config.listen)
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}: the address is in use or invalid")
        return port, 0
    agent_credentials = server_credentials(config.ca_cert, config.cert, config.key, require_client_auth=True)
    port = server.add_secure_port(config.listen, agent_credentials)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}: the address is in use or invalid")
    operator_port = 0
    if config.operator_listen:
        operator_credentials = server_credentials(config.ca_cert, config.cert, config.key, require_client_auth=False)
        operator_port = server.add_secure_port(config.operator_listen, operator_credentials)
        if operator_port == 0:
            raise OSError(f"cannot listen on {config.operator_listen}: the address is in use or invalid")
    return port, operator_port
