"""Tests of model delivery: a real gRPC server streams artifacts to the Downloader and its ModelStore."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgefleet.agent.delivery import (
    ChunkCorruptError,
    DigestMismatchError,
    DiskFullError,
    DownloadCancelledError,
    Downloader,
    DownloadFailedError,
    ModelStore,
    PartialDownload,
    RetryPolicy,
)
from edgefleet.orchestrator.artifacts import FileArtifactStore, format_digest
from edgefleet.orchestrator.download import DownloadError, iter_chunks
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_SIZE = 18 * 1000 * 1000  # Over gRPC's 4 MiB message limit, so it needs many chunks.
CHUNK = 256 * 1024
MiB = 1024 * 1024


class ArtifactServicer(agent_pb2_grpc.AgentServiceServicer):
    """DownloadArtifact backed by iter_chunks, with switches that break the stream like a bad network."""

    def __init__(self, artifacts: FileArtifactStore) -> None:
        self.artifacts = artifacts
        self.lock = threading.Lock()
        self.bytes_served = 0
        self.request_offsets: list[int] = []
        self.bytes_by_request: list[int] = []  # Bytes served by each call, in call order.
        self.cut_at_offset: int | None = None  # Abort with UNAVAILABLE once, at the first chunk from here.
        self.corrupt_offsets: set[int] = set()  # Flip one byte of the chunk at each offset, once.
        self.always_corrupt = False
        self.always_unavailable = False
        self.slow_from_offset: int | None = None  # Sleep slow_delay_s before each chunk from here.
        self.slow_delay_s = 0.0

    def DownloadArtifact(
        self, request: agent_pb2.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.ArtifactChunk]:
        with self.lock:
            self.request_offsets.append(request.offset)
            self.bytes_by_request.append(0)
            call_index = len(self.bytes_by_request) - 1
        if self.always_unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "test server is unavailable")
        try:
            chunks = iter_chunks(self.artifacts, request.digest, request.offset, request.chunk_size)
        except DownloadError as error:
            context.abort(error.status_code, str(error))
        for chunk in chunks:
            if self.cut_at_offset is not None and chunk.offset >= self.cut_at_offset:
                self.cut_at_offset = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "test server cut the stream")
            if self.slow_from_offset is not None and chunk.offset >= self.slow_from_offset:
                time.sleep(self.slow_delay_s)
            if self.always_corrupt or chunk.offset in self.corrupt_offsets:
                self.corrupt_offsets.discard(chunk.offset)
                data = bytearray(chunk.data)
                data[len(data) // 2] ^= 0xFF
                chunk.data = bytes(data)
            with self.lock:
                self.bytes_served += len(chunk.data)
                self.bytes_by_request[call_index] += len(chunk.data)
            yield chunk


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return random.Random(7).randbytes(MODEL_SIZE)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, model_bytes: bytes) -> FileArtifactStore:
    store = FileArtifactStore(tmp_path_factory.mktemp("orchestrator-artifacts"))
    for content in (model_bytes, b"old model v1" * 1000, b"old model v2" * 1000, b"old model v3" * 1000):
        source = tmp_path_factory.mktemp("upload") / "model.bin"
        source.write_bytes(content)
        store.put_file(source)
    return store


@pytest.fixture(scope="module")
def model_digest(model_bytes: bytes) -> str:
    return format_digest(hashlib.sha256(model_bytes).hexdigest())


@pytest.fixture
def servicer(artifacts: FileArtifactStore) -> ArtifactServicer:
    return ArtifactServicer(artifacts)


@pytest.fixture
def address(servicer: ArtifactServicer) -> Iterator[str]:
    """Serve the test servicer on a free loopback port and yield its "host:port"."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def channel(address: str) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(address)
    try:
        yield channel
    finally:
        channel.close()


@pytest.fixture
def model_store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "device")


def make_downloader(channel: grpc.Channel, model_store: ModelStore, **options: Any) -> Downloader:
    options.setdefault("chunk_size", CHUNK)
    options.setdefault("sleep", lambda seconds: None)
    return Downloader(channel, model_store, device_id="device-1", **options)


def digest_of(content: bytes) -> str:
    return format_digest(hashlib.sha256(content).hexdigest())


def model_files(model_store: ModelStore, name: str) -> list[str]:
    return sorted(path.name for path in (model_store.models_dir / name).iterdir())


def test_download_large_model(
    channel: grpc.Channel, model_store: ModelStore, model_bytes: bytes, model_digest: str
) -> None:
    progress: list[tuple[int, int]] = []
    downloader = make_downloader(channel, model_store)

    installed = downloader.install(
        "resnet",
        model_digest,
        "onnx",
        expected_size=MODEL_SIZE,
        progress=lambda d, t: progress.append((d, t)),
    )

    assert installed.path.read_bytes() == model_bytes
    assert installed.path.name == model_digest.removeprefix("sha256:") + ".onnx"
    assert model_store.current("resnet") == installed
    assert progress[-1] == (MODEL_SIZE, MODEL_SIZE)
    assert len(progress) == -(-MODEL_SIZE // CHUNK)
    assert list(model_store.partial_dir.iterdir()) == []


def test_download_default_chunk_size(
    channel: grpc.Channel, model_store: ModelStore, model_bytes: bytes, model_digest: str
) -> None:
    installed = make_downloader(channel, model_store, chunk_size=0).install("resnet", model_digest, "onnx")

    assert installed.path.read_bytes() == model_bytes


def test_resume_after_cut_stream(
    channel: grpc.Channel,
    servicer: ArtifactServicer,
    model_store: ModelStore,
    model_bytes: bytes,
    model_digest: str,
) -> None:
    servicer.cut_at_offset = int(MODEL_SIZE * 0.85)

    installed = make_downloader(channel, model_store).install("resnet", model_digest, "onnx")

    assert installed.path.read_bytes() == model_bytes
    assert len(servicer.request_offsets) == 2
    assert servicer.request_offsets[1] >= int(MODEL_SIZE * 0.85) - CHUNK
    assert servicer.bytes_served - MODEL_SIZE <= CHUNK


def test_corrupt_chunk_fetched_again(
    channel: grpc.Channel,
    servicer: ArtifactServicer,
    model_store: ModelStore,
    model_bytes: bytes,
    model_digest: str,
) -> None:
    servicer.corrupt_offsets = {10 * CHUNK}

    installed = make_downloader(channel, model_store).install("resnet", model_digest, "onnx")

    assert installed.path.read_bytes() == model_bytes
    assert servicer.request_offsets == [0, 10 * CHUNK]


def test_corrupt_chunk_retries_bounded(
    channel: grpc.Channel, servicer: ArtifactServicer, model_store: ModelStore, model_digest: str
) -> None:
    servicer.always_corrupt = True
    downloader = make_downloader(channel, model_store, retry=RetryPolicy(max_chunk_refetches=2))

    with pytest.raises(ChunkCorruptError):
        downloader.install("resnet", model_digest, "onnx")

    assert len(servicer.request_offsets) == 3
    assert model_store.current("resnet") is None


def test_digest_mismatch_not_installed(
    channel: grpc.Channel, artifacts: FileArtifactStore, model_store: ModelStore, tmp_path: Path
) -> None:
    old = b"old model v1" * 1000
    downloader = make_downloader(channel, model_store)
    downloader.install("resnet", digest_of(old), "onnx")
    # A stored file whose content does not match its name, as after corruption on the orchestrator.
    claimed = digest_of(b"the content the operator uploaded")
    artifacts.path_of(claimed).parent.mkdir(parents=True, exist_ok=True)
    artifacts.path_of(claimed).write_bytes(b"bit rot" * 5000)

    try:
        with pytest.raises(DigestMismatchError):
            downloader.install("resnet", claimed, "onnx")
    finally:
        artifacts.path_of(claimed).unlink()

    current = model_store.current("resnet")
    assert current is not None
    assert current.digest == digest_of(old)
    assert model_files(model_store, "resnet") == sorted([current.path.name, "state.json"])
    assert list(model_store.partial_dir.iterdir()) == []


def test_unknown_digest_not_retried(channel: grpc.Channel, servicer: ArtifactServicer, model_store: ModelStore) -> None:
    with pytest.raises(DownloadFailedError, match="NOT_FOUND"):
        make_downloader(channel, model_store).install("resnet", digest_of(b"never uploaded"), "onnx")

    assert len(servicer.request_offsets) == 1


def test_unavailable_retries_bounded(
    channel: grpc.Channel, servicer: ArtifactServicer, model_store: ModelStore, model_digest: str
) -> None:
    servicer.always_unavailable = True
    delays: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.5, max_backoff_s=1.5)
    downloader = make_downloader(channel, model_store, retry=policy, sleep=delays.append)

    with pytest.raises(DownloadFailedError, match="UNAVAILABLE"):
        downloader.install("resnet", model_digest, "onnx")

    assert len(servicer.request_offsets) == 5
    assert len(delays) == 4
    assert all(0.0 <= delay <= ceiling for delay, ceiling in zip(delays, [0.5, 1.0, 1.5, 1.5], strict=True))


def test_versions_keep_one_previous(channel: grpc.Channel, model_store: ModelStore) -> None:
    downloader = make_downloader(channel, model_store)
    digests = [digest_of(f"old model v{version}".encode() * 1000) for version in (1, 2, 3)]
    for digest in digests:
        downloader.install("resnet", digest, "tflite")

    current = model_store.current("resnet")
    previous = model_store.previous("resnet")
    assert current is not None and current.digest == digests[2]
    assert previous is not None and previous.digest == digests[1]
    assert len(model_files(model_store, "resnet")) == 3

    restored = model_store.rollback("resnet")

    assert restored.digest == digests[1]
    assert model_store.previous("resnet") is None
    assert model_files(model_store, "resnet") == sorted([restored.path.name, "state.json"])


def test_startup_removes_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "device"
    first = ModelStore(root)
    fresh, stale, undesired = (digest_of(name.encode()) for name in ("fresh", "stale", "undesired"))
    for digest in (fresh, stale, undesired):
        first.part_path(digest).write_bytes(b"x" * 100)
        first.write_partial(PartialDownload(digest, 1000, 100))
    old_time = time.time() - 3 * 3600
    for path in (first.part_path(stale), first.part_path(stale).with_suffix(".json")):
        os.utime(path, (old_time, old_time))
    orphan = first.partial_dir / f"{'a' * 64}.part"
    orphan.write_bytes(b"no sidecar")
    (first.tmp_dir / "crashed.tmp").write_bytes(b"half a state file")
    unreferenced = first.models_dir / "resnet" / f"{'b' * 64}.onnx"
    unreferenced.parent.mkdir()
    unreferenced.write_bytes(b"renamed in, crashed before state.json")

    second = ModelStore(root, partial_max_age_s=3600, desired_digests=[fresh, stale])

    assert second.read_partial(fresh) == PartialDownload(fresh, 1000, 100)
    assert not second.part_path(stale).exists()
    assert not second.part_path(undesired).exists()
    assert not orphan.exists()
    assert list(second.tmp_dir.iterdir()) == []
    assert not unreferenced.exists()


CHILD_SCRIPT = """
import sys
import grpc
from edgefleet.agent.delivery import Downloader, ModelStore

root, address, digest = sys.argv[1:4]
channel = grpc.insecure_channel(address)
downloader = Downloader(channel, ModelStore(root), chunk_size=256 * 1024)
downloader.install("resnet", digest, "onnx", progress=lambda done, total: print(done, flush=True))
print("finished", flush=True)
"""


@pytest.mark.slow
def test_sigkill_mid_download_resumes(
    servicer: ArtifactServicer,
    address: str,
    channel: grpc.Channel,
    tmp_path: Path,
    model_bytes: bytes,
    model_digest: str,
) -> None:
    root = tmp_path / "device"
    old_digest = digest_of(b"old model v1" * 1000)
    make_downloader(channel, ModelStore(root)).install("resnet", old_digest, "onnx")
    servicer.slow_from_offset = 10 * MiB
    servicer.slow_delay_s = 0.05

    killed_at = 0
    with subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(root), address, model_digest],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip().isdigit() and int(line) >= 11 * MiB:
                child.send_signal(signal.SIGKILL)
                killed_at = int(line)
                break
        child.wait(timeout=30)

    assert child.returncode == -signal.SIGKILL
    assert killed_at < MODEL_SIZE
    store = ModelStore(root)
    current = store.current("resnet")
    assert current is not None and current.digest == old_digest
    assert model_files(store, "resnet") == sorted([current.path.name, "state.json"])
    partial = store.read_partial(model_digest)
    assert partial is not None and partial.verified_offset >= 8 * MiB

    servicer.slow_from_offset = None
    installed = make_downloader(channel, store).install("resnet", model_digest, "onnx")

    assert installed.path.read_bytes() == model_bytes
    assert servicer.request_offsets[-1] == partial.verified_offset
    assert servicer.bytes_by_request[-1] == MODEL_SIZE - partial.verified_offset
    assert store.previous("resnet") == current


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """Mount a 24 MiB tmpfs and yield its path, or yield None where mounting is not permitted."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
            capture_output=True,
            check=False,
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


class FullDiskFile:
    """A file wrapper whose writes fail with ENOSPC, standing in for a full disk where tmpfs cannot mount."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FullDiskModelStore(ModelStore):
    def open_partial(self, digest: str, offset: int) -> Any:
        return FullDiskFile(super().open_partial(digest, offset))


def fill_disk(directory: Path) -> None:
    with (directory / "filler").open("wb") as filler:
        try:
            while True:
                filler.write(b"\0" * MiB)
                filler.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_disk_full_keeps_installed_model(
    channel: grpc.Channel, small_disk: Path | None, tmp_path: Path, model_digest: str
) -> None:
    # A real tmpfs fills up while the download runs; without mount rights a fake file raises ENOSPC.
    root = small_disk / "device" if small_disk is not None else tmp_path / "device"
    old_content = b"old model v1" * 1000
    old_digest = digest_of(old_content)
    make_downloader(channel, ModelStore(root)).install("resnet", old_digest, "onnx")
    model_store = ModelStore(root) if small_disk is not None else FullDiskModelStore(root)

    def fill_on_first_chunk(done: int, total: int) -> None:
        if small_disk is not None and not (small_disk / "filler").exists():
            fill_disk(small_disk)

    with pytest.raises(DiskFullError):
        make_downloader(channel, model_store).install("resnet", model_digest, "onnx", progress=fill_on_first_chunk)

    current = model_store.current("resnet")
    assert current is not None and current.digest == old_digest
    assert current.path.read_bytes() == old_content
    assert not model_store.part_path(model_digest).exists()


def test_disk_too_small_rejected_early(
    channel: grpc.Channel, servicer: ArtifactServicer, small_disk: Path | None, model_digest: str
) -> None:
    if small_disk is None:
        pytest.skip("needs a tmpfs mount (root) to make a disk smaller than the model")
    fill = small_disk / "filler"
    fill.write_bytes(b"\0" * (10 * MiB))  # Leaves about 14 MiB, less than the 18 MB model.
    model_store = ModelStore(small_disk / "device")

    with pytest.raises(DiskFullError):
        make_downloader(channel, model_store).install("resnet", model_digest, "onnx", expected_size=MODEL_SIZE)

    assert servicer.request_offsets == []
    assert not model_store.part_path(model_digest).exists()


def test_offset_recorded_during_download(
    channel: grpc.Channel, servicer: ArtifactServicer, model_store: ModelStore, model_digest: str
) -> None:
    """Background syncs record verified offsets while chunks keep arriving."""
    servicer.slow_from_offset = 6 * MiB
    servicer.slow_delay_s = 0.02
    recorded: list[int] = []

    def watch(done: int, total: int) -> None:
        partial = model_store.read_partial(model_digest)
        recorded.append(partial.verified_offset if partial is not None else 0)

    make_downloader(channel, model_store, fsync_interval_bytes=MiB).fetch(model_digest, progress=watch)

    assert max(recorded) >= 4 * MiB
    assert all(offset % CHUNK == 0 for offset in recorded)


def test_cancel_mid_stream_not_retried(
    channel: grpc.Channel,
    servicer: ArtifactServicer,
    model_store: ModelStore,
    model_digest: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cancel during a stream ends the download without a retry or an interruption warning."""
    cancel = threading.Event()

    def cancel_at_4_mib(done: int, total: int) -> None:
        if done >= 4 * MiB:
            cancel.set()

    with pytest.raises(DownloadCancelledError):
        make_downloader(channel, model_store).fetch(model_digest, progress=cancel_at_4_mib, cancel=cancel)

    assert len(servicer.request_offsets) == 1
    assert "interrupted" not in caplog.text
    partial = model_store.read_partial(model_digest)
    assert partial is not None
    assert partial.verified_offset == 4 * MiB


def test_background_fsync_error_raised(
    channel: grpc.Channel, model_store: ModelStore, model_digest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing fsync (EIO, faked: this machine has no failing disk) stops the download with its error."""
    real_fsync = os.fsync
    part_syncs = []

    def failing_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
            part_syncs.append(fd)
            if len(part_syncs) == 2:
                raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr("edgefleet.agent.delivery.os.fsync", failing_fsync)
    with pytest.raises(OSError) as caught:
        make_downloader(channel, model_store, fsync_interval_bytes=MiB).fetch(model_digest)

    assert caught.value.errno == errno.EIO
    partial = model_store.read_partial(model_digest)
    assert partial is not None
    assert partial.verified_offset == MiB  # The first sync's record; the failed one recorded nothing.


def test_agent_imports_no_orchestrator() -> None:
    code = (
        "import sys, edgefleet.agent.delivery; "
        "bad = [m for m in sys.modules if m.startswith(('edgefleet.orchestrator', 'torch', 'sqlalchemy'))]; "
        "print(json.dumps(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )

    assert json.loads(result.stdout) == []
