"""Input checks of `edgefleet models compress` and the retries of `edgefleet jobs wait`, run in-process."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import pytest

from edgefleet.cli import compress
from edgefleet.cli.main import EXIT_NOT_FOUND, EXIT_USAGE, main
from edgefleet.common.errors import EXIT_UNAVAILABLE
from tests.servers import OrchestratorThread, orchestrator_config

pytest_plugins = ["tests.servers"]

Capture = pytest.CaptureFixture[str]


def cli(address: str, *args: str) -> int:
    return main(["--insecure", "--orchestrator", address, *args])


def usage_error(capsys: Capture, argv: list[str]) -> str:
    """Run the CLI with argv, which argparse must reject, and return its stderr."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == EXIT_USAGE
    return capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_calibration_size_invalid(capsys: Capture, value: str) -> None:
    argv = ["models", "compress", "m:1", "--int8", "--calibration", "demo-photos", "--calibration-size", value]
    error = usage_error(capsys, argv)

    assert f"argument --calibration-size: invalid value {value!r}" in error
    assert "at least 1" in error


def test_fine_tune_steps_negative(capsys: Capture) -> None:
    error = usage_error(capsys, ["models", "compress", "m:1", "--int8", "--fine-tune-steps", "-1"])

    assert "argument --fine-tune-steps: invalid value '-1'" in error


@pytest.mark.parametrize(
    "flags",
    [
        ["--calibration", "demo-photos"],
        ["--calibration-size", "8"],
        ["--fine-tune-steps", "0"],
        ["--calibration", "digits", "--calibration-size", "8"],
    ],
)
def test_int8_flag_without_int8(capsys: Capture, flags: list[str]) -> None:
    # No orchestrator listens at port 1: the check must fail before any call.
    code = cli("127.0.0.1:1", "models", "compress", "m:1", *flags)

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"{flags[0]}" in error
    assert "add --int8" in error
    assert "cannot reach" not in error


def test_int8_flag_with_recipe_quantize(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[quantize]\ncalibration = { images = "builtin:digits" }\n', encoding="utf-8")
    args = argparse.Namespace(
        recipe=recipe,
        int8=False,
        calibration=None,
        calibration_size=8,
        fine_tune_steps=None,
        evaluation=None,
        max_accuracy_drop=None,
        gate=None,
    )

    assert compress.build_recipe(args)["quantize"]["calibration_size"] == 8


def test_jobs_wait_gives_up(monkeypatch: pytest.MonkeyPatch, capsys: Capture) -> None:
    monkeypatch.setattr(compress, "UNAVAILABLE_RETRY_S", 1.0)
    started = time.monotonic()

    code = cli(f"127.0.0.1:{free_port()}", "jobs", "wait", "job-1")

    error = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE
    assert time.monotonic() - started >= 1.0
    assert error.count("retrying for up to 1 s") == 1
    assert "cannot reach the orchestrator" in error


def test_jobs_wait_survives_restart(tmp_path: Path, capsys: Capture) -> None:
    port = free_port()
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(cli(f"127.0.0.1:{port}", "jobs", "wait", "job-1")))
    waiter.start()
    time.sleep(1.5)
    orchestrator = OrchestratorThread(orchestrator_config(tmp_path, listen=f"127.0.0.1:{port}"))
    try:
        waiter.join(30)
    finally:
        orchestrator.stop()

    error = capsys.readouterr().err
    # The job id is unknown to the new orchestrator, so reaching it ends the wait with not found.
    assert result == [EXIT_NOT_FOUND]
    assert error.count("retrying for up to 60 s") == 1
    assert "job-1" in error
