"""Configuration of the agent process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.common.config import ConfigError, Range, dial_address_problem
from edgefleet.common.labels import label_problem

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


# gRPC takes keepalive durations in milliseconds as a C int, so the maximum is the whole number of
# seconds within 2**31 - 1 ms.
MAX_GRPC_DURATION_S = (2**31 - 1) // 1000

RANGES = {
    "max_backoff_s": Range(0, "seconds", exclusive_minimum=True),
    "shutdown_grace_s": Range(0, "seconds"),
    # Sent to gRPC in whole milliseconds, so the smallest value is 1 ms.
    "keepalive_time_s": Range(0.001, "seconds", maximum=MAX_GRPC_DURATION_S),
    "keepalive_timeout_s": Range(0.001, "seconds", maximum=MAX_GRPC_DURATION_S),
    # MetricsRecorder accepts 1 to 3600; checked here too, so that a bad value exits before the state dir is written.
    "metrics_window_s": Range(1, "seconds", maximum=3600),
    "metrics_buffer_max_bytes": Range(1, "bytes"),
    "metrics_buffer_max_batches": Range(1, "batches"),
}


def check_agent_config(config: AgentConfig) -> None:
    """Check the orchestrator address, the numeric settings and the socket paths before the agent starts.

    Raises ConfigError naming the flag, the value and what to give instead.
    """
    check_orchestrator_address(config.orchestrator)
    for name, allowed in RANGES.items():
        allowed.check(name, getattr(config, name))
    problem = label_problem(config.labels)
    if problem:
        raise ConfigError(f"invalid --labels: {problem}; the orchestrator would reject the device")
    if config.socket_path.absolute() == config.tensor_socket_path.absolute():
        raise ConfigError(
            f"--socket and --tensor-socket name the same path {config.socket_path}; give each socket its own path"
        )


def check_orchestrator_address(value: str) -> None:
    """Raise ConfigError unless value is HOST:PORT ([IPv6]:PORT for IPv6) with a port from 1 to 65535."""
    problem = dial_address_problem(value, "the orchestrator's agent port (--listen, default 50051)")
    if problem:
        raise ConfigError(f"invalid --orchestrator {value!r}: {problem}")
