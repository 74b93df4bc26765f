"""Input checks of `edgefleet metrics query` and `metrics plot`, run in-process against a real orchestrator."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.cli.main import EXIT_NOT_FOUND, EXIT_USAGE, main, parse_time
from edgefleet.common.serde import timestamp
from edgefleet.common.sketch import LatencySketch
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.servers import OrchestratorThread, linear_onnx, register, upload

pytest_plugins = ["tests.servers"]

Capture = pytest.CaptureFixture[str]
SetZone = Callable[[str], None]


def cli(orchestrator: OrchestratorThread, *args: str) -> int:
    return main(["--insecure", "--orchestrator", orchestrator.address, *args])


@pytest.fixture
def fleet(orchestrator: OrchestratorThread, capsys: Capture) -> OrchestratorThread:
    """Return an orchestrator with model linear:1, device edge-01 and one metric window of linear:1 from it."""
    upload(orchestrator, linear_onnx(), "linear", "1")
    variant_id = (
        orchestrator.operator.ListVariants(
            operator_pb2.ListVariantsRequest(model_name="linear", model_version="1"), timeout=30
        )
        .variants[0]
        .variant_id
    )
    register(orchestrator.agent, "edge-01")
    sketch = LatencySketch()
    for _ in range(10):
        sketch.add(2.0)
    window = common_pb2.MetricWindow(
        model_name="linear",
        model_version="1",
        variant_id=variant_id,
        window_start=timestamp(datetime.now(UTC) - timedelta(seconds=30)),
        window_seconds=10,
        inference_count=10,
        latency=sketch.to_proto(),
    )
    request = agent_pb2.UploadMetricsRequest(device_id="edge-01", batch_id="batch-1", windows=[window])
    orchestrator.agent.UploadMetrics(request, timeout=30)
    capsys.readouterr()
    return orchestrator


def query_error(fleet: OrchestratorThread, capsys: Capture, *args: str) -> tuple[int, str]:
    """Run `metrics query` with args and return its exit status and stderr."""
    code = cli(fleet, "metrics", "query", *args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["99999999d", "1" + "0" * 400 + "s", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_parse_time_out_of_range(fleet: OrchestratorThread, capsys: Capture, value: str) -> None:
    for flag in ("--since", "--until"):
        code, error = query_error(fleet, capsys, flag, value)

        assert code == EXIT_USAGE
        assert f"invalid time {value!r}" in error
        assert "ISO 8601" in error
        assert "1970-01-01 to 9999-01-01" in error


def test_plot_since_out_of_range(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "plot", "--model", "linear", "--since", "99999999d")

    assert code == EXIT_USAGE
    assert "invalid time '99999999d'" in capsys.readouterr().err


# Central European Time in POSIX TZ form, which libc reads without the time zone database.
BERLIN_TZ = "CET-1CEST,M3.5.0,M10.5.0/3"


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[SetZone]:
    """Return a function that sets this process's local time zone (TZ); the old zone is back afterwards."""

    def set_zone(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_parse_time_naive_is_local(local_zone: SetZone) -> None:
    local_zone(BERLIN_TZ)

    assert parse_time("2026-12-04T10:00:00") == datetime(2026, 12, 4, 9, tzinfo=UTC)
    assert parse_time("2026-07-04T10:00") == datetime(2026, 7, 4, 8, tzinfo=UTC)


def test_parse_time_zone_given(local_zone: SetZone) -> None:
    local_zone(BERLIN_TZ)

    assert parse_time("2026-12-04T10:00:00Z") == datetime(2026, 12, 4, 10, tzinfo=UTC)
    assert parse_time("2026-12-04T10:00:00+03:00") == datetime(2026, 12, 4, 7, tzinfo=UTC)
    assert parse_time("2026-12-04T10:00:00").tzinfo == UTC


def test_query_naive_since_local(fleet: OrchestratorThread, capsys: Capture, local_zone: SetZone) -> None:
    local_zone(BERLIN_TZ)
    # What `date -d '-5 min' +%Y-%m-%dT%H:%M` prints: local time without a zone.
    since = (datetime.now() - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M")

    code = cli(fleet, "metrics", "query", "--since", since, "-o", "json")

    assert code == 0
    assert [row["inferences"] for row in json.loads(capsys.readouterr().out)] == [10]


def test_query_since_future_naive(fleet: OrchestratorThread, capsys: Capture, local_zone: SetZone) -> None:
    local_zone("XYZ-2")  # UTC+02:00 all year.
    since = datetime.now(UTC) + timedelta(hours=1)
    value = since.astimezone().strftime("%Y-%m-%dT%H:%M")

    code, error = query_error(fleet, capsys, "--since", value)

    assert code == EXIT_USAGE
    assert f"invalid --since {value!r}: it is {since:%Y-%m-%dT%H:%M}:00Z" in error
    assert "after the current time 20" in error
    assert "local time on this machine (XYZ, UTC+0200)" in error


def test_query_since_future_utc(fleet: OrchestratorThread, capsys: Capture) -> None:
    value = f"{datetime.now(UTC) + timedelta(minutes=10):%Y-%m-%dT%H:%M:%S}Z"

    code, error = query_error(fleet, capsys, "--since", value)

    assert code == EXIT_USAGE
    assert f"invalid --since {value!r}: it is {value}, after the current time " in error
    assert "local time" not in error


def test_query_since_within_tolerance(fleet: OrchestratorThread, capsys: Capture) -> None:
    value = f"{datetime.now(UTC) + timedelta(seconds=20):%Y-%m-%dT%H:%M:%S}Z"

    code = cli(fleet, "metrics", "query", "--since", value, "-o", "json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == []


def test_plot_since_future(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    value = f"{datetime.now(UTC) + timedelta(hours=2):%Y-%m-%dT%H:%M:%S}Z"

    code = cli(fleet, "metrics", "plot", "--model", "linear", "--since", value, "--out", str(out_dir / "p.png"))

    assert code == EXIT_USAGE
    assert f"invalid --since {value!r}" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []


def test_query_time_help(capsys: Capture) -> None:
    with pytest.raises(SystemExit):
        main(["metrics", "query", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "in this machine's time zone unless it ends in Z or an offset" in help_text
    assert "no more than 60 s after now" in help_text


def test_until_far_future(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "query", "--until", "9998-12-31T23:59:59Z", "-o", "json")

    assert code == 0
    assert [row["inferences"] for row in json.loads(capsys.readouterr().out)] == [10]


@pytest.mark.parametrize(
    ("field", "seconds"),
    [("end", 253402300799), ("end", 253402300799 * 4), ("start", -86400), ("start", -62135596800 - 1)],
)
def test_query_time_out_of_range(fleet: OrchestratorThread, field: str, seconds: int) -> None:
    request = operator_pb2.QueryMetricsRequest()
    getattr(request, field).CopyFrom(Timestamp(seconds=seconds))

    with pytest.raises(grpc.RpcError) as caught:
        fleet.operator.QueryMetrics(request, timeout=30)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"invalid {field}:")
    assert "9999-01-01" in caught.value.details()


def test_model_with_version(fleet: OrchestratorThread, capsys: Capture) -> None:
    code, error = query_error(fleet, capsys, "--model", "linear:1")

    assert code == EXIT_USAGE
    assert "invalid --model 'linear:1'" in error
    assert "--model linear" in error
    assert "--variant linear:1:KIND" in error


def test_model_name_rpc_with_version(fleet: OrchestratorThread) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        fleet.operator.QueryMetrics(operator_pb2.QueryMetricsRequest(model_name="linear:1"), timeout=30)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "variant_id" in caught.value.details()


@pytest.mark.parametrize(
    ("flag", "value", "noun", "suggestion"),
    [
        ("--device", "edge-02", "device", "edge-01"),
        ("--model", "lineer", "model", "linear"),
        ("--variant", "linear:1:sourse", "variant", "linear:1:source"),
    ],
)
def test_query_unknown(
    fleet: OrchestratorThread, capsys: Capture, flag: str, value: str, noun: str, suggestion: str
) -> None:
    code, error = query_error(fleet, capsys, flag, value)

    assert code == EXIT_NOT_FOUND
    assert f"{noun} {value!r} not found" in error
    assert f"did you mean {suggestion}" in error


def test_query_unknown_variant_lists(fleet: OrchestratorThread, capsys: Capture) -> None:
    code, error = query_error(fleet, capsys, "--variant", "linear:2:onnx")

    assert code == EXIT_NOT_FOUND
    assert "variant 'linear:2:onnx' not found; list them with `edgefleet models variants linear`" in error


# A removed device with stored windows, its id cut by one character, and a live device that shares
# only the "dev-" prefix with both.
REMOVED_ID = "dev-6cfbfb36dd7f"
TYPO_ID = "dev-6cfbfb36dd7"
LIVE_ID = "dev-cb5b1982288d"


@pytest.fixture
def removed_fleet(fleet: OrchestratorThread, capsys: Capture) -> OrchestratorThread:
    """Return the fleet with REMOVED_ID removed after uploading one window, and LIVE_ID registered."""
    register(fleet.agent, REMOVED_ID)
    variants = fleet.operator.ListVariants(operator_pb2.ListVariantsRequest(model_name="linear"), timeout=30)
    window = common_pb2.MetricWindow(
        model_name="linear",
        model_version="1",
        variant_id=variants.variants[0].variant_id,
        window_start=timestamp(datetime.now(UTC) - timedelta(seconds=30)),
        window_seconds=10,
        inference_count=3,
        latency=LatencySketch().to_proto(),
    )
    request = agent_pb2.UploadMetricsRequest(device_id=REMOVED_ID, batch_id="batch-removed", windows=[window])
    fleet.agent.UploadMetrics(request, timeout=30)
    assert cli(fleet, "devices", "remove", REMOVED_ID) == 0
    register(fleet.agent, LIVE_ID)
    capsys.readouterr()
    return fleet


def test_query_typo_suggests_removed(removed_fleet: OrchestratorThread, capsys: Capture) -> None:
    code, error = query_error(removed_fleet, capsys, "--device", TYPO_ID)

    assert code == EXIT_NOT_FOUND
    assert f"device {TYPO_ID!r} not found; did you mean {REMOVED_ID}?" in error
    assert LIVE_ID not in error


def test_remove_typo_no_unrelated(removed_fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(removed_fleet, "devices", "remove", TYPO_ID)

    error = capsys.readouterr().err
    assert code == EXIT_NOT_FOUND
    assert f"device {TYPO_ID!r} not found; list them with `edgefleet devices list`" in error
    assert LIVE_ID not in error


def test_show_typo_suggests_close(removed_fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(removed_fleet, "devices", "show", LIVE_ID[:-1])

    assert code == EXIT_NOT_FOUND
    assert f"did you mean {LIVE_ID}?" in capsys.readouterr().err


def test_plot_unknown_model(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "plot", "--model", "nosuch")

    assert code == EXIT_NOT_FOUND
    assert "model 'nosuch' not found" in capsys.readouterr().err


def test_query_known_empty(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "query", "--model", "linear", "--until", "2020-01-01T00:00:00Z", "-o", "json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == []


def test_query_known_model(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "query", "--model", "linear", "--device", "edge-01", "-o", "json")

    assert code == 0
    assert [row["inferences"] for row in json.loads(capsys.readouterr().out)] == [10]


def test_query_filter_help(capsys: Capture) -> None:
    with pytest.raises(SystemExit):
        main(["metrics", "query", "--help"])

    help_text = capsys.readouterr().out
    assert "only windows of this model name" in help_text
    assert "only windows of this variant (NAME:VERSION:KIND)" in help_text
    assert "hardware class" in help_text


def hardware_class_of(fleet: OrchestratorThread, capsys: Capture, device_id: str) -> str:
    assert cli(fleet, "devices", "show", device_id, "-o", "json") == 0
    return str(json.loads(capsys.readouterr().out)["hardware_class"])


def test_query_unknown_hardware_class(fleet: OrchestratorThread, capsys: Capture) -> None:
    known = hardware_class_of(fleet, capsys, "edge-01")
    typo = known[:-1]

    code, error = query_error(fleet, capsys, "--hardware-class", typo)

    assert code == EXIT_NOT_FOUND
    assert f"hardware class {typo!r} not found" in error
    assert f"did you mean {known}?" in error


def test_plot_unknown_hardware_class(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "plot", "--hardware-class", "camera-*")

    assert code == EXIT_NOT_FOUND
    assert "hardware class 'camera-*' not found" in capsys.readouterr().err


def test_query_known_hardware_class_empty(fleet: OrchestratorThread, capsys: Capture) -> None:
    known = hardware_class_of(fleet, capsys, "edge-01")

    code = cli(fleet, "metrics", "query", "--hardware-class", known, "--until", "2020-01-01T00:00:00Z", "-o", "json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == []


def test_query_hardware_class_of_removed(fleet: OrchestratorThread, capsys: Capture) -> None:
    known = hardware_class_of(fleet, capsys, "edge-01")
    assert cli(fleet, "devices", "remove", "edge-01") == 0
    capsys.readouterr()

    empty = cli(fleet, "metrics", "query", "--hardware-class", known, "--until", "2020-01-01T00:00:00Z", "-o", "json")
    empty_rows = json.loads(capsys.readouterr().out)
    stored = cli(fleet, "metrics", "query", "--hardware-class", known, "-o", "json")
    stored_rows = json.loads(capsys.readouterr().out)

    assert empty == 0
    assert empty_rows == []
    assert stored == 0
    assert [row["inferences"] for row in stored_rows] == [10]


def plot(fleet: OrchestratorThread, capsys: Capture, out: Path) -> tuple[int, str, str]:
    """Run `metrics plot --model linear --out OUT` and return its exit status, stdout and stderr."""
    code = cli(fleet, "metrics", "plot", "--model", "linear", "--out", str(out))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Return an empty folder for plot files, apart from the orchestrator's files in tmp_path."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_plot_out_directory(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    folder = out_dir / "plots"
    folder.mkdir()

    code, out, error = plot(fleet, capsys, folder)

    assert code == EXIT_USAGE
    assert f"invalid --out {folder}: it is a directory" in error
    assert f"such as {folder / 'latency.png'}" in error
    assert out == ""
    assert sorted(p.name for p in out_dir.iterdir()) == ["plots"]


def test_plot_out_unwritable(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    blocker = out_dir / "notes.txt"
    blocker.write_text("kept\n")

    code, out, error = plot(fleet, capsys, blocker / "latency.png")

    assert code == EXIT_USAGE
    assert f"cannot write --out {blocker / 'latency.png'}" in error
    assert "writable folder" in error
    assert "Traceback" not in error
    assert out == ""
    assert blocker.read_text() == "kept\n"


def test_plot_out_unknown_format(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    code, out, error = plot(fleet, capsys, out_dir / "latency.jpgx")

    assert code == EXIT_USAGE
    assert "matplotlib cannot write .jpgx files; use .png" in error
    assert out == ""
    assert list(out_dir.iterdir()) == []


def test_plot_out_without_suffix(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    code, out, error = plot(fleet, capsys, out_dir / "latency")

    assert code == 0
    assert "cannot" not in error
    assert out.startswith(f"wrote {out_dir / 'latency.png'} (10 inferences")
    assert (out_dir / "latency.png").read_bytes().startswith(b"\x89PNG")


def test_query_since_after_until(fleet: OrchestratorThread, capsys: Capture) -> None:
    code, error = query_error(fleet, capsys, "--since", "10m", "--until", "20m")

    assert code == EXIT_USAGE
    assert "invalid range: --since 10m (" in error
    assert "is not before --until 20m (" in error
    assert "(--since 20m --until 10m)" in error
    assert "a duration counts back from now" in error


def test_query_absolute_times_swapped(fleet: OrchestratorThread, capsys: Capture) -> None:
    since, until = "2026-12-05T10:00:00Z", "2026-12-05T09:00:00Z"
    code, error = query_error(fleet, capsys, "--since", since, "--until", until)

    assert code == EXIT_USAGE
    assert f"swap them (--since {until} --until {since})" in error
    assert "duration" not in error


def test_query_since_before_until(fleet: OrchestratorThread, capsys: Capture) -> None:
    code = cli(fleet, "metrics", "query", "--since", "20m", "--until", "10s", "-o", "json")

    assert code == 0
    assert [row["inferences"] for row in json.loads(capsys.readouterr().out)] == [10]


@pytest.mark.parametrize(("since", "bucket_seconds"), [("1h", 10), ("1d", 300), ("3d", 900), ("400d", 86400)])
def test_plot_bucket_follows_range(
    fleet: OrchestratorThread, capsys: Capture, tmp_path: Path, since: str, bucket_seconds: int
) -> None:
    code = cli(
        fleet, "metrics", "plot", "--model", "linear", "--since", since, "--out", str(tmp_path / "p.png"), "-o", "json"
    )

    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["bucket_seconds"] == bucket_seconds
    assert result["buckets"] >= 1


def test_plot_until_excludes_window(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    code = cli(
        fleet, "metrics", "plot", "--model", "linear", "--since", "2h", "--until", "1h", "--out", str(out_dir / "p.png")
    )

    assert code == EXIT_NOT_FOUND
    assert "no latency windows match model=linear since 2h until 1h" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []


def test_plot_until_includes_window(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    out = out_dir / "p.png"

    code = cli(fleet, "metrics", "plot", "--model", "linear", "--since", "10m", "--until", "5s", "--out", str(out))

    assert code == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (10 inferences")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_since_after_until(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    code = cli(
        fleet, "metrics", "plot", "--model", "linear", "--since", "10m", "--until", "20m", "--out", str(out_dir / "p")
    )

    error = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "invalid range: --since 10m (" in error
    assert "(--since 20m --until 10m)" in error


def test_plot_until_invalid(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    code = cli(fleet, "metrics", "plot", "--model", "linear", "--until", "yesterday", "--out", str(out_dir / "p"))

    assert code == EXIT_USAGE
    assert "invalid time 'yesterday'" in capsys.readouterr().err


def test_plot_bucket_follows_until(fleet: OrchestratorThread, capsys: Capture, out_dir: Path) -> None:
    # 1h back to a day ahead is 25 h, which 300 s buckets draw in 300 points; 1h alone takes 10 s buckets.
    until = f"{datetime.now(UTC) + timedelta(days=1):%Y-%m-%dT%H:%M:%S}Z"
    args = ("--model", "linear", "--since", "1h", "--until", until, "--out", str(out_dir / "p.png"), "-o", "json")

    code = cli(fleet, "metrics", "plot", *args)

    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["bucket_seconds"] == 300
    assert result["inferences"] == 10
