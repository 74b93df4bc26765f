"""Configuration of the agent process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

HELP = {
    "orchestrator": "orchestrator address HOST:PORT",
    "profile": "device profile: a shipped name (camera, car-ecu, plc) or a TOML file; empty uses the probe alone",
    "state_dir": "directory for the device identity, models and buffers",
    "labels": "extra device labels as KEY=VALUE,KEY=VALUE",
    "socket": "Unix socket of the local inference API; default STATE_DIR/agent.sock",
    "tensor_socket": "Unix socket of the framed tensor protocol; default SOCKET with .tensor.sock in place of .sock",
    "metrics_window_s": "seconds of latency samples per metric window",
    "insecure": "talk to the orchestrator without TLS (development and demos only)",
    "ca_cert": "PEM file of the fleet CA, for mutual TLS",
    "cert": "PEM certificate of this device, for mutual TLS",
    "key": "PEM private key of this device, for mutual TLS",
    "enrollment_token": "single-use token for the first registration",
    "max_backoff_s": "longest wait between reconnect attempts, in seconds",
    "shutdown_grace_s": "seconds that shutdown may take before the agent exits anyway",
    "log_level": "debug, info, warning or error",
    "log_format": "text or json",
    "keepalive_time_s": "seconds without traffic before the agent pings the orchestrator; keep it at or above "
    "the orchestrator's keepalive_min_ping_interval_s",
    "keepalive_timeout_s": "seconds an unanswered ping waits before the link counts as dead",
    "metrics_buffer_max_bytes": "disk space for metric batches waiting for the orchestrator, in bytes",
    "metrics_buffer_max_batches": "metric batches kept on disk at most; the oldest are dropped first",
}


@dataclass(frozen=True)
class AgentConfig:
    orchestrator: str = "127.0.0.1:50051"
    profile: str = ""
    state_dir: Path = Path("./edgefleet-agent")
    labels: dict[str, str] = field(default_factory=dict)
    socket: Path | None = None
    tensor_socket: Path | None = None
    metrics_window_s: float = 10.0
    insecure: bool = False
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    enrollment_token: str = ""
    max_backoff_s: float = 30.0
    shutdown_grace_s: float = 5.0
    log_level: str = "info"
    log_format: str = "text"
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    metrics_buffer_max_bytes: int = 64 * 1024 * 1024
    metrics_buffer_max_batches: int = 10_000

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / "agent.sock"

    @property
    def tensor_socket_path(self) -> Path:
        if self.tensor_socket is not None:
            return self.tensor_socket
        return self.socket_path.with_name(self.socket_path.name.removesuffix(".sock") + ".tensor.sock")
