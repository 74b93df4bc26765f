"""Configuration of the orchestrator process."""

from __future__ import annotations

import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgefleet.common.config import ConfigError, Range, flag_name, format_number

HELP = {
    "listen": "HOST:PORT for agents (mutual TLS) to call; port 0 picks a free port",
    "db": "SQLAlchemy URL; default sqlite:///DATA_DIR/edgefleet.db",
    "data_dir": "directory for the database file and the artifact store",
    "heartbeat_interval_s": "seconds between agent heartbeats",
    "stale_after_s": "seconds without a heartbeat before a device is stale",
    "offline_after_s": "seconds without a heartbeat before a device is offline",
    "max_upload_bytes": "largest model file accepted by an upload, in bytes",
    "port_file": "write the bound port to this file once serving (for scripts and tests)",
    "log_level": "debug, info, warning or error",
    "log_format": "text or json",
    "shutdown_grace_s": "seconds that open calls get to finish on SIGTERM",
    "metrics_listen": "HOST:PORT for Prometheus /metrics; empty disables it, port 0 picks a free port",
    "metrics_port_file": "write the bound /metrics port to this file once serving",
    "metrics_lookback_s": "seconds of latency windows that /metrics merges into quantiles",
    "keepalive_time_s": "seconds without reads on a connection before the server pings the agent",
    "keepalive_timeout_s": "seconds the server waits for a ping's answer before it drops the connection",
    "keepalive_min_ping_interval_s": "shortest interval between client pings that the server accepts, in seconds",
    "max_clock_skew_s": "device clock offset, in seconds, past which a device is flagged and its metric "
    "windows are placed at their receive time",
    "metric_uploads_per_s": "metric batches one device may upload per second on average",
    "metric_upload_burst": "metric batches one device may upload at once before the rate limit applies",
    "max_concurrent_downloads": "artifact downloads served at once; more are rejected with RESOURCE_EXHAUSTED",
    "retention_interval_s": "seconds between metric retention runs; 0 disables retention",
    "metrics_downsample_after_s": "age in seconds (receive time) after which metric windows are merged",
    "metrics_downsample_window_s": "length in seconds of the merged metric windows",
    "metrics_delete_after_s": "age in seconds (receive time) after which metric windows are deleted",
    "insecure": "serve plaintext gRPC without TLS or required API tokens (development and tests only)",
    "ca_cert": "PEM file of the fleet CA that device certificates must chain to",
    "cert": "PEM server certificate of the orchestrator (edgefleet pki init writes DIR/server.pem)",
    "key": "PEM private key of the server certificate (DIR/server.key)",
    "operator_listen": "HOST:PORT for operator calls over server-only TLS with API tokens; port 0 picks a free "
    "port; ignored with --insecure, where operators use --listen",
    "operator_port_file": "write the bound operator port to this file once serving",
}


@dataclass(frozen=True)
class OrchestratorConfig:
    listen: str = "127.0.0.1:50051"
    db: str = ""
    data_dir: Path = Path("./edgefleet-data")
    heartbeat_interval_s: float = 10.0
    stale_after_s: float = 30.0
    offline_after_s: float = 120.0
    max_upload_bytes: int = 512 * 1024 * 1024
    port_file: Path | None = None
    log_level: str = "info"
    log_format: str = "text"
    shutdown_grace_s: float = 5.0
    metrics_listen: str = ""
    metrics_port_file: Path | None = None
    metrics_lookback_s: float = 300.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    keepalive_min_ping_interval_s: float = 10.0
    max_clock_skew_s: float = 60.0
    metric_uploads_per_s: float = 10.0
    metric_upload_burst: int = 50
    max_concurrent_downloads: int = 64
    retention_interval_s: float = 3600.0
    metrics_downsample_after_s: float = 86400.0
    metrics_downsample_window_s: int = 300
    metrics_delete_after_s: float = 30 * 86400.0
    insecure: bool = False
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    operator_listen: str = "127.0.0.1:50052"
    operator_port_file: Path | None = None

    def __post_init__(self) -> None:
        """Check the listen addresses and the numeric settings, and raise ConfigError naming the flag and the range."""
        listen = parse_listen_address(self.listen, "listen")
        if self.operator_listen:
            operator_listen = parse_listen_address(self.operator_listen, "operator_listen")
            if not self.insecure and operator_listen == listen and listen.port != 0:
                raise ConfigError(
                    f"invalid --operator-listen {self.operator_listen!r}: it is the same address as --listen; "
                    "operators and agents need separate ports"
                )
        if self.metrics_listen:
            # The Prometheus server listens on all interfaces for an empty host (":9464").
            parse_listen_address(self.metrics_listen, "metrics_listen", allow_empty_host=True)
        for field in fields(self):
            allowed = RANGES.get(field.name)
            if allowed is not None:
                allowed.check(field.name, getattr(self, field.name))
        _check_at_least(self, "offline_after_s", "stale_after_s", "a device turns stale before it turns offline")
        _check_at_least(
            self,
            "metrics_delete_after_s",
            "metrics_downsample_after_s",
            "metric windows are merged before they are deleted",
        )

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'edgefleet.db').resolve()}"


MAX_PORT = 65535

# gRPC takes keepalive durations in milliseconds as a C int, so whole seconds up to (2**31 - 1) ms.
MAX_GRPC_DURATION_S = (2**31 - 1) // 1000

# Agents receive the heartbeat interval as a uint32 number of seconds (RegisterResponse).
MAX_HEARTBEAT_INTERVAL_S = 2**32 - 1

# Merged metric windows are at most one day long (retention checks the same bound).
MAX_METRICS_WINDOW_S = 86400


@dataclass(frozen=True)
class ListenAddress:
    """A HOST:PORT listen address. The host is "" for all interfaces and keeps the brackets of an IPv6 address."""

    host: str
    port: int


def parse_listen_address(value: str, name: str, *, allow_empty_host: bool = False) -> ListenAddress:
    """Parse HOST:PORT ([IPv6]:PORT for IPv6) with a port from 0 to 65535.

    name is the configuration field ("listen"); the errors name its flag. Returns the parsed address.
    Raises ConfigError for another form, a missing host (unless allow_empty_host) or a port out of range.
    """
    flag = flag_name(name)
    example = "127.0.0.1:50051 or [::1]:50051"
    host, separator, port_text = value.rpartition(":")
    if not separator or not port_text.isdigit() or (not host and not allow_empty_host):
        raise ConfigError(f"invalid {flag} {value!r}: expected HOST:PORT, such as {example}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"invalid {flag} {value!r}: put an IPv6 address in brackets, such as [::1]:50051")
    port = int(port_text)
    if port > MAX_PORT:
        raise ConfigError(
            f"invalid {flag} {value!r}: port {port} is out of range; use a port from 0 to {MAX_PORT} "
            "(0 picks a free port)"
        )
    return ListenAddress(host=host, port=port)


def resolve_listen_host(address: str, host: str, port: int, flag: str) -> list[tuple[Any, ...]]:
    """Return getaddrinfo's passive TCP addresses for host (without IPv6 brackets) and port.

    Raises OSError naming address and flag when the host does not resolve or is not a valid name.
    """
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise OSError(f"cannot listen on {address}: cannot resolve {host!r} ({error.strerror}); check {flag}") from None
    except UnicodeError:
        # Python's IDNA codec rejects a name with an empty label ("a..b") before any lookup.
        raise OSError(f"cannot listen on {address}: {host!r} is not a valid host name; check {flag}") from None


RANGES = {
    "heartbeat_interval_s": Range(0, "seconds", exclusive_minimum=True, maximum=MAX_HEARTBEAT_INTERVAL_S),
    "stale_after_s": Range(0, "seconds", exclusive_minimum=True),
    "offline_after_s": Range(0, "seconds", exclusive_minimum=True),
    "max_upload_bytes": Range(1, "bytes"),
    "shutdown_grace_s": Range(0, "seconds"),
    "metrics_lookback_s": Range(0, "seconds", exclusive_minimum=True),
    # Sent to gRPC in whole milliseconds, so the smallest value is 1 ms.
    "keepalive_time_s": Range(0.001, "seconds", maximum=MAX_GRPC_DURATION_S),
    "keepalive_timeout_s": Range(0.001, "seconds", maximum=MAX_GRPC_DURATION_S),
    "keepalive_min_ping_interval_s": Range(0, "seconds", maximum=MAX_GRPC_DURATION_S),
    "max_clock_skew_s": Range(0, "seconds"),
    "metric_uploads_per_s": Range(0, "batches per second", exclusive_minimum=True),
    "metric_upload_burst": Range(1, "batches"),
    "max_concurrent_downloads": Range(1, "downloads"),
    "retention_interval_s": Range(0, "seconds (0 disables retention)"),
    "metrics_downsample_after_s": Range(0, "seconds", exclusive_minimum=True),
    "metrics_downsample_window_s": Range(1, "seconds", maximum=MAX_METRICS_WINDOW_S),
    "metrics_delete_after_s": Range(0, "seconds", exclusive_minimum=True),
}


def _check_at_least(config: OrchestratorConfig, name: str, lower_name: str, reason: str) -> None:
    value = getattr(config, name)
    lower = getattr(config, lower_name)
    if value < lower:
        raise ConfigError(
            f"invalid {flag_name(name)} {format_number(value)}: must be at least {flag_name(lower_name)} "
            f"({format_number(lower)} seconds), so that {reason}"
        )
