"""Input checks of the operator CLI, run in-process against a real plaintext orchestrator."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cli import rollout
from edgefleet.cli.main import EXIT_USAGE, MAX_DEPLOY_THREADS, build_parser, main, orchestrator_address
from edgefleet.orchestrator.handlers import deploy as deploy_handlers
from edgefleet.orchestrator.handlers import rollouts as rollout_handlers
from edgefleet.orchestrator.rollouts.domain import DEFAULT_MIN_SAMPLES
from tests.agent.models import tflite_linear
from tests.servers import OrchestratorThread, hardware_message, linear_onnx, register

pytest_plugins = ["tests.servers"]

Capture = pytest.CaptureFixture[str]


def cli(orchestrator: OrchestratorThread, *args: str) -> int:
    return main(["--insecure", "--orchestrator", orchestrator.address, *args])


def usage_error(capsys: Capture, argv: list[str]) -> str:
    """Run the CLI with argv, which argparse must reject, and return its stderr."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == EXIT_USAGE
    return capsys.readouterr().err


@pytest.fixture
def fleet(orchestrator: OrchestratorThread, tmp_path: Path, capsys: Capture) -> OrchestratorThread:
    """Return an orchestrator with linear:1 and device edge-01 of 2 usable cores."""
    model = tmp_path / "linear.onnx"
    model.write_bytes(linear_onnx())
    assert cli(orchestrator, "models", "add", str(model), "--name", "linear", "--version", "1") == 0
    register(orchestrator.agent, "edge-01", hardware=hardware_message(usable_cores=2.0))
    capsys.readouterr()
    return orchestrator


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_timeout_invalid(capsys: Capture, value: str) -> None:
    error = usage_error(capsys, ["--timeout", value, "devices", "list"])

    assert f"argument --timeout: invalid value {value!r}" in error
    assert "above 0" in error
    assert "cannot reach" not in error


def test_timeout_fraction(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "--timeout", "0.5", "devices", "list", "-o", "json")

    assert code == 0
    assert [d["device_id"] for d in json.loads(capsys.readouterr().out)] == ["edge-01"]


@pytest.mark.parametrize("flag", ["-o", "--output"])
def test_output_before_command(fleet: OrchestratorThread, capsys: Capture, flag: str) -> None:
    code = cli(fleet, flag, "json", "devices", "list")

    assert code == 0
    assert [d["device_id"] for d in json.loads(capsys.readouterr().out)] == ["edge-01"]


def test_output_after_command_wins(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "-o", "json", "devices", "list", "-o", "table")

    output = capsys.readouterr().out
    assert code == 0
    assert output.startswith("DEVICE")
    assert "edge-01" in output


def test_output_before_local_command(tmp_path: Path, capsys: Capture) -> None:
    code = main(["-o", "json", "pki", "init", "--dir", str(tmp_path / "pki")])

    assert code == 0
    assert json.loads(capsys.readouterr().out)["ca_cert"] == str(tmp_path / "pki" / "ca.pem")


def test_output_invalid_before_command(capsys: Capture) -> None:
    error = usage_error(capsys, ["-o", "yaml", "devices", "list"])

    assert "argument --output/-o: invalid choice: 'yaml'" in error


def test_models_add_directory(fleet: OrchestratorThread, tmp_path: Path, capsys: Capture) -> None:
    code = cli(fleet, "models", "add", str(tmp_path), "--name", "linear", "--version", "2")

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"{tmp_path} is a directory" in error
    assert "model file" in error
    assert "not found" not in error


def test_models_add_not_model(fleet: OrchestratorThread, tmp_path: Path, capsys: Capture) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))

    code = cli(fleet, "models", "add", str(photo), "--name", "photo", "--version", "1")

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "model cat.jpg is not a model file" in error
    assert "upload-" not in error


def test_models_add_empty_file(fleet: OrchestratorThread, tmp_path: Path, capsys: Capture) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")

    code = cli(fleet, "models", "add", str(empty), "--name", "linear", "--version", "2")
    error = capsys.readouterr().err
    listed = cli(fleet, "models", "list", "-o", "json")

    assert code == EXIT_USAGE
    assert f"model file {empty} is empty (0 bytes); give an .onnx or .tflite model file" in error
    assert "header" not in error
    assert listed == 0
    assert [m["version"] for m in json.loads(capsys.readouterr().out)] == ["1"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--name", "lïnear", "--version", "2"], "invalid --name: 'lïnear' must be 1-128 ASCII letters"),
        (["--name", "linear", "--version", "-2"], "invalid --version: '-2' must be 1-128 ASCII letters"),
        (["--name", "linear", "--version", "1", "--variant-kind", "bogus"], "invalid --variant-kind: 'bogus'"),
    ],
)
def test_models_add_flag_names(
    fleet: OrchestratorThread, tmp_path: Path, capsys: Capture, flags: list[str], expected: str
) -> None:
    model = tmp_path / "variant.onnx"
    model.write_bytes(linear_onnx(seed=1))

    code = cli(fleet, "models", "add", str(model), *flags)
    error = capsys.readouterr().err

    assert code == EXIT_USAGE
    assert expected in error
    assert "header." not in error


def test_models_add_wrong_kind(fleet: OrchestratorThread, tmp_path: Path, capsys: Capture) -> None:
    model = tmp_path / "variant.onnx"
    model.write_bytes(linear_onnx(seed=1))

    code = cli(
        fleet, "models", "add", str(model), "--name", "linear", "--version", "1", "--variant-kind", "tflite-fp32"
    )

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "'tflite-fp32' is a kind for TFLite files" in error
    assert "variant.onnx is ONNX" in error


def test_models_add_unknown_kind(fleet: OrchestratorThread, tmp_path: Path, capsys: Capture) -> None:
    model = tmp_path / "variant.onnx"
    model.write_bytes(linear_onnx(seed=1))

    code = cli(fleet, "models", "add", str(model), "--name", "linear", "--version", "1", "--variant-kind", "bogus")

    assert code == EXIT_USAGE
    assert "'bogus' is not a known variant kind" in capsys.readouterr().err


def test_models_add_tflite_kind(fleet: OrchestratorThread, capsys: Capture) -> None:
    path = str(tflite_linear())

    code = cli(
        fleet,
        "models",
        "add",
        path,
        "--name",
        "linear",
        "--version",
        "1",
        "--variant-kind",
        "tflite-fp32",
        "-o",
        "json",
    )

    assert code == 0, capsys.readouterr().err
    variants = json.loads(capsys.readouterr().out)["variants"]
    assert sorted(v["variant_id"] for v in variants) == ["linear:1:source", "linear:1:tflite-fp32"]


def test_deploy_threads_notice(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "deploy", "--model", "linear", "--device", "edge-01", "--threads", "64", "-o", "json")

    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 2
    assert result["requested_threads"] == 64
    assert "requested 64 threads, lowered to 2" in result["notice"]
    assert "2 usable cores" in result["notice"]


def test_deploy_threads_notice_table(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "deploy", "--model", "linear", "--device", "edge-01", "--threads", "64")

    assert code == 0
    assert "note: requested 64 threads, lowered to 2" in capsys.readouterr().out


def test_deploy_threads_no_notice(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "deploy", "--model", "linear", "--device", "edge-01", "--threads", "2", "-o", "json")

    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 2
    assert result["notice"] == ""


def test_deploy_threads_negative(capsys: Capture) -> None:
    error = usage_error(capsys, ["deploy", "--model", "linear", "--device", "edge-01", "--threads", "-1"])

    assert "argument --threads: invalid value '-1'" in error


DEPLOY = ["deploy", "--model", "linear", "--device", "edge-01"]


@pytest.mark.parametrize("value", ["257", "99999999999999999999"])
def test_deploy_threads_huge(fleet: OrchestratorThread, capsys: Capture, value: str) -> None:
    error = usage_error(
        capsys,
        ["--insecure", "--orchestrator", fleet.address, *DEPLOY, "--threads", value],
    )

    assert f"argument --threads: invalid value {value!r}: give a whole number from 0 to 256" in error
    assert "Traceback" not in error
    assert cli(fleet, "devices", "show", "edge-01", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["desired_generation"] == 0


def test_deploy_threads_limit_match() -> None:
    assert MAX_DEPLOY_THREADS == deploy_handlers.MAX_THREADS


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_deploy_wait_invalid(fleet: OrchestratorThread, capsys: Capture, value: str) -> None:
    error = usage_error(
        capsys,
        ["--insecure", "--orchestrator", fleet.address, *DEPLOY, "--wait", value],
    )

    assert f"argument --wait: invalid value {value!r}: give a number of seconds of 0 or more" in error
    assert cli(fleet, "devices", "show", "edge-01", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["desired_generation"] == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "wait", "job-1", "--wait-timeout", "-1"],
        ["models", "compress", "linear:1", "--int8", "--wait-timeout", "-1"],
        ["models", "add", "linear.onnx", "--name", "linear", "--version", "2", "--wait-timeout", "-1"],
    ],
)
def test_wait_timeout_negative(capsys: Capture, argv: list[str]) -> None:
    error = usage_error(capsys, argv)

    assert "argument --wait-timeout: invalid value '-1': give a number of seconds of 0 or more" in error


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_rollout_interval_invalid(capsys: Capture, value: str) -> None:
    error = usage_error(capsys, ["rollout", "status", "ro-1", "--watch", "--interval", value])

    assert f"argument --interval: invalid value {value!r}: give a number of seconds above 0" in error


@pytest.mark.parametrize("verb", ["init", "issue"])
@pytest.mark.parametrize("value", ["-1", "0", "99999999"])
def test_pki_days_invalid(tmp_path: Path, capsys: Capture, verb: str, value: str) -> None:
    assert main(["pki", "init", "--dir", str(tmp_path / "pki")]) == 0
    before = sorted(path.name for path in (tmp_path / "pki").rglob("*"))
    capsys.readouterr()
    argv = ["pki", verb, "--dir", str(tmp_path / "pki"), "--days", value]
    if verb == "issue":
        argv += ["--device-id", "cam-001"]

    error = usage_error(capsys, argv)

    assert f"argument --days: invalid value {value!r}: give a whole number from 1 to 36500" in error
    assert "Traceback" not in error
    assert sorted(path.name for path in (tmp_path / "pki").rglob("*")) == before


ROLLOUT = ["rollout", "create", "--model", "linear:1", "--budget-ms", "100"]


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--min-samples", "0", "1 to 10000000"),
        ("--min-samples", "-5", "1 to 10000000"),
        ("--max-rollbacks", "0", "1 to 100"),
        ("--sample-timeout", "0", "above 0 and at most 604800"),
    ],
)
def test_rollout_create_zero(capsys: Capture, flag: str, value: str, allowed: str) -> None:
    error = usage_error(capsys, [*ROLLOUT, flag, value])

    assert f"argument {flag}" in error
    assert allowed in error


def test_rollout_create_flags(fleet: OrchestratorThread, capsys: Capture) -> None:
    flags = ["--min-samples", "1", "--max-rollbacks", "3", "--sample-timeout", "30", "--max-error-rate", "0"]

    code = cli(fleet, *ROLLOUT, *flags, "-o", "json")

    assert code == 0
    created = json.loads(capsys.readouterr().out)
    assert created["min_samples"] == 1
    assert created["max_rollbacks"] == 3
    assert created["sample_timeout_s"] == 30
    assert created["max_error_rate_pct"] == 0


def test_rollout_create_defaults(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, *ROLLOUT, "-o", "json")

    assert code == 0
    assert json.loads(capsys.readouterr().out)["min_samples"] == DEFAULT_MIN_SAMPLES


def test_rollout_limits_match() -> None:
    assert rollout.MAX_MIN_SAMPLES == rollout_handlers.MAX_MIN_SAMPLES
    assert rollout.MAX_ROLLBACKS == rollout_handlers.MAX_ROLLBACKS
    assert rollout.MAX_SAMPLE_TIMEOUT_S == rollout_handlers.MAX_SAMPLE_TIMEOUT_S


@pytest.mark.parametrize(
    ("argv", "command", "expected"),
    [
        (
            [*DEPLOY, "--varient", "linear:1:source"],
            "deploy",
            "--varient linear:1:source (--varient: did you mean --variant?)",
        ),
        (["devices", "list", "--stats", "online"], "devices list", "--stats online (--stats: did you mean --status?)"),
        (
            ["metrics", "query", "--grop-by=variant"],
            "metrics query",
            "--grop-by=variant (--grop-by: did you mean --group-by?)",
        ),
        (["rollout", "list", "extra"], "rollout list", "extra"),
    ],
)
def test_unknown_flag_names_command(capsys: Capture, argv: list[str], command: str, expected: str) -> None:
    error = usage_error(capsys, argv)

    assert f"edgefleet {command}: error: unrecognized arguments: {expected}" in error
    assert f"usage: edgefleet {command}" in error


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["metrics", "query", "--since", "-5m"],
            "argument --since: '-5m' starts with a dash, so it is read as an option instead of a value. "
            "--since expects start: ISO 8601 time, in this machine's time zone unless it ends in Z or an offset, "
            "or a duration back from now (15m, 2h), no more than 60 s after now. "
            "Durations and counts are positive, so write --since 5m. "
            "To pass a value that does start with a dash, write --since=-5m.",
        ),
        (
            ["enroll", "create", "--device-id", "cam-001", "--ttl", "-1h"],
            "argument --ttl: '-1h' starts with a dash, so it is read as an option instead of a value. "
            "--ttl expects validity: 30m, 24h, 7d, at most 30d. Durations and counts are positive, so write --ttl 1h.",
        ),
        (
            ["--timeout", "-5s", "devices", "list"],
            "--timeout expects seconds to wait for each request, above 0. "
            "Durations and counts are positive, so drop the minus sign.",
        ),
        (["deploy", "--model", "m", "--device", "d", "--wait", "-1e1"], "so write --wait 1e1."),
        (["metrics", "query", "--sin", "-5m"], "argument --since: '-5m' starts with a dash"),
        (["devices", "list", "--label", "a=b", "--label", "-x"], "argument --label: '-x' starts with a dash"),
        (
            ["models", "add", "m.onnx", "--name", "-m", "--version", "1"],
            "--name expects model name in the catalog: 1 to 128 ASCII letters, digits, '.', '_' or '-', starting "
            "with a letter or digit. To pass a value that starts with a dash, write --name=-m.",
        ),
        (["devices", "list", "-o", "-x"], "argument --output: '-x' starts with a dash"),
        (["devices", "list", "-o", "-x"], "--output expects one of: table, json."),
        (["metrics", "query", "--since"], "argument --since: missing value at the end of the command; --since expects"),
        (["metrics", "query", "--since", "--model", "m"], "argument --since: missing value before --model;"),
    ],
)
def test_flag_value_with_dash(capsys: Capture, argv: list[str], expected: str) -> None:
    error = usage_error(capsys, argv)

    assert expected in error
    assert "expected one argument" not in error


def value_flags(parser: argparse.ArgumentParser, command: list[str]) -> Iterator[tuple[list[str], str]]:
    """Yield the command words and the longest option string of every flag that takes one value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from value_flags(subparser, [*command, name])
        elif action.option_strings and action.nargs is None:
            yield command, max(action.option_strings, key=len)


def test_every_value_flag_explains_dash(capsys: Capture) -> None:
    """Each flag of the CLI that takes a value explains a value that starts with a dash, not argparse's message."""
    flags = list(value_flags(build_parser(), []))
    assert len(flags) > 50
    for command, flag in flags:
        error = usage_error(capsys, [*command, flag, "-5x"])

        assert f"argument {flag}: '-5x' starts with a dash" in error, (command, flag)
        assert f"{flag} expects " in error, (command, flag)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range; give the orchestrator's operator port"),
        ("127.0.0.1:0", "port 0 is out of range"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("::1:50052", "put an IPv6 address in brackets"),
    ],
)
def test_orchestrator_address_invalid(capsys: Capture, address: str, expected: str) -> None:
    error = usage_error(capsys, ["--orchestrator", address, "devices", "list"])

    assert f"argument --orchestrator: invalid value {address!r}: {expected}" in error
    assert "set --orchestrator or EDGEFLEET_ORCHESTRATOR" in error
    assert "cannot reach" not in error


def test_orchestrator_address_from_env(capsys: Capture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_ORCHESTRATOR", "127.0.0.1:99999")

    code = main(["devices", "list"])

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "EDGEFLEET_ORCHESTRATOR: invalid value '127.0.0.1:99999': port 99999 is out of range" in error
    assert "cannot reach" not in error


def test_orchestrator_env_flag_wins(orchestrator: OrchestratorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_ORCHESTRATOR", "127.0.0.1:99999")

    assert cli(orchestrator, "devices", "list") == 0


def test_orchestrator_env_ignored_offline(capsys: Capture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Commands that do not connect work while EDGEFLEET_ORCHESTRATOR is invalid."""
    monkeypatch.setenv("EDGEFLEET_ORCHESTRATOR", "127.0.0.1")

    completion = main(["completion", "bash"])
    pki = main(["pki", "init", "--dir", str(tmp_path / "pki"), "--host", "orchestrator.example.internal"])

    assert completion == 0
    assert pki == 0
    assert (tmp_path / "pki").is_dir()


@pytest.mark.parametrize("address", ["orchestrator.example.internal:50052", "[::1]:50052", "127.0.0.1:1"])
def test_orchestrator_address_valid(address: str) -> None:
    assert orchestrator_address(address) == address
