"""OrchestratorConfig checks of listen addresses and numeric settings, at construction and through load_config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from edgefleet.common.config import ConfigError, format_number, load_config
from edgefleet.orchestrator.config import RANGES, ListenAddress, OrchestratorConfig, parse_listen_address


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:50051", ListenAddress("127.0.0.1", 50051)),
        ("0.0.0.0:0", ListenAddress("0.0.0.0", 0)),
        ("[::1]:65535", ListenAddress("[::1]", 65535)),
        ("localhost:1", ListenAddress("localhost", 1)),
    ],
)
def test_listen_address_valid(value: str, expected: ListenAddress) -> None:
    assert parse_listen_address(value, "listen") == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range; use a port from 0 to 65535"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:", "expected HOST:PORT"),
        ("127.0.0.1:-1", "expected HOST:PORT"),
        ("127.0.0.1:http", "expected HOST:PORT"),
        (":50051", "expected HOST:PORT"),
        ("::1:50051", "put an IPv6 address in brackets"),
        ("", "expected HOST:PORT"),
    ],
)
def test_listen_address_invalid(value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_listen_address(value, "operator_listen")

    assert f"invalid --operator-listen {value!r}" in str(raised.value)
    assert reason in str(raised.value)


def test_listen_address_empty_host_allowed() -> None:
    assert parse_listen_address(":9464", "metrics_listen", allow_empty_host=True) == ListenAddress("", 9464)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("listen", "127.0.0.1:99999"),
        ("operator_listen", "127.0.0.1:70000"),
        ("metrics_listen", "127.0.0.1:70000"),
    ],
)
def test_config_rejects_listen(field: str, value: str) -> None:
    overrides: dict[str, Any] = {field: value}

    with pytest.raises(ConfigError, match="out of range"):
        OrchestratorConfig(**overrides)


def test_config_operator_listen_empty() -> None:
    assert OrchestratorConfig(operator_listen="").operator_listen == ""


def test_config_operator_listen_same_as_listen() -> None:
    with pytest.raises(ConfigError, match="same address as --listen"):
        OrchestratorConfig(listen="127.0.0.1:6000", operator_listen="127.0.0.1:6000")


def test_config_insecure_ignores_operator_listen() -> None:
    config = OrchestratorConfig(listen="127.0.0.1:6000", operator_listen="127.0.0.1:6000", insecure=True)

    assert config.operator_listen == "127.0.0.1:6000"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("stale_after_s", -5.0, "invalid --stale-after-s -5: must be greater than 0 seconds"),
        ("stale_after_s", 0.0, "invalid --stale-after-s 0: must be greater than 0 seconds"),
        ("offline_after_s", -1.0, "invalid --offline-after-s -1: must be greater than 0 seconds"),
        ("heartbeat_interval_s", 0.0, "invalid --heartbeat-interval-s 0: must be greater than 0"),
        ("heartbeat_interval_s", 2.0**32, "at most 4294967295 seconds"),
        ("max_upload_bytes", 0, "invalid --max-upload-bytes 0: must be at least 1 bytes"),
        ("shutdown_grace_s", -0.5, "invalid --shutdown-grace-s -0.5: must be at least 0 seconds"),
        ("metrics_lookback_s", 0.0, "invalid --metrics-lookback-s 0"),
        ("keepalive_time_s", 0.0, "invalid --keepalive-time-s 0: must be from 0.001 to 2147483 seconds"),
        ("keepalive_timeout_s", 1e7, "invalid --keepalive-timeout-s 10000000"),
        ("keepalive_min_ping_interval_s", -1.0, "invalid --keepalive-min-ping-interval-s -1"),
        ("max_clock_skew_s", -1.0, "invalid --max-clock-skew-s -1: must be at least 0 seconds"),
        ("metric_uploads_per_s", 0.0, "invalid --metric-uploads-per-s 0: must be greater than 0 batches per second"),
        ("metric_upload_burst", 0, "invalid --metric-upload-burst 0: must be at least 1 batches"),
        ("max_concurrent_downloads", 0, "invalid --max-concurrent-downloads 0: must be at least 1 downloads"),
        ("retention_interval_s", -1.0, "invalid --retention-interval-s -1: must be at least 0 seconds"),
        ("metrics_downsample_after_s", 0.0, "invalid --metrics-downsample-after-s 0"),
        ("metrics_downsample_window_s", 0, "invalid --metrics-downsample-window-s 0: must be from 1 to 86400 seconds"),
        ("metrics_downsample_window_s", 86401, "invalid --metrics-downsample-window-s 86401"),
        ("metrics_delete_after_s", -1.0, "invalid --metrics-delete-after-s -1"),
    ],
)
def test_config_rejects_number(field: str, value: float, message: str) -> None:
    overrides: dict[str, Any] = {field: value}

    with pytest.raises(ConfigError) as raised:
        OrchestratorConfig(**overrides)

    assert message in str(raised.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_config_rejects_non_finite(value: float) -> None:
    with pytest.raises(ConfigError, match="invalid --stale-after-s"):
        OrchestratorConfig(stale_after_s=value)


@pytest.mark.parametrize(
    "values",
    [
        {"retention_interval_s": 0.0},
        {"shutdown_grace_s": 0.0},
        {"max_clock_skew_s": 0.0},
        {"keepalive_min_ping_interval_s": 0.0},
        {"keepalive_time_s": 0.001},
        {"stale_after_s": 10.0, "offline_after_s": 10.0},
        {"metrics_downsample_window_s": 86400},
    ],
)
def test_config_accepts_bounds(values: dict[str, Any]) -> None:
    config = OrchestratorConfig(**values)

    for field, value in values.items():
        assert getattr(config, field) == value


def test_config_offline_before_stale() -> None:
    with pytest.raises(ConfigError) as raised:
        OrchestratorConfig(stale_after_s=30.0, offline_after_s=10.0)

    assert "invalid --offline-after-s 10: must be at least --stale-after-s (30 seconds)" in str(raised.value)


def test_config_delete_before_downsample() -> None:
    with pytest.raises(ConfigError, match="must be at least --metrics-downsample-after-s"):
        OrchestratorConfig(metrics_downsample_after_s=3600.0, metrics_delete_after_s=60.0)


def test_config_ranges_name_fields() -> None:
    names = {field.name for field in dataclasses.fields(OrchestratorConfig)}

    assert set(RANGES) <= names


def test_config_defaults_valid() -> None:
    config = OrchestratorConfig()

    assert config.stale_after_s < config.offline_after_s


def test_load_config_environment_value() -> None:
    with pytest.raises(ConfigError, match="invalid --stale-after-s -5"):
        load_config(OrchestratorConfig, environ={"EDGEFLEET_STALE_AFTER_S": "-5"})


@pytest.mark.parametrize(
    ("value", "shown"),
    [(30.0, "30"), (0.5, "0.5"), (4294967295.0, "4294967295"), (1e300, "1e+300"), (-1e17, "-1e+17"), (7, "7")],
)
def test_format_number_as_written(value: float, shown: str) -> None:
    # A huge value from a config file is shown in exponent form, not as hundreds of digits.
    assert format_number(value) == shown
