"""edgefleet models compress and edgefleet jobs against a real orchestrator whose jobs run in worker processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.cli.main import main
from edgefleet.v1 import operator_pb2
from tests.orchestrator.test_jobs import tiny_conv_onnx
from tests.servers import OrchestratorThread, orchestrator_config, upload

REPO = Path(__file__).resolve().parents[1]
FAST = ["--int8", "--calibration", "demo-photos", "--calibration-size", "4", "--max-accuracy-drop", "100"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorThread]:
    """A real orchestrator on SQLite with the tiny classifier uploaded as tiny:1."""
    orchestrator = OrchestratorThread(orchestrator_config(tmp_path_factory.mktemp("cli")))
    upload(orchestrator, tiny_conv_onnx(), "tiny", "1")
    yield orchestrator
    orchestrator.stop()


def run_cli(server: OrchestratorThread, *args: str) -> int:
    return main(["--orchestrator", server.address, "--insecure", *args])


@pytest.fixture(scope="module")
def compressed(server: OrchestratorThread) -> dict[str, Any]:
    """The JSON result of one `models compress` run with the shortcut flags, and its exit status."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_cli(server, "models", "compress", "tiny:1", *FAST, "--output", "json")
    return {"code": code, **json.loads(out.getvalue())}


def test_compress_exit(compressed: dict[str, Any]) -> None:
    assert compressed["code"] == 0


def test_compress_job_succeeded(compressed: dict[str, Any]) -> None:
    assert compressed["job"]["state"] == "succeeded"


def test_compress_variant_accepted(compressed: dict[str, Any]) -> None:
    assert [(v["kind"], v["status"]) for v in compressed["variants"]] == [("int8", "accepted")]


def test_compress_recipe_from_flags(compressed: dict[str, Any]) -> None:
    recipe = compressed["job"]["recipe"]
    assert recipe["quantize"]["calibration"] == {"images": "builtin:demo-photos"}
    assert recipe["gate"]["max_accuracy_drop"] == 100.0


def test_variants_table(
    server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run_cli(server, "models", "variants", "tiny")
    line = next(
        x for x in capsys.readouterr().out.splitlines() if x.startswith(compressed["variants"][0]["variant_id"])
    )
    assert all(part in line for part in ("int8", "accepted", "threads=1:", "threads=2:"))


def test_variants_json_speedup(
    server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The gate's own timing of the source shows beside the variant's, as a speed-up per thread count."""
    capsys.readouterr()
    run_cli(server, "models", "variants", "tiny", "--output", "json")
    variant_id = compressed["variants"][0]["variant_id"]
    variant = next(v for v in json.loads(capsys.readouterr().out) if v["variant_id"] == variant_id)

    assert sorted(variant["source_latency_ms"]) == ["threads=1", "threads=2"]
    assert sorted(variant["speedup"]) == ["threads=1", "threads=2"]
    for key, speedup in variant["speedup"].items():
        assert speedup == pytest.approx(variant["source_latency_ms"][key] / variant["latency_ms"][key])
    assert variant["slower_than_source"] == any(s < 1.0 for s in variant["speedup"].values())


def test_variants_json_evaluation_samples(
    server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run_cli(server, "models", "variants", "tiny", "--output", "json")
    listed = {v["variant_id"]: v for v in json.loads(capsys.readouterr().out)}

    assert listed[compressed["variants"][0]["variant_id"]]["evaluation_samples"] == 100
    assert listed["tiny:1:source"]["evaluation_samples"] is None


def test_variants_table_speedup(
    server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run_cli(server, "models", "variants", "tiny")
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.startswith(compressed["variants"][0]["variant_id"]))

    assert "SPEEDUP" in lines[0]
    assert "SAMPLES" in lines[0]
    assert re.search(r"threads=1:\d+\.\d\dx threads=2:\d+\.\d\dx", line)


def test_variants_table_names_metric(
    server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Agreement with the source and top-1 against labels are different figures, so each row names its own."""
    capsys.readouterr()
    run_cli(server, "models", "variants", "tiny")
    line = next(
        x for x in capsys.readouterr().out.splitlines() if x.startswith(compressed["variants"][0]["variant_id"])
    )

    assert re.search(r" agree [01]\.\d{4} ", line)


def test_variants_table_flags_slower() -> None:
    from edgefleet.cli import views
    from edgefleet.cli.main import render_variants

    variant = operator_pb2.Variant(
        variant_id="tiny:1:int8-x",
        kind="int8",
        status="accepted",
        latency_ms={"threads=1": 2.0, "threads=2": 1.0},
        source_latency_ms={"threads=1": 3.0, "threads=2": 1.25},
    )
    faster = render_variants([views.variant_view(variant)])
    variant.source_latency_ms["threads=2"] = 0.5
    slower = render_variants([views.variant_view(variant)])

    assert "threads=1:1.50x threads=2:1.25x" in faster
    assert "SLOWER" not in faster
    assert "threads=1:1.50x threads=2:0.50x SLOWER" in slower


def test_variants_json_without_source_timing() -> None:
    """A variant gated before the source's p50 was kept shows no speed-up rather than an assumed one."""
    from edgefleet.cli import views

    view = views.variant_view(operator_pb2.Variant(variant_id="v", latency_ms={"threads=1": 2.0}))

    assert view["speedup"] == {}
    assert view["slower_than_source"] is None


def test_jobs_list_json(
    server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run_cli(server, "jobs", "list", "--output", "json")
    listed = json.loads(capsys.readouterr().out)
    assert compressed["job"]["job_id"] in [j["job_id"] for j in listed]


def test_jobs_time_format(
    server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    run_cli(server, "jobs", "list", "--output", "json")
    job = json.loads(capsys.readouterr().out)[0]
    run_cli(server, "models", "list", "--output", "json")
    model = json.loads(capsys.readouterr().out)[0]

    # Jobs print times as models, devices and rollouts do: UTC to the second, with +00:00.
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
    assert re.fullmatch(pattern, job["created_at"])
    assert re.fullmatch(pattern, job["updated_at"])
    assert re.fullmatch(pattern, model["created_at"])


def test_jobs_show(server: OrchestratorThread, compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    run_cli(server, "jobs", "show", compressed["job"]["job_id"])
    out = capsys.readouterr().out
    variant = compressed["variants"][0]

    assert "succeeded" in out
    # The gate's figures come with the job, as models compress and jobs wait print them.
    assert "SAMPLES" in out
    assert "SPEEDUP" in out
    assert variant["variant_id"] in out.split("VARIANT", 1)[1]

    run_cli(server, "jobs", "show", compressed["job"]["job_id"], "--output", "json")
    shown = json.loads(capsys.readouterr().out)
    assert [v["variant_id"] for v in shown["variants"]] == [variant["variant_id"]]
    assert shown["variants"][0]["evaluation_samples"] == variant["evaluation_samples"]


def test_jobs_wait_finished(server: OrchestratorThread, compressed: dict[str, Any]) -> None:
    assert run_cli(server, "jobs", "wait", compressed["job"]["job_id"], "--output", "json") == 0


def test_jobs_cancel_finished(server: OrchestratorThread, compressed: dict[str, Any]) -> None:
    assert run_cli(server, "jobs", "cancel", compressed["job"]["job_id"]) == 4


def test_jobs_show_unknown(server: OrchestratorThread) -> None:
    assert run_cli(server, "jobs", "show", "0123456789ab") == 3


def test_recipe_unknown_key(server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[quantize]\nmethod = "static"\nbits = 4\n[quantize.calibration]\nimages = "builtin:digits"\n')
    code = run_cli(server, "models", "compress", "tiny", "--recipe", str(recipe))
    assert code == 2
    assert "quantize.bits" in capsys.readouterr().err


def test_recipe_json_out_of_range(
    server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"quantize": {"calibration_size": -3, "calibration": {"images": "builtin:digits"}}}))
    code = run_cli(server, "models", "compress", "tiny", "--recipe", str(recipe))
    assert code == 2
    assert "quantize.calibration_size" in capsys.readouterr().err


def test_missing_folder(server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(server, "models", "compress", "tiny", "--int8", "--calibration", str(tmp_path / "nope"))
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_compress_fine_tune_too_few(server: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    """4 calibration samples are too few to fine-tune on, which the request finds before any job runs."""
    code = run_cli(server, "models", "compress", "tiny:1", *FAST, "--fine-tune-steps", "10", "--output", "json")
    captured = capsys.readouterr()

    assert code == 2
    assert "calibration_size = 4, but fine_tune_steps needs at least 36 calibration samples" in captured.err
    assert captured.out == ""


def undecodable_evaluation(tmp_path: Path) -> list[str]:
    """Return --evaluation flags naming a folder whose only image the request accepts and the job cannot decode."""
    from tests.orchestrator.test_jobs import truncated_png

    folder = tmp_path / "evaluation"
    folder.mkdir()
    (folder / "broken.png").write_bytes(truncated_png())
    return ["--evaluation", str(folder)]


def test_failed_job_error_printed_once(
    server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(server, "models", "compress", "tiny:1", *FAST, *undecodable_evaluation(tmp_path), "--quiet")
    captured = capsys.readouterr()

    assert code == 1
    assert re.fullmatch(r"job \w+ failed: .*broken\.png.*\n", captured.out), captured.out
    assert re.search(r"edgefleet: job \w+ failed\n", captured.err), captured.err
    assert "broken.png" not in captured.err


def test_jobs_list_marks_cut_errors(
    server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(server, "models", "compress", "tiny:1", *FAST, *undecodable_evaluation(tmp_path), "--quiet")
    capsys.readouterr()

    run_cli(server, "jobs", "list")

    failed = [line for line in capsys.readouterr().out.splitlines() if " failed " in line]
    assert failed and all("gate.evaluation.images: " in line and "... " in line for line in failed), failed


def test_jobs_cancel_twice(server: OrchestratorThread, capsys: pytest.CaptureFixture[str]) -> None:
    """A repeated cancel of a cancelled job succeeds, so a retrying script does not fail."""
    run_cli(server, "models", "compress", "tiny:1", *FAST, "--no-wait", "--output", "json")
    job_id = json.loads(capsys.readouterr().out)["job_id"]
    assert run_cli(server, "jobs", "cancel", job_id) == 0
    capsys.readouterr()

    code = run_cli(server, "jobs", "cancel", job_id)

    assert code == 0
    assert f"job {job_id} already cancelled" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--int8", "--calibration", "demo-photos"], "--int8, --calibration would make an int8 variant"),
        (["--int8"], "--int8 would make"),
    ],
)
def test_gate_with_int8_flags(
    server: OrchestratorThread, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    code = run_cli(server, "models", "compress", "tiny:1", "--gate", "tiny:1:pruned", "--evaluation", "digits", *flags)

    error = capsys.readouterr().err
    assert code == 2
    assert named in error
    assert "[quantize] section" not in error


def test_recipe_relative_paths(
    server: OrchestratorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data paths in a recipe file are relative to the file's folder, not to the working directory."""
    from PIL import Image

    from edgefleet.demo.images import demo_photos

    folder = tmp_path / "recipes"
    for name, photo in (("photos", demo_photos()[0]), ("photos-eval", demo_photos()[1])):
        (folder / name).mkdir(parents=True)
        Image.fromarray(photo.image).save(folder / name / f"{photo.name}.png")
    recipe = folder / "recipe.toml"
    recipe.write_text(
        '[quantize]\ncalibration_size = 1\n[quantize.calibration]\nimages = "photos/"\n'
        '[gate]\nmax_accuracy_drop = 100.0\n[gate.evaluation]\nimages = "photos-eval"\n'
    )
    monkeypatch.chdir(tmp_path)

    code = run_cli(server, "models", "compress", "tiny:1", "--recipe", str(recipe), "--output", "json")

    result = json.loads(capsys.readouterr().out)
    assert code == 0, result["job"]["error"]
    assert result["job"]["recipe"]["quantize"]["calibration"]["images"] == str(folder / "photos")
    assert result["job"]["recipe"]["gate"]["evaluation"]["images"] == str(folder / "photos-eval")


def test_add_pruned_gated(server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`models add --evaluation` uploads a pruned variant and gates it in a job before it can be deployed."""
    model = tmp_path / "pruned.onnx"
    model.write_bytes(tiny_conv_onnx(seed=4))
    flags = ["--name", "tiny", "--version", "1", "--variant-kind", "pruned", "--quiet"]
    gate = ["--evaluation", "demo-photos", "--max-accuracy-drop", "100", "--output", "json"]

    code = run_cli(server, "models", "add", str(model), *flags, *gate)

    result = json.loads(capsys.readouterr().out)
    assert code == 0, result["job"]["error"]
    assert result["job"]["recipe"]["gate"]["variant"] == "tiny:1:pruned"
    assert [(v["variant_id"], v["status"]) for v in result["variants"]] == [("tiny:1:pruned", "accepted")]
    assert result["variants"][0]["accuracy"] is not None


def test_add_gated_quiet(server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`models add --quiet --evaluation` prints neither the pending notice nor the gate job's progress."""
    upload(server, tiny_conv_onnx(seed=5), "tiny", "quiet")
    model = tmp_path / "pruned.onnx"
    model.write_bytes(tiny_conv_onnx(seed=6))
    flags = ["--name", "tiny", "--version", "quiet", "--variant-kind", "pruned", "--quiet"]

    code = run_cli(
        server, "models", "add", str(model), *flags, "--evaluation", "demo-photos", "--max-accuracy-drop", "100"
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == "edgefleet: warning: talking to the orchestrator without TLS (--insecure)\n"
    assert re.match(r"job \w+ succeeded", captured.out), captured.out
    assert "tiny:quiet:pruned" in captured.out


def test_add_distilled_pending(server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "distilled.onnx"
    model.write_bytes(tiny_conv_onnx(seed=5))

    code = run_cli(
        server,
        "models",
        "add",
        str(model),
        "--name",
        "tiny",
        "--version",
        "1",
        "--variant-kind",
        "distilled",
        "--quiet",
        "--output",
        "json",
    )

    variants = {v["variant_id"]: v for v in json.loads(capsys.readouterr().out)["variants"]}
    assert code == 0
    assert variants["tiny:1:distilled"]["status"] == "pending"
    assert "--gate tiny:1:distilled" in variants["tiny:1:distilled"]["rejection_reason"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--variant-kind", "onnx-fp32", "--evaluation", "demo-photos"], "not to onnx-fp32"),
        (["--evaluation", "demo-photos"], "not to a new version"),
        (["--variant-kind", "pruned", "--max-accuracy-drop", "2"], "--max-accuracy-drop given without --evaluation"),
    ],
    ids=["int8", "new-version", "no-evaluation"],
)
def test_add_gate_flags_invalid(
    server: OrchestratorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    model = tmp_path / "variant.onnx"
    model.write_bytes(tiny_conv_onnx(seed=6))

    code = run_cli(server, "models", "add", str(model), "--name", "tiny", "--version", "9", *flags)

    assert code == 2
    assert expected in capsys.readouterr().err
    versions = [m.version for m in server.operator.ListModels(operator_pb2.ListModelsRequest(), timeout=30).models]
    assert "9" not in versions


def test_gated_kinds_match() -> None:
    from edgefleet.cli.main import GATED_UPLOAD_KINDS as CLI_KINDS
    from edgefleet.orchestrator.handlers.catalog import GATED_UPLOAD_KINDS

    assert CLI_KINDS == GATED_UPLOAD_KINDS


def compress_in_pipe(server: OrchestratorThread, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run `edgefleet models compress` as a process whose stdout and stderr are pipes, as in a script."""
    command = [sys.executable, "-m", "edgefleet.cli.main", "--orchestrator", server.address, "--insecure"]
    return subprocess.run(
        [*command, "models", "compress", "tiny:1", *FAST, *flags],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_compress_progress_in_pipe(server: OrchestratorThread) -> None:
    """Without a terminal the progress is one plain line per stage on stderr, and the result goes to stdout."""
    result = compress_in_pipe(server)

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("edgefleet: warning:")]
    assert lines[0].startswith("started compression job ")
    job_id = lines[0].split()[3]
    assert len(lines) > 1
    assert all(line.startswith(f"{job_id} [") for line in lines[1:]), lines
    assert "\r" not in result.stderr
    assert lines[-1].endswith("succeeded: done"), lines
    assert result.stdout.startswith(f"job {job_id} succeeded")
    assert "accepted" in result.stdout


def test_compress_quiet(server: OrchestratorThread) -> None:
    """--quiet leaves only the --insecure warning on stderr, and the result on stdout."""
    result = compress_in_pipe(server, "--quiet")

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["edgefleet: warning: talking to the orchestrator without TLS (--insecure)"]
    assert re.match(r"job \w+ succeeded", result.stdout), result.stdout
    assert "accepted" in result.stdout


def test_nothing_to_do(server: OrchestratorThread) -> None:
    assert run_cli(server, "models", "compress", "tiny") == 2


@pytest.mark.slow
def test_ctrl_c_detaches(server: OrchestratorThread) -> None:
    command = [
        sys.executable,
        "-c",
        # The console script's entry point; `python -m edgefleet.cli.main` would load the module twice.
        # Python keeps SIGINT ignored when it starts ignored (under `make test &`), so set the handler.
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from edgefleet.cli.main import main; sys.exit(main(sys.argv[1:]))",
        "--orchestrator",
        server.address,
        "--insecure",
        "models",
        "compress",
        "tiny",
        *FAST,
        # Fine-tuning keeps the job running for seconds, so Ctrl-C lands while it runs, also under load.
        "--calibration-size",
        "40",
        "--fine-tune-steps",
        "200",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    first = process.stderr.readline()  # "started compression job ID for tiny:1"
    while first.startswith("edgefleet: warning:"):  # --insecure warns first.
        first = process.stderr.readline()
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=30)

    # The job keeps running on the orchestrator after the CLI detached.
    job_id = first.split()[3]
    deadline = time.monotonic() + 120
    while True:
        job = server.operator.GetCompressionJob(operator_pb2.GetCompressionJobRequest(job_id=job_id), timeout=30)
        if (
            job.state in (operator_pb2.JOB_STATE_SUCCEEDED, operator_pb2.JOB_STATE_FAILED)
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.3)

    assert process.returncode == 130
    assert "detached" in rest
    assert job.state == operator_pb2.JOB_STATE_SUCCEEDED


def test_cancelled_job_line_names_the_state_once() -> None:
    from edgefleet.cli.compress import render_result

    job = {"job_id": "a1", "state": "cancelled", "error": "", "stage": "cancelled"}

    assert render_result({"job": job, "variants": []}) == "job a1 cancelled"


def test_jobs_list_error_on_one_line() -> None:
    from edgefleet.cli.compress import render_jobs

    job = {
        "job_id": "a1",
        "model": "tiny",
        "version": "1",
        "state": "failed",
        "progress": 0.5,
        "error": "[ONNXRuntimeError] : 1 : FAIL : Load model failed:\nNode (conv) Op (Conv) mismatch",
        "stage": "quantizing",
        "variant_ids": [],
        "created_at": "2026-12-05T17:00:00Z",
    }

    lines = render_jobs([job]).splitlines()

    assert len(lines) == 2, lines
    assert "Load model failed: Node (..." in lines[1]
