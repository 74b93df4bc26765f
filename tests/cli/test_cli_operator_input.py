"""Bad input that an operator can give the CLI, run against real orchestrators, in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.cli import rollout
from edgefleet.cli.main import EXIT_USAGE, MAX_PLOT_BUCKET_S, main
from edgefleet.orchestrator.handlers import metrics as metrics_handlers
from edgefleet.orchestrator.handlers import rollouts as rollout_handlers
from tests.security.helpers import SecureOrchestrator, make_pki
from tests.servers import OrchestratorThread, linear_onnx, register, upload

pytest_plugins = ["tests.servers", "tests.security.helpers"]

Capture = pytest.CaptureFixture[str]
StartSecure = Callable[..., SecureOrchestrator]


def cli(orchestrator: OrchestratorThread, *args: str) -> int:
    return main(["--insecure", "--orchestrator", orchestrator.address, *args])


def usage_error(capsys: Capture, argv: list[str]) -> str:
    """Run the CLI with argv, which argparse must reject, and return its stderr."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == EXIT_USAGE
    return capsys.readouterr().err


@pytest.fixture
def fleet(orchestrator: OrchestratorThread, capsys: Capture) -> OrchestratorThread:
    """Return an orchestrator with model linear:1 and device edge-01."""
    upload(orchestrator, linear_onnx(), "linear", "1")
    register(orchestrator.agent, "edge-01")
    capsys.readouterr()
    return orchestrator


def variant_ids(fleet: OrchestratorThread, capsys: Capture) -> list[str]:
    assert cli(fleet, "models", "variants", "linear:1", "-o", "json") == 0
    return sorted(v["variant_id"] for v in json.loads(capsys.readouterr().out))


ROLLOUT = ["rollout", "create", "--model", "linear:1", "--budget-ms", "100"]


@pytest.mark.parametrize("waves", ["99999999999", "0,100", "50,101"])
def test_rollout_waves_out_of_range(fleet: OrchestratorThread, capsys: Capture, waves: str) -> None:
    code = cli(fleet, *ROLLOUT, "--waves", waves)

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"invalid --waves {waves!r}" in error
    assert "1 to 100 percent" in error


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--waves", "50,10,100"], "invalid --waves: wave percents [50, 10, 100] must rise"),
        (["--budget-ms", "0"], "invalid --budget-ms: 0 must be above 0"),
        (["--max-error-rate", "101"], "invalid --max-error-rate: 101 is over 100"),
        (["--max-p95-regression", "nan"], "invalid --max-p95-regression: nan"),
    ],
)
def test_rollout_create_flag_names(fleet: OrchestratorThread, capsys: Capture, flags: list[str], expected: str) -> None:
    code = cli(fleet, *ROLLOUT, *flags)

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert expected in error
    assert "_pct" not in error
    assert "wave_percents" not in error
    assert "budget_ms" not in error


def test_rollout_create_help_limits(capsys: Capture) -> None:
    with pytest.raises(SystemExit):
        main(["rollout", "create", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "at most 3600000" in help_text
    assert "rise from 1 to 100 and end at 100" in help_text


def test_rollout_budget_limit_match() -> None:
    assert rollout.MAX_BUDGET_MS == rollout_handlers.MAX_BUDGET_MS


@pytest.mark.parametrize("bucket", ["25h", "99999999999999h", "0", "1d"])
def test_plot_bucket_invalid(fleet: OrchestratorThread, capsys: Capture, tmp_path: Path, bucket: str) -> None:
    code = cli(fleet, "metrics", "plot", "--model", "linear", "--bucket", bucket, "--out", str(tmp_path / "p.png"))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"invalid --bucket {bucket!r}" in error
    assert "24h (86400 s)" in error
    assert "bucket_seconds" not in error
    assert not (tmp_path / "p.png").exists()


def test_plot_bucket_limit_match() -> None:
    assert MAX_PLOT_BUCKET_S == metrics_handlers.MAX_WINDOW_SECONDS * 24


def test_query_group_by_flag_name(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "query", "--group-by", "device,bogus")

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "invalid --group-by: unknown key 'bogus'" in error
    assert "group_by" not in error


def test_query_group_by_repeated(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "query", "--group-by", "device,model,device")

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "invalid --group-by 'device,model,device': device is given more than once" in error


def test_query_group_by_flags_add_up(fleet: OrchestratorThread, capsys: Capture) -> None:
    # Each flag counts: the first one's unknown key is not dropped for the second.
    code = cli(fleet, "metrics", "query", "--group-by", "bogus", "--group-by", "device")

    assert code == EXIT_USAGE
    assert "invalid --group-by: unknown key 'bogus'" in capsys.readouterr().err

    code = cli(fleet, "metrics", "query", "--group-by", "device", "--group-by", "model,device")

    assert code == EXIT_USAGE
    assert "invalid --group-by 'device,model,device': device is given more than once" in capsys.readouterr().err


def test_query_group_by_spaces(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "query", "--group-by", "device, model", "-o", "json")

    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out) == []


def test_recipe_not_utf8(fleet: OrchestratorThread, capsys: Capture, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(b"\xff\xfe[gate]\n")

    code = cli(fleet, "models", "compress", "linear:1", "--recipe", str(recipe))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"invalid recipe file {recipe}: it is not UTF-8 text" in error


def test_recipe_directory(fleet: OrchestratorThread, capsys: Capture, tmp_path: Path) -> None:
    code = cli(fleet, "models", "compress", "linear:1", "--recipe", str(tmp_path))

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"recipe file {tmp_path} is a directory" in error
    assert "not found" not in error


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "1e400", "101"])
def test_models_add_accuracy_drop_invalid(
    fleet: OrchestratorThread, capsys: Capture, tmp_path: Path, value: str
) -> None:
    model = tmp_path / "int8.onnx"
    model.write_bytes(linear_onnx(seed=1))
    argv = ["--insecure", "--orchestrator", fleet.address, "models", "add", str(model), "--name", "linear"]
    argv += ["--version", "1", "--variant-kind", "int8", "--evaluation", "digits", "--max-accuracy-drop", value]

    error = usage_error(capsys, argv)

    assert f"argument --max-accuracy-drop: invalid value {value!r}" in error
    assert "percentage points from 0 to 100" in error
    assert variant_ids(fleet, capsys) == ["linear:1:source"]


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_compress_accuracy_drop_invalid(capsys: Capture, value: str) -> None:
    argv = ["models", "compress", "linear:1", "--gate", "linear:1:int8", "--evaluation", "digits"]

    error = usage_error(capsys, [*argv, "--max-accuracy-drop", value])

    assert f"argument --max-accuracy-drop: invalid value {value!r}" in error


def test_models_add_gate_rejected(fleet: OrchestratorThread, capsys: Capture, tmp_path: Path) -> None:
    """A gate job that the orchestrator rejects after the upload leaves the variant pending, and the error names it."""
    model = tmp_path / "int8.onnx"
    model.write_bytes(linear_onnx(seed=1))
    missing = tmp_path / "no-such-folder"

    code = cli(
        fleet,
        "models",
        "add",
        str(model),
        "--name",
        "linear",
        "--version",
        "1",
        "--variant-kind",
        "int8",
        "--evaluation",
        str(missing),
    )

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert str(missing) in error
    assert "linear:1:int8 stays stored as pending" in error
    assert "edgefleet models compress linear:1 --gate linear:1:int8 --evaluation SOURCE" in error
    assert variant_ids(fleet, capsys) == ["linear:1:int8", "linear:1:source"]


@pytest.mark.parametrize("verb", ["show", "cancel", "wait"])
def test_jobs_empty_id(orchestrator: OrchestratorThread, capsys: Capture, verb: str) -> None:
    code = cli(orchestrator, "jobs", verb, "")

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "invalid job_id: missing; pass a job id" in error
    assert "device id" not in error


def test_tls_error_without_grpc_log(start_secure: StartSecure, tmp_path: Path) -> None:
    """gRPC's C core logs a failed handshake at INFO, but the CLI's stderr contains only its own error line."""
    orchestrator = start_secure()
    other = make_pki(tmp_path / "other-ca")
    environment = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
    command = [sys.executable, "-m", "edgefleet.cli.main", "--orchestrator", orchestrator.operator_address]
    command += ["--ca-cert", str(other.ca), "--token", orchestrator.admin_token, "devices", "list"]

    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)

    assert result.returncode == EXIT_USAGE
    assert "did not verify" in result.stderr
    assert "ssl_transport_security" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_demo_work_dir_file(tmp_path: Path, capsys: Capture) -> None:
    work = tmp_path / "work"
    work.write_text("not a directory\n")

    code = main(["demo", "--work-dir", str(work), "--duration", "1"])

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"invalid --work-dir {work}: it exists and is not a directory" in error
    assert work.read_text() == "not a directory\n"


def test_demo_report_directory(tmp_path: Path, capsys: Capture) -> None:
    code = main(["demo", "--report", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--duration", "1"])

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"invalid --report {tmp_path}: it is a directory" in error
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "give one of devices, models, jobs, rollout"),
        (["devices"], "give one of list, show, revoke, remove (`edgefleet devices --help` describes each)"),
        (["keys"], "give one of list, rotate, retire"),
    ],
)
def test_missing_command(capsys: Capture, argv: list[str], expected: str) -> None:
    error = usage_error(capsys, argv)

    assert f"missing command: {expected}" in error
    assert "required: noun" not in error
    assert "required: verb" not in error


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["models", "add"], "ONNX or TFLite model file, up to the orchestrator's --max-upload-bytes"),
        (["models", "add"], "model name in the catalog: 1 to 128 ASCII letters"),
        (["tokens", "create"], "who or what uses the token: 1 to 64 ASCII letters, digits, '.', '_', '@' or '-'"),
        (["enroll", "create"], "enroll as (the id in its certificate): 1 to 63 characters of a-z"),
        (["metrics", "plot"], "at most 24h"),
        (["models", "compress"], "percentage points from 0 to 100"),
    ],
)
def test_help_names_limits(capsys: Capture, command: list[str], expected: str) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])

    assert expected in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["devices", "list", "--label", "SITE=plant-1"], "invalid --label 'SITE=plant-1': label key 'SITE'"),
        (["devices", "list", "--label", "=x"], "invalid --label '=x': label key ''"),
        ([*ROLLOUT, "--target", "Site=plant-1"], "invalid --target 'Site=plant-1': label key 'Site'"),
    ],
)
def test_label_key_invalid(fleet: OrchestratorThread, capsys: Capture, argv: list[str], expected: str) -> None:
    code = cli(fleet, *argv)

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert expected in error
    assert "keys must be 1-63 characters" in error
    assert "label_selector" not in error
    assert "target_labels" not in error
