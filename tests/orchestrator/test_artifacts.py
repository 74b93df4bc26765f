"""Tests of the content-addressed artifact store, upload assembly and the chunked download iterator."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from edgefleet.orchestrator.artifacts import (
    ArtifactNotFoundError,
    FileArtifactStore,
    InvalidUploadError,
    UploadAssembler,
    UploadError,
    UploadTooLargeError,
    UploadValidationError,
    format_digest,
    parse_digest,
)
from edgefleet.orchestrator.download import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    ChunkDigestCache,
    DownloadNotFoundError,
    InvalidDownloadError,
    iter_chunks,
)
from edgefleet.v1 import operator_pb2, operator_pb2_grpc
from tests.tmpfs import mounted_tmpfs

MiB = 1024 * 1024


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def stored_files(root: Path) -> list[Path]:
    """Return every file under root/sha256 and root/tmp."""
    return sorted(path for path in root.rglob("*") if path.is_file())


def inspect_size(path: Path) -> int:
    """Stand-in for the model inspector: accepts any file and returns its size."""
    return path.stat().st_size


@pytest.fixture
def artifact_store(tmp_path: Path) -> FileArtifactStore:
    return FileArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def assembler(artifact_store: FileArtifactStore) -> UploadAssembler[int]:
    return UploadAssembler(artifact_store, max_size_bytes=4 * MiB, validate=inspect_size)


def test_put_file_layout(artifact_store: FileArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(b"model bytes")
    hex_digest = sha256_hex(b"model bytes")

    digest = artifact_store.put_file(source)

    assert digest == f"sha256:{hex_digest}"
    assert artifact_store.path_of(digest) == artifact_store.root / "sha256" / hex_digest[:2] / hex_digest
    assert artifact_store.path_of(digest).read_bytes() == b"model bytes"
    assert artifact_store.size(digest) == len(b"model bytes")
    assert source.exists()


def test_put_file_deduplicates(artifact_store: FileArtifactStore, tmp_path: Path) -> None:
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    first.write_bytes(b"same content")
    second.write_bytes(b"same content")

    digests = {artifact_store.put_file(first), artifact_store.put_file(second, move=True)}

    assert len(digests) == 1
    assert not second.exists()
    assert len(stored_files(artifact_store.root)) == 1


def test_open_reads_content(artifact_store: FileArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(b"content to read")
    digest = artifact_store.put_file(source, move=True)

    with artifact_store.open(digest) as handle:
        assert handle.read() == b"content to read"
    assert artifact_store.exists(digest)


def test_unknown_digest_not_found(artifact_store: FileArtifactStore) -> None:
    digest = format_digest(sha256_hex(b"never stored"))

    assert not artifact_store.exists(digest)
    with pytest.raises(ArtifactNotFoundError):
        artifact_store.size(digest)
    with pytest.raises(ArtifactNotFoundError):
        artifact_store.open(digest)


@pytest.mark.parametrize("digest", ["", "abc", "sha256:xyz", "md5:" + "0" * 64, "sha256:" + "0" * 63])
def test_malformed_digest_rejected(digest: str) -> None:
    with pytest.raises(ValueError, match="invalid digest"):
        parse_digest(digest)


def test_startup_removes_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = FileArtifactStore(root)
    leftover = store.staging_dir() / "upload-crashed.onnx"
    leftover.write_bytes(b"half an upload")
    source = tmp_path / "model.onnx"
    source.write_bytes(b"kept")
    digest = store.put_file(source)

    restarted = FileArtifactStore(root)

    assert not leftover.exists()
    assert restarted.exists(digest)


def test_startup_keeps_recent_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    in_progress = FileArtifactStore(root).staging_dir() / "upload-running"
    in_progress.write_bytes(b"another process is writing this")

    FileArtifactStore(root, temp_max_age_s=3600)

    assert in_progress.exists()


def test_upload_stores_file(assembler: UploadAssembler[int], artifact_store: FileArtifactStore) -> None:
    content = random.Random(1).randbytes(MiB + 7)

    with assembler.begin(size_bytes=len(content), sha256=sha256_hex(content)) as upload:
        for start in range(0, len(content), 64 * 1024):
            upload.write(content[start : start + 64 * 1024])
        result = upload.commit()

    assert result.digest == format_digest(sha256_hex(content))
    assert result.size_bytes == len(content)
    assert result.validation == len(content)
    assert artifact_store.path_of(result.digest).read_bytes() == content
    assert list(artifact_store.staging_dir().iterdir()) == []


def test_upload_over_limit_declared(assembler: UploadAssembler[int], artifact_store: FileArtifactStore) -> None:
    with pytest.raises(UploadTooLargeError) as raised:
        assembler.begin(size_bytes=4 * MiB + 1)

    assert raised.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over the maximum of {4 * MiB} bytes" in str(raised.value)
    assert "raise the orchestrator's --max-upload-bytes" in str(raised.value)
    assert stored_files(artifact_store.root) == []


def test_upload_over_limit_received(assembler: UploadAssembler[int], artifact_store: FileArtifactStore) -> None:
    upload = assembler.begin()  # Size not declared: the limit applies to the bytes as they arrive.
    upload.write(b"\0" * (4 * MiB))

    with pytest.raises(UploadTooLargeError) as raised:
        upload.write(b"\0")

    assert "raise the orchestrator's --max-upload-bytes" in str(raised.value)
    assert stored_files(artifact_store.root) == []


def test_upload_more_than_declared(assembler: UploadAssembler[int], artifact_store: FileArtifactStore) -> None:
    upload = assembler.begin(size_bytes=10)

    with pytest.raises(InvalidUploadError, match="declared size_bytes=10"):
        upload.write(b"eleven byte")

    assert stored_files(artifact_store.root) == []


def test_upload_truncated(assembler: UploadAssembler[int], artifact_store: FileArtifactStore) -> None:
    upload = assembler.begin(size_bytes=1000)
    upload.write(b"\1" * 600)

    with pytest.raises(InvalidUploadError, match="truncated") as raised:
        upload.commit()

    assert raised.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert stored_files(artifact_store.root) == []


def test_upload_sha256_mismatch(assembler: UploadAssembler[int], artifact_store: FileArtifactStore) -> None:
    upload = assembler.begin(size_bytes=5, sha256=sha256_hex(b"other"))
    upload.write(b"bytes")

    with pytest.raises(InvalidUploadError, match="SHA-256"):
        upload.commit()

    assert stored_files(artifact_store.root) == []


def test_upload_malformed_sha256(assembler: UploadAssembler[int]) -> None:
    with pytest.raises(InvalidUploadError, match="invalid sha256"):
        assembler.begin(size_bytes=5, sha256="not-hex")


def test_upload_validation_rejects(artifact_store: FileArtifactStore) -> None:
    def reject(path: Path) -> None:
        raise ValueError(f"{path.name} is not an ONNX or TFLite model")

    assembler = UploadAssembler(artifact_store, max_size_bytes=MiB, validate=reject)
    upload = assembler.begin(size_bytes=4)
    upload.write(b"junk")

    with pytest.raises(UploadValidationError, match="not an ONNX") as raised:
        upload.commit()

    assert raised.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert stored_files(artifact_store.root) == []


def test_upload_abandoned_removes_temp(assembler: UploadAssembler[int], artifact_store: FileArtifactStore) -> None:
    with assembler.begin(size_bytes=100) as upload:
        upload.write(b"\2" * 50)
        assert upload.temp_path.exists()

    assert stored_files(artifact_store.root) == []


class UploadServicer(operator_pb2_grpc.OperatorServiceServicer):
    """UploadModel delegating to UploadAssembler.receive, as the orchestrator's handler does."""

    def __init__(self, assembler: UploadAssembler[int]) -> None:
        self.assembler = assembler

    def UploadModel(
        self, request_iterator: Iterator[operator_pb2.UploadModelRequest], context: grpc.ServicerContext
    ) -> operator_pb2.Model:
        try:
            header, result = self.assembler.receive(request_iterator)
        except UploadError as error:
            context.abort(error.status_code, str(error))
        return operator_pb2.Model(
            name=header.name, version=header.version, digest=result.digest, size_bytes=result.size_bytes
        )


@pytest.fixture
def operator_stub(assembler: UploadAssembler[int]) -> Iterator[operator_pb2_grpc.OperatorServiceStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(UploadServicer(assembler), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield operator_pb2_grpc.OperatorServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def upload_requests(content: bytes, size_bytes: int, sha256: str = "") -> Iterator[operator_pb2.UploadModelRequest]:
    header = operator_pb2.UploadModelHeader(
        name="resnet", version="1", size_bytes=size_bytes, sha256=sha256, filename="resnet.onnx"
    )
    yield operator_pb2.UploadModelRequest(header=header)
    for start in range(0, len(content), MiB):
        yield operator_pb2.UploadModelRequest(chunk=content[start : start + MiB])


def test_grpc_upload_stored(
    operator_stub: operator_pb2_grpc.OperatorServiceStub, artifact_store: FileArtifactStore
) -> None:
    content = random.Random(2).randbytes(3 * MiB)

    model = operator_stub.UploadModel(upload_requests(content, len(content), sha256_hex(content)))

    assert model.digest == format_digest(sha256_hex(content))
    assert artifact_store.path_of(model.digest).read_bytes() == content


def test_grpc_upload_over_limit(
    operator_stub: operator_pb2_grpc.OperatorServiceStub, artifact_store: FileArtifactStore
) -> None:
    content = b"\0" * (5 * MiB)

    with pytest.raises(grpc.RpcError) as raised:
        operator_stub.UploadModel(upload_requests(content, len(content)))

    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stored_files(artifact_store.root) == []


def test_grpc_upload_without_header(operator_stub: operator_pb2_grpc.OperatorServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        operator_stub.UploadModel(iter([operator_pb2.UploadModelRequest(chunk=b"data first")]))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def stored_artifact(artifact_store: FileArtifactStore, tmp_path: Path) -> tuple[str, bytes]:
    content = os.urandom(3 * MiB + 123)
    source = tmp_path / "artifact.bin"
    source.write_bytes(content)
    return artifact_store.put_file(source), content


def test_chunks_reassemble(artifact_store: FileArtifactStore, stored_artifact: tuple[str, bytes]) -> None:
    digest, content = stored_artifact

    chunks = list(iter_chunks(artifact_store, digest, offset=1000, chunk_size=256 * 1024))

    assert b"".join(chunk.data for chunk in chunks) == content[1000:]
    assert all(chunk.chunk_sha256 == sha256_hex(chunk.data) for chunk in chunks)
    assert all(chunk.total_size == len(content) for chunk in chunks)
    assert [chunk.offset for chunk in chunks] == list(range(1000, len(content), 256 * 1024))


def test_chunk_digests_cached(artifact_store: FileArtifactStore, stored_artifact: tuple[str, bytes]) -> None:
    digest, content = stored_artifact
    cache = ChunkDigestCache()
    first = [chunk.chunk_sha256 for chunk in iter_chunks(artifact_store, digest, cache=cache)]

    again = [chunk.chunk_sha256 for chunk in iter_chunks(artifact_store, digest, cache=cache)]

    assert len(cache) == len(first) == 13
    assert again == first
    assert cache.get(digest, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE) == sha256_hex(
        content[DEFAULT_CHUNK_SIZE : 2 * DEFAULT_CHUNK_SIZE]
    )


def test_chunk_digest_cache_bounded() -> None:
    cache = ChunkDigestCache(max_entries=2)
    cache.put("sha256:a", 4, 0, "first")
    cache.put("sha256:a", 4, 4, "second")
    cache.get("sha256:a", 4, 0)
    cache.put("sha256:a", 4, 8, "third")

    assert cache.get("sha256:a", 4, 4) is None
    assert cache.get("sha256:a", 4, 0) == "first"
    assert cache.get("sha256:a", 4, 8) == "third"


def test_chunk_size_capped(artifact_store: FileArtifactStore, stored_artifact: tuple[str, bytes]) -> None:
    digest, _ = stored_artifact

    largest = max(len(chunk.data) for chunk in iter_chunks(artifact_store, digest, chunk_size=64 * MiB))
    default = len(next(iter_chunks(artifact_store, digest)).data)

    assert largest == MAX_CHUNK_SIZE
    assert default == DEFAULT_CHUNK_SIZE


def test_chunks_at_end_offset(artifact_store: FileArtifactStore, stored_artifact: tuple[str, bytes]) -> None:
    digest, content = stored_artifact

    chunks = list(iter_chunks(artifact_store, digest, offset=len(content)))

    assert [(chunk.offset, chunk.data, chunk.total_size) for chunk in chunks] == [(len(content), b"", len(content))]


@pytest.mark.parametrize("offset", [-1, 3 * MiB + 124])
def test_chunks_offset_outside(
    artifact_store: FileArtifactStore, stored_artifact: tuple[str, bytes], offset: int
) -> None:
    digest, _ = stored_artifact

    with pytest.raises(InvalidDownloadError, match=f"offset {offset}") as raised:
        iter_chunks(artifact_store, digest, offset=offset)

    assert raised.value.status_code == grpc.StatusCode.INVALID_ARGUMENT


def test_chunks_unknown_digest(artifact_store: FileArtifactStore) -> None:
    with pytest.raises(DownloadNotFoundError) as raised:
        iter_chunks(artifact_store, format_digest(sha256_hex(b"missing")))

    assert raised.value.status_code == grpc.StatusCode.NOT_FOUND


def test_chunks_malformed_digest(artifact_store: FileArtifactStore) -> None:
    with pytest.raises(InvalidDownloadError, match="invalid digest"):
        iter_chunks(artifact_store, "sha1:abc")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """Mount a 1 MiB tmpfs and yield its path."""
    with mounted_tmpfs(tmp_path / "small-disk", "size=1m") as mount_point:
        yield mount_point


def test_upload_disk_full(small_disk: Path) -> None:
    artifact_store = FileArtifactStore(small_disk / "artifacts")
    upload = UploadAssembler(artifact_store, max_size_bytes=4 * MiB, validate=inspect_size).begin()

    with pytest.raises(UploadTooLargeError, match="disk is full") as raised:
        for _ in range(4):
            upload.write(b"\3" * (512 * 1024))

    assert raised.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stored_files(artifact_store.root) == []


def test_upload_disk_full_at_commit(small_disk: Path) -> None:
    """A chunk that fits in the file's buffer fails only when commit flushes it, and still reads as a full disk."""
    artifact_store = FileArtifactStore(small_disk / "artifacts")
    upload = UploadAssembler(artifact_store, max_size_bytes=4 * MiB, validate=inspect_size).begin()
    with open(small_disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 4096)
    upload.write(b"\3" * 100)

    with pytest.raises(UploadTooLargeError, match="disk is full") as raised:
        upload.commit()

    assert raised.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stored_files(artifact_store.root) == []
    assert list(artifact_store.staging_dir().iterdir()) == []


def test_upload_disk_full_at_start(tmp_path: Path) -> None:
    """A file system without a free inode rejects the upload's temp file, which reads as a full disk."""
    with mounted_tmpfs(tmp_path / "few-inodes", "size=1m,nr_inodes=16") as mount_point:
        artifact_store = FileArtifactStore(mount_point / "artifacts")
        staging = artifact_store.staging_dir()
        for index in itertools.count():
            try:
                (staging / f"filler-{index}").touch()
            except OSError:
                break

        with pytest.raises(UploadTooLargeError, match="disk is full, so the upload cannot start"):
            UploadAssembler(artifact_store, max_size_bytes=4 * MiB, validate=inspect_size).begin()
