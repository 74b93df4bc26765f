"""Configuration of the orchestrator process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'edgefleet.db').resolve()}"
