"""Tests of the agent's Reconciler with a real ModelHost, ModelStore and a gRPC artifact server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet.agent.delivery import Downloader, ModelStore
from edgefleet.agent.reconcile import DESIRED_FILE, MEMORY_FIXED_BYTES, MEMORY_PER_FILE_BYTE, Reconciler
from edgefleet.agent.runtime.host import ModelHost
from edgefleet.agent.verify import ArtifactVerifier
from edgefleet.common.serde import format_to_proto
from edgefleet.orchestrator.artifacts import FileArtifactStore
from edgefleet.orchestrator.download import DownloadError, iter_chunks
from edgefleet.v1 import agent_pb2, agent_pb2_grpc
from edgefleet.v1.common_pb2 import MODEL_STATE_FAILED, MODEL_STATE_SERVING
from tests.agent.models import onnx_failing_reshape, onnx_linear
from tests.faults.fleet import linear_model


class ArtifactServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, artifacts: FileArtifactStore) -> None:
        self.artifacts = artifacts

    def DownloadArtifact(
        self, request: agent_pb2.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.ArtifactChunk]:
        try:
            chunks = iter_chunks(self.artifacts, request.digest, request.offset, request.chunk_size)
        except DownloadError as error:
            context.abort(error.status_code, str(error))
        yield from chunks


@pytest.fixture
def artifacts(tmp_path: Path) -> FileArtifactStore:
    return FileArtifactStore(tmp_path / "orchestrator-artifacts")


@contextlib.contextmanager
def serving(servicer: ArtifactServicer) -> Iterator[grpc.Channel]:
    """Yield a channel to a real gRPC server on a free loopback port that runs servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(grace=None)


@pytest.fixture
def channel(artifacts: FileArtifactStore) -> Iterator[grpc.Channel]:
    with serving(ArtifactServicer(artifacts)) as channel:
        yield channel


def assignment(artifacts: FileArtifactStore, model_file: Path, version: str) -> agent_pb2.ModelAssignment:
    digest = artifacts.put_file(model_file)
    return agent_pb2.ModelAssignment(
        model_name="linear",
        model_version=version,
        variant_id=f"linear:{version}:source",
        digest=digest,
        size_bytes=model_file.stat().st_size,
        format=format_to_proto("onnx"),
    )


def make_reconciler(state_dir: Path, channel: grpc.Channel, host: ModelHost) -> Reconciler:
    store = ModelStore(state_dir / "models")
    return Reconciler(
        host=host,
        store=store,
        downloader=Downloader(channel, store, device_id="device-1"),
        state_dir=state_dir,
        allowed_runtimes=("onnxruntime",),
        default_threads=1,
        memory_budget_bytes=None,
        report=lambda reported: None,
    )


def test_restart_serves_version_that_served(
    tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel
) -> None:
    good = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")
    bad = assignment(artifacts, onnx_failing_reshape(tmp_path / "bad.onnx"), "2")
    state_dir = tmp_path / "device"
    feeds = {"x": np.ones((1, 4), np.float32)}

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(state_dir, channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[good]))
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[bad]))
        assert host.infer("linear", feeds).model_version == "1"
        assert "version 1 (variant linear:1:source) keeps serving" in reconciler.statuses["linear"].error

    # The agent restarts: a new host and reconciler restore the saved desired state from disk.
    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(state_dir, channel, host)
        reconciler.restore()
        assert host.infer("linear", feeds).model_version == "1"
        status = reconciler.statuses["linear"]
        assert status.variant_id == "linear:2:source"
        assert "version 1 (variant linear:1:source) keeps serving" in status.error


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_restart_offline_serves_kept_version(
    tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel, damage: str
) -> None:
    """A current model file that is damaged at start-up leaves the kept version serving until it is fetched."""
    first = assignment(artifacts, onnx_linear(tmp_path / "first.onnx", seed=0), "1")
    second = assignment(artifacts, onnx_linear(tmp_path / "second.onnx", seed=1), "2")
    state_dir = tmp_path / "device"
    feeds = {"x": np.ones((1, 4), np.float32)}

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(state_dir, channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[first]))
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[second]))
        assert host.infer("linear", feeds).model_version == "2"

    model_dir = state_dir / "models" / "models" / "linear"
    current = model_dir / json.loads((model_dir / "state.json").read_text())["current"]
    assert current.stem == second.digest.removeprefix("sha256:")
    if damage == "truncate":
        with current.open("r+b") as handle:
            handle.truncate(current.stat().st_size // 2)
    else:
        current.unlink()

    # The agent restarts with no orchestrator reachable: restore() uses only local files.
    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(state_dir, channel, host)
        reconciler.restore()
        restored_version = host.infer("linear", feeds).model_version
        reported = list(reconciler.reported_state().models)
        claimed_generation = reconciler.hello_generation()

        # Once connected, the orchestrator sends the desired state again and the file is downloaded.
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[second]))
        fetched_version = host.infer("linear", feeds).model_version
        fetched = list(reconciler.reported_state().models)

    assert restored_version == "1"
    assert [(s.variant_id, s.state) for s in reported] == [
        ("linear:2:source", MODEL_STATE_FAILED),
        ("linear:1:source", MODEL_STATE_SERVING),
    ]
    reason = "failed its SHA-256 check" if damage == "truncate" else "is not on disk"
    assert reason in reported[0].error
    assert "version 1 (variant linear:1:source) keeps serving" in reported[0].error
    assert reported[1].digest == first.digest
    assert claimed_generation == 0
    assert fetched_version == "2"
    assert [(s.variant_id, s.state) for s in fetched] == [("linear:2:source", MODEL_STATE_SERVING)]
    assert hashlib.sha256(current.read_bytes()).hexdigest() == current.stem


@pytest.mark.parametrize(
    "content",
    [
        '{"generation": 3, "desired_state": "0a05ffff"}',  # Hex of bytes that are not a DesiredState.
        '{"generation": 3, "desired_state": "", "serving": {"linear": "ff"}}',
        "not json",
    ],
    ids=["corrupt-desired", "corrupt-serving", "not-json"],
)
def test_restore_ignores_corrupt_file(
    tmp_path: Path, channel: grpc.Channel, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged desired state file is skipped with a warning; the orchestrator sends the state again."""
    state_dir = tmp_path / "device"
    state_dir.mkdir()
    (state_dir / DESIRED_FILE).write_text(content)

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(state_dir, channel, host)
        reconciler.restore()

        assert list(host.list()) == []
    assert "ignoring unreadable" in caplog.text


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """Mount a 4 MiB tmpfs and yield its path, or yield None where mounting is not permitted."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, check=False
        )
        mounted = result.returncode == 0
    except FileNotFoundError:
        mounted = False
    if not mounted:
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill_disk(directory: Path) -> None:
    """Write zeros into directory/filler until the file system is full."""
    with (directory / "filler").open("wb", buffering=0) as filler, pytest.raises(OSError, match="No space left"):
        while True:
            filler.write(b"\0" * 65536)


def test_unwritable_desired_state_keeps_serving(
    tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel, small_disk: Path | None
) -> None:
    # On a real tmpfs the disk fills up; without mount rights a directory in the way of the
    # temporary file makes the write fail instead.
    state_dir = (small_disk or tmp_path) / "device"
    good = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(state_dir, channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[good]))
        if small_disk is not None:
            fill_disk(small_disk)
        else:
            (state_dir / "desired.tmp").mkdir()

        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[good]))

        assert host.infer("linear", {"x": np.ones((1, 4), np.float32)}).model_version == "1"
        assert reconciler.statuses["linear"].error == ""
        saved = json.loads((state_dir / DESIRED_FILE).read_text())
        assert saved["generation"] == 1
        if small_disk is not None:
            assert not (state_dir / "desired.tmp").exists()


def test_unwritable_counters_kept_in_memory(tmp_path: Path, small_disk: Path | None) -> None:
    # A new generation re-signs a served assignment with a higher counter, which the verifier saves
    # from the reconcile thread, so a failed save must not raise there.
    state_dir = small_disk or tmp_path
    verifier = ArtifactVerifier(state_dir, "device-1")
    served = agent_pb2.ModelAssignment(model_name="linear", version_counter=1)
    verifier.accept(served)
    if small_disk is not None:
        fill_disk(small_disk)
    else:
        (state_dir / "counters.tmp").mkdir()

    served.version_counter = 2
    verifier.accept(served)

    assert verifier.counters == {"linear": 2}
    assert json.loads((state_dir / "counters.json").read_text()) == {"linear": 1}


def test_redeploy_clears_failed_status(tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel) -> None:
    """Deploying the version that kept serving after a failed deploy replaces the failure in the report."""
    good = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")
    bad = assignment(artifacts, onnx_failing_reshape(tmp_path / "bad.onnx"), "2")

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[good]))
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[bad]))
        failed = agent_pb2.ModelStatus()
        failed.CopyFrom(reconciler.statuses["linear"])
        reconciler.apply(agent_pb2.DesiredState(generation=3, models=[good]))
        status = reconciler.statuses["linear"]
        served = host.get("linear")

    assert failed.state == MODEL_STATE_FAILED
    assert served is not None
    assert served.version == "1"
    assert status.variant_id == "linear:1:source"
    assert status.state == MODEL_STATE_SERVING
    assert status.error == ""
    assert status.runtime == "onnxruntime"


def test_failed_deploy_reports_served_version(
    tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel
) -> None:
    """After a failed deploy the report lists the failed version, then the one that keeps serving."""
    good = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")
    bad = assignment(artifacts, onnx_failing_reshape(tmp_path / "bad.onnx"), "2")

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[good]))
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[bad]))
        reported = list(reconciler.reported_state().models)
        reconciler.apply(agent_pb2.DesiredState(generation=3, models=[good]))
        redeployed = list(reconciler.reported_state().models)

    assert [(s.variant_id, s.state) for s in reported] == [
        ("linear:2:source", MODEL_STATE_FAILED),
        ("linear:1:source", MODEL_STATE_SERVING),
    ]
    assert reported[1].digest == good.digest
    assert reported[1].model_version == "1"
    assert reported[1].runtime == "onnxruntime"
    assert reported[1].error == ""
    assert [(s.variant_id, s.state) for s in redeployed] == [("linear:1:source", MODEL_STATE_SERVING)]


def test_swap_counts_both_versions_against_budget(
    tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel
) -> None:
    """A budget that fits one version of a model but not two rejects a swap, and the old version serves on."""
    first = assignment(artifacts, onnx_linear(tmp_path / "first.onnx", seed=0), "1")
    second = assignment(artifacts, onnx_linear(tmp_path / "second.onnx", seed=1), "2")
    one_model = first.size_bytes * MEMORY_PER_FILE_BYTE + MEMORY_FIXED_BYTES

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", channel, host)
        reconciler.process_bytes = 8 << 20  # The profile's budget is for the models alone.
        reconciler.memory_budget_bytes = one_model + (one_model >> 1)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[first]))
        first_status = reconciler.statuses["linear"]
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[second]))
        second_status = reconciler.statuses["linear"]
        served = host.get("linear")

    assert first_status.state == MODEL_STATE_SERVING
    assert second_status.state == MODEL_STATE_FAILED
    assert "the profile's memory budget for models" in second_status.error
    assert "including version 1, which stays loaded until the new version replaces it" in second_status.error
    assert served is not None
    assert served.version == "1"


def test_swap_counts_agent_against_cgroup_limit(
    tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel
) -> None:
    """Under a cgroup limit the agent's own memory counts too, since the kernel kills the whole process."""
    first = assignment(artifacts, onnx_linear(tmp_path / "first.onnx", seed=0), "1")
    second = assignment(artifacts, onnx_linear(tmp_path / "second.onnx", seed=1), "2")
    one_model = first.size_bytes * MEMORY_PER_FILE_BYTE + MEMORY_FIXED_BYTES

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", channel, host)
        reconciler.process_bytes = 8 << 20
        reconciler.memory_budget_bytes = 2 * one_model  # Holds both versions: the limit decides.
        reconciler.memory_limit_bytes = reconciler.process_bytes + one_model + (one_model >> 1)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[first]))
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[second]))
        status = reconciler.statuses["linear"]
        served = host.get("linear")

    assert status.state == MODEL_STATE_FAILED
    assert "the agent itself 8 MiB" in status.error
    assert "cgroup memory limit" in status.error
    assert served is not None
    assert served.version == "1"


def test_threads_capped_at_max(tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel) -> None:
    """An assignment that requests more threads than the device allows loads with the allowed count."""
    two_threads = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")
    two_threads.threads = 2

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", channel, host)
        reconciler.max_threads = 1
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[two_threads]))
        served = host.get("linear")
        status = reconciler.statuses["linear"]

    assert served is not None
    assert served.threads == 1
    assert status.state == MODEL_STATE_SERVING
    assert status.threads == 1


def test_redeploy_other_threads_reloads(tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel) -> None:
    """Deploying the served variant with another thread count loads it again with that count."""
    default = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")
    two_threads = agent_pb2.ModelAssignment()
    two_threads.CopyFrom(default)
    two_threads.threads = 2

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[default]))
        before = host.get("linear")
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[two_threads]))
        after = host.get("linear")
        status = reconciler.statuses["linear"]

    assert before is not None
    assert before.threads == 1
    assert after is not None
    assert after.threads == 2
    assert status.state == MODEL_STATE_SERVING
    assert status.threads == 2


def test_disk_full_download_retried_once_space_is_free(
    tmp_path: Path,
    artifacts: FileArtifactStore,
    channel: grpc.Channel,
    small_disk: Path | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if small_disk is None:
        pytest.skip("needs a tmpfs mount (root) to fill a disk")
    good = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")
    caplog.set_level("INFO", logger="edgefleet.agent.reconcile")

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(small_disk / "device", channel, host)
        fill_disk(small_disk)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[good]))
        failed_at = reconciler.statuses["linear"].updated_at.ToNanoseconds()
        reconciler.retry_pending()  # The disk is as full as at the failure: no attempt.
        status_while_full = reconciler.statuses["linear"]
        (small_disk / "filler").unlink()
        reconciler.retry_pending()

        assert status_while_full.state == MODEL_STATE_FAILED
        assert "disk full" in status_while_full.error
        assert status_while_full.updated_at.ToNanoseconds() == failed_at
        assert caplog.text.count("retrying the download of model=linear") == 1
        assert reconciler.statuses["linear"].state == MODEL_STATE_SERVING
        assert reconciler.retry_later == set()
        assert host.infer("linear", {"x": np.ones((1, 4), np.float32)}).model_version == "1"


class SlowArtifactServicer(ArtifactServicer):
    """Serves artifacts at one chunk per 50 ms, so a download of a few MiB is still running when a test acts."""

    def DownloadArtifact(
        self, request: agent_pb2.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.ArtifactChunk]:
        for chunk in super().DownloadArtifact(request, context):
            time.sleep(0.05)
            yield chunk


@pytest.fixture
def slow_channel(artifacts: FileArtifactStore) -> Iterator[grpc.Channel]:
    with serving(SlowArtifactServicer(artifacts)) as channel:
        yield channel


def big_assignment(artifacts: FileArtifactStore, tmp_path: Path, seed: int) -> agent_pb2.ModelAssignment:
    """Return an assignment of version 2 of "linear" in a file of about 8 MiB."""
    big_file = tmp_path / "big.onnx"
    big_file.write_bytes(linear_model(seed, padding_floats=2 * 1024 * 1024))
    return assignment(artifacts, big_file, "2")


def apply_during_download(
    reconciler: Reconciler, downloading: agent_pb2.DesiredState, newer: agent_pb2.DesiredState, digest: str
) -> threading.Thread:
    """Apply downloading in a thread, and newer here once the download of digest has written bytes.

    Both go through supersede() first, as the agent does. Returns the thread, joined.
    """
    part = reconciler.store.part_path(digest)
    applying = threading.Thread(
        target=reconciler.apply, args=(downloading,), kwargs={"ticket": reconciler.supersede(downloading)}
    )
    applying.start()
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    reconciler.apply(newer, ticket=reconciler.supersede(newer))
    applying.join(timeout=30)
    return applying


def test_newer_desired_state_stops_download(
    tmp_path: Path, artifacts: FileArtifactStore, slow_channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="edgefleet.agent.reconcile")
    small = assignment(artifacts, onnx_linear(tmp_path / "small.onnx"), "1")
    big = big_assignment(artifacts, tmp_path, seed=2)
    second = agent_pb2.DesiredState(generation=2, models=[big])
    rollback = agent_pb2.DesiredState(generation=3, models=[small])

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", slow_channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[small]))
        applying = apply_during_download(reconciler, second, rollback, big.digest)

        assert not applying.is_alive()
        assert "download stopped: a newer desired state arrived, or the agent stops" in caplog.text
        # The newer desired state does not have the stopped download, so its part is deleted.
        assert not reconciler.store.part_path(big.digest).exists()
        assert reconciler.store.find("linear", big.digest) is None
        assert host.infer("linear", {"x": np.ones((1, 4), np.float32)}).model_version == "1"
        assert reconciler.statuses["linear"].state == MODEL_STATE_SERVING
        assert reconciler.statuses["linear"].variant_id == small.variant_id
        assert reconciler.generation == 3


def test_overtaken_desired_state_skipped(tmp_path: Path, artifacts: FileArtifactStore, channel: grpc.Channel) -> None:
    # A desired state without the model, overtaken by one that has it again before it was applied,
    # must not unload the model in between.
    good = assignment(artifacts, onnx_linear(tmp_path / "good.onnx"), "1")
    emptied = agent_pb2.DesiredState(generation=2)
    restored = agent_pb2.DesiredState(generation=3, models=[good])

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[good]))
        emptied_ticket = reconciler.supersede(emptied)
        restored_ticket = reconciler.supersede(restored)
        reconciler.apply(emptied, ticket=emptied_ticket)
        served_between = host.get("linear")
        reconciler.apply(restored, ticket=restored_ticket)

        assert served_between is not None
        assert host.infer("linear", {"x": np.ones((1, 4), np.float32)}).model_version == "1"
        assert reconciler.generation == 3


def test_rollback_of_other_model_not_blocked_by_download(
    tmp_path: Path, artifacts: FileArtifactStore, slow_channel: grpc.Channel
) -> None:
    # Model "other" goes back to the version it kept on disk while a large download of "linear" runs:
    # the swap comes first, and the download resumes after it.
    big = big_assignment(artifacts, tmp_path, seed=3)
    other_1, other_2 = (
        agent_pb2.ModelAssignment(
            model_name="other",
            model_version=version,
            variant_id=f"other:{version}:source",
            digest=artifacts.put_file(onnx_linear(tmp_path / f"other-{version}.onnx", seed=int(version))),
            size_bytes=(tmp_path / f"other-{version}.onnx").stat().st_size,
            format=format_to_proto("onnx"),
        )
        for version in ("1", "2")
    )
    serving_order: list[str] = []

    def record(reported: agent_pb2.ReportedState) -> None:
        for status in reported.models:
            if status.state == MODEL_STATE_SERVING and status.variant_id not in serving_order:
                serving_order.append(status.variant_id)

    downloading = agent_pb2.DesiredState(generation=3, models=[other_2, big])
    rollback = agent_pb2.DesiredState(generation=4, models=[other_1, big])

    with ModelHost(default_threads=1) as host:
        reconciler = make_reconciler(tmp_path / "device", slow_channel, host)
        reconciler.apply(agent_pb2.DesiredState(generation=1, models=[other_1]))
        reconciler.apply(agent_pb2.DesiredState(generation=2, models=[other_2]))
        reconciler.report = record
        apply_during_download(reconciler, downloading, rollback, big.digest)

        assert host.infer("other", {"x": np.ones((1, 4), np.float32)}).model_version == "1"
        assert host.infer("linear", {"x": np.ones((1, 4), np.float32)}).model_version == "2"
        assert serving_order.index("other:1:source") < serving_order.index(big.variant_id)
