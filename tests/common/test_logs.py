"""configure_logging (formats, levels and the libraries it quiets) and the limits for repeated errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from edgefleet.common.logs import MeasurementLog, RepeatedErrors, RetryLog, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quieted = {name: logging.getLogger(name).level for name in ("onnx_ir", "jax", "alembic")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, previous in quieted.items():
        logging.getLogger(name).setLevel(previous)


def test_library_info_hidden(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    logging.getLogger("onnx_ir.passes.common").info("replaced an initializer")
    logging.getLogger("jax._src.xla_bridge").warning("no TPU")
    logging.getLogger("edgefleet.demo").info("demo step")
    err = capsys.readouterr().err
    assert "replaced an initializer" not in err
    assert "no TPU" in err
    assert "demo step" in err


def test_debug_keeps_libraries_quiet_at_info(restore_logging: None) -> None:
    configure_logging("debug")
    assert logging.getLogger("onnx_ir").level == logging.WARNING


def test_json_lines(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    logging.getLogger("edgefleet.test").info("hello %s", "there", extra={"device_id": "cam-1"})
    event = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (event["message"], event["device_id"], event["level"]) == ("hello there", "cam-1", "info")


@pytest.mark.parametrize(("level", "fmt", "named"), [("loud", "text", "loud"), ("info", "xml", "xml")])
def test_invalid_settings(restore_logging: None, level: str, fmt: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        configure_logging(level, fmt)


def test_repeated_errors_logged_sparsely(caplog: pytest.LogCaptureFixture) -> None:
    errors = RepeatedErrors(logging.getLogger("test.repeated"), every=3)

    for key in ["a"] * 7 + ["b"]:
        try:
            raise RuntimeError(f"broken {key}")
        except RuntimeError:
            errors.exception(key, "model=%s failed", key)

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "model=a failed",
        "model=a failed (3 times so far, logged every 3)",
        "model=a failed (6 times so far, logged every 3)",
        "model=b failed",
    ]
    assert caplog.records[0].exc_info is not None
    assert caplog.records[1].exc_info is None


def test_repeated_warnings_logged_sparsely(caplog: pytest.LogCaptureFixture) -> None:
    repeated = RepeatedErrors(logging.getLogger("test.repeated"), every=2)

    for key in ["a", "a", "b", "a"]:
        repeated.warning(key, "device_id=%s rejected", key)

    assert [record.getMessage() for record in caplog.records] == [
        "device_id=a rejected",
        "device_id=a rejected (2 times so far, logged every 2)",
        "device_id=b rejected",
    ]
    assert {record.levelno for record in caplog.records} == {logging.WARNING}
    assert all(record.exc_info is None for record in caplog.records)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_log_repeats_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    retries = RetryLog(logging.getLogger("test.retry"), interval_s=300.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="test.retry")

    logged = []
    for attempt in range(1, 21):  # 20 failures 30 s apart: 570 s in all.
        logged.append(retries.failed("d1", "INTERNAL", "download failed (attempt %d)", attempt))
        clock.now += 30.0

    records = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert logged == [True] + [False] * 19
    assert records[0] == ("WARNING", "download failed (attempt 1)")
    assert records[10] == (
        "WARNING",
        "10 more identical failures in the 300 s since the last warning, 11 over 300 s in all; "
        "the last: download failed (attempt 11)",
    )
    assert [level for level, _ in records].count("WARNING") == 2
    assert [level for level, _ in records].count("DEBUG") == 18


def test_retry_log_new_error_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    retries = RetryLog(logging.getLogger("test.retry"), clock=FakeClock())
    caplog.set_level(logging.DEBUG, logger="test.retry")

    retries.failed("d1", "INTERNAL", "internal error")
    retries.failed("d1", "INTERNAL", "internal error again")
    retries.failed("d1", "UNAVAILABLE", "unreachable", level=logging.ERROR)
    retries.failed("d2", "INTERNAL", "internal error on d2")

    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", "internal error"),
        ("DEBUG", "internal error again"),
        ("ERROR", "unreachable"),
        ("WARNING", "internal error on d2"),
    ]


def test_retry_log_success_ends_streak(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    retries = RetryLog(logging.getLogger("test.retry"), clock=clock)
    caplog.set_level(logging.DEBUG, logger="test.retry")

    retries.succeeded("d1", "download of d1")
    for _ in range(3):
        retries.failed("d1", "INTERNAL", "internal error")
        clock.now += 10.0
    retries.succeeded("d1", "download of d1")
    first_again = retries.failed("d1", "INTERNAL", "internal error")

    messages = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert messages[3] == ("INFO", "download of d1 succeeded after 3 failed attempts over 30 s")
    assert first_again
    assert messages[4] == ("WARNING", "internal error")
    assert len(messages) == 5


def test_measurement_log_repeats_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    skews = MeasurementLog(logging.getLogger("test.skew"), absolute_tolerance=60.0, interval_s=300.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="test.skew")

    logged = []
    for second in range(0, 330, 30):  # 11 values 30 s apart, within the tolerance of the first.
        logged.append(skews.log("d1", 3600.0 + second % 50, logging.WARNING, "d1 ahead (t=%d)", second))
        clock.now += 30.0

    records = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert logged == [True] + [False] * 9 + [True]
    assert records[0] == ("WARNING", "d1 ahead (t=0)")
    assert records[-1] == ("WARNING", "d1 ahead (t=300) (9 more at debug level in the 300 s since the last such line)")
    assert [level for level, _ in records].count("DEBUG") == 9


def test_measurement_log_change_logged(caplog: pytest.LogCaptureFixture) -> None:
    skews = MeasurementLog(
        logging.getLogger("test.skew"), absolute_tolerance=60.0, relative_tolerance=0.1, clock=FakeClock()
    )
    caplog.set_level(logging.DEBUG, logger="test.skew")

    for key, value in [("d1", 1000.0), ("d1", 1090.0), ("d1", 1101.0), ("d2", 1000.0), ("d1", -1000.0)]:
        skews.log(key, value, logging.INFO, "%s at %.0f", key, value)

    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("INFO", "d1 at 1000"),
        ("DEBUG", "d1 at 1090"),
        ("INFO", "d1 at 1101 (1 more at debug level in the 0 s since the last such line)"),
        ("INFO", "d2 at 1000"),
        ("INFO", "d1 at -1000"),
    ]
