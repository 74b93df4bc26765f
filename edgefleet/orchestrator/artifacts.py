"""Content-addressed artifact storage and the assembly of streamed model uploads into it."""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Generic, TypeVar

import grpc

from edgefleet.common.files import fsync_directory
from edgefleet.v1 import operator_pb2

logger = logging.getLogger(__name__)

DIGEST_ALGORITHM = "sha256"
DIGEST_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_COPY_BUFFER_BYTES = 1024 * 1024

T = TypeVar("T")


class ArtifactNotFoundError(LookupError):
    """No artifact with the requested digest is stored."""


def parse_digest(digest: str) -> str:
    """Return the lowercase hex part of a "sha256:<hex>" digest.

    Raises ValueError when the digest lacks the prefix or is not 64 hex digits.
    """
    if not digest.startswith(DIGEST_PREFIX):
        raise ValueError(f"invalid digest {digest!r}: expected 'sha256:' followed by 64 hex digits")
    hex_digest = digest[len(DIGEST_PREFIX) :].lower()
    if not _HEX_DIGEST.fullmatch(hex_digest):
        raise ValueError(f"invalid digest {digest!r}: expected 'sha256:' followed by 64 hex digits")
    return hex_digest


def format_digest(hex_digest: str) -> str:
    """Return the "sha256:<hex>" form of a hex SHA-256 digest."""
    return DIGEST_PREFIX + hex_digest.lower()


class ArtifactStore(abc.ABC):
    """Immutable blobs addressed by the SHA-256 of their content ("sha256:<hex>")."""

    @abc.abstractmethod
    def exists(self, digest: str) -> bool:
        """Return whether the artifact is stored. Raises ValueError for a malformed digest."""

    @abc.abstractmethod
    def size(self, digest: str) -> int:
        """Return the artifact's size in bytes. Raises ArtifactNotFoundError or ValueError."""

    @abc.abstractmethod
    def open(self, digest: str) -> BinaryIO:
        """Open the artifact for reading; the caller closes it. Raises ArtifactNotFoundError or ValueError."""

    @abc.abstractmethod
    def put_file(self, path: Path, *, digest: str | None = None, move: bool = False) -> str:
        """Store the content of a local file and return its digest.

        digest is the caller's already verified digest of the file, which skips hashing it again.
        With move=True the store may take the file over (it is gone afterwards). Storing content
        that is already present keeps the one stored copy, unless that copy no longer matches the
        digest because it was changed or damaged on disk. The new file then replaces it.
        """

    @abc.abstractmethod
    def delete(self, digest: str) -> bool:
        """Remove the artifact and return whether it was stored. Raises ValueError for a malformed digest.

        The caller checks first that nothing references the digest any more.
        """

    @abc.abstractmethod
    def staging_dir(self) -> Path:
        """Return a local directory for temporary files of uploads in progress.

        The store removes leftovers in it at start-up, so a crashed upload leaves nothing behind.
        """


class FileArtifactStore(ArtifactStore):
    """Artifacts as files under root/sha256/<first two hex digits>/<hex>, written atomically.

    A file appears under its final name only after its content is complete and flushed to disk:
    writes go to root/tmp, are fsynced and then renamed into place, and the directory is fsynced.
    Temporary files in root/tmp are removed at start-up when they are older than temp_max_age_s
    (0 removes all of them, which is right when one process owns the root).
    """

    def __init__(self, root: Path | str, *, temp_max_age_s: float = 0.0) -> None:
        self.root = Path(root)
        self._objects = self.root / DIGEST_ALGORITHM
        self._tmp = self.root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._remove_temp_files(temp_max_age_s)

    def path_of(self, digest: str) -> Path:
        """Return the file path an artifact has (or would have). Raises ValueError for a malformed digest."""
        hex_digest = parse_digest(digest)
        return self._objects / hex_digest[:2] / hex_digest

    def exists(self, digest: str) -> bool:
        return self.path_of(digest).is_file()

    def size(self, digest: str) -> int:
        path = self.path_of(digest)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"artifact {digest} not found in {self.root}") from None

    def open(self, digest: str) -> BinaryIO:
        path = self.path_of(digest)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"artifact {digest} not found in {self.root}") from None

    def staging_dir(self) -> Path:
        return self._tmp

    def delete(self, digest: str) -> bool:
        path = self.path_of(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_directory(path.parent)
        logger.info("removed artifact %s from %s", digest, self.root)
        return True

    def put_file(self, path: Path, *, digest: str | None = None, move: bool = False) -> str:
        source = Path(path)
        if digest is None:
            digest = format_digest(sha256_file(source))
        target = self.path_of(digest)
        if target.exists():
            stored_hex = sha256_file(target)
            if stored_hex == parse_digest(digest):
                logger.debug("artifact %s is already stored; keeping the stored copy", digest)
                if move:
                    source.unlink()
                return digest
            # Devices reject this copy by its digest, and their error tells operators to upload the
            # model again, so that upload must repair it.
            logger.warning(
                "stored artifact %s in %s has SHA-256 %s, so it was changed or damaged on disk; replacing it "
                "with the uploaded copy",
                digest,
                target,
                stored_hex,
            )

        if move and self._rename_into_place(source, target):
            return digest
        with self._temp_path() as temp:
            _copy_and_fsync(source, temp)
            self._rename_into_place(temp, target)
        if move:
            source.unlink()
        return digest

    def _rename_into_place(self, source: Path, target: Path) -> bool:
        """Fsync source, rename it to target and fsync the directories; False when they are on two devices."""
        with source.open("rb") as handle:
            os.fsync(handle.fileno())
        shard = target.parent
        created_shard = not shard.exists()
        shard.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, target)
        except OSError as error:
            if error.errno == errno.EXDEV:
                return False
            raise
        fsync_directory(shard)
        if created_shard:
            fsync_directory(self._objects)
        logger.info("stored artifact %s (%d bytes)", format_digest(target.name), target.stat().st_size)
        return True

    @contextmanager
    def _temp_path(self) -> Iterator[Path]:
        temp = self._tmp / f"{uuid.uuid4().hex}.tmp"
        try:
            yield temp
        finally:
            temp.unlink(missing_ok=True)

    def _remove_temp_files(self, max_age_s: float) -> None:
        now = time.time()
        removed = 0
        for entry in self._tmp.iterdir():
            try:
                if now - entry.lstat().st_mtime < max_age_s:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        if removed:
            logger.info("removed %d leftover temporary files from %s", removed, self._tmp)


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(_COPY_BUFFER_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _copy_and_fsync(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        shutil.copyfileobj(reader, writer, _COPY_BUFFER_BYTES)
        writer.flush()
        os.fsync(writer.fileno())


class UploadError(Exception):
    """An upload was rejected; status_code is the gRPC status a handler should return."""

    status_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


class InvalidUploadError(UploadError):
    """The upload stream or its header is malformed, truncated or fails its declared SHA-256."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class UploadTooLargeError(UploadError):
    """The upload is larger than the configured maximum, or the disk is full."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UploadValidationError(UploadError):
    """The complete, verified file was rejected by the validation callback (for example not a model)."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class UploadResult(Generic[T]):
    digest: str  # "sha256:<hex>" of the stored file.
    size_bytes: int
    validation: T  # Result of the validation callback, for example the model's metadata.


class Upload(Generic[T]):
    """One upload in progress: write chunks, then commit. Closing it uncommitted removes the temp file.

    Created by UploadAssembler.begin; use it as a context manager.
    """

    def __init__(
        self,
        store: ArtifactStore,
        max_size_bytes: int,
        validate: Callable[[Path], T],
        declared_size: int,
        declared_sha256: str,
        suffix: str,
    ) -> None:
        self._store = store
        self._max_size_bytes = max_size_bytes
        self._validate = validate
        self._declared_size = declared_size
        self._declared_sha256 = declared_sha256
        self._hash = hashlib.sha256()
        self._received = 0
        self._done = False
        self.temp_path = store.staging_dir() / f"upload-{uuid.uuid4().hex}{suffix}"
        try:
            self._file: BinaryIO | None = self.temp_path.open("xb")
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise UploadTooLargeError(
                    "the artifact store's disk is full, so the upload cannot start; free space on the orchestrator"
                ) from error
            raise

    @property
    def received_bytes(self) -> int:
        """Bytes written so far."""
        return self._received

    def write(self, chunk: bytes) -> None:
        """Append a chunk; raises UploadTooLargeError or InvalidUploadError before writing past a limit."""
        if self._file is None:
            raise InvalidUploadError("cannot write to an upload that is already committed or aborted")
        received = self._received + len(chunk)
        if received > self._max_size_bytes:
            self.abort()
            raise UploadTooLargeError(
                f"upload exceeds the maximum of {self._max_size_bytes} bytes after {received} bytes; "
                "upload a smaller model or raise the orchestrator's --max-upload-bytes"
            )
        if self._declared_size and received > self._declared_size:
            self.abort()
            raise InvalidUploadError(
                f"upload sent {received} bytes but its header declared size_bytes={self._declared_size}; "
                "send the file's exact size in the header"
            )
        try:
            self._file.write(chunk)
        except OSError as error:
            self.abort()
            if error.errno == errno.ENOSPC:
                raise UploadTooLargeError(
                    f"the artifact store's disk is full after {self._received} bytes of the upload; "
                    "free space on the orchestrator"
                ) from error
            raise
        self._hash.update(chunk)
        self._received = received

    def commit(self) -> UploadResult[T]:
        """Verify size and SHA-256, run the validation callback and store the file.

        Returns the stored digest, size and the callback's result. Raises InvalidUploadError for a
        truncated upload or a SHA-256 mismatch, and UploadValidationError when the callback raises.
        After any failure the temp file is gone and nothing is stored.
        """
        if self._file is None:
            raise InvalidUploadError("cannot commit an upload that is already committed or aborted")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            result = self._verify_and_validate()
            self._store.put_file(self.temp_path, digest=result.digest, move=True)
        except OSError as error:
            self.abort()
            if error.errno == errno.ENOSPC:
                raise UploadTooLargeError(
                    "the artifact store's disk is full while storing the upload; free space on the orchestrator"
                ) from error
            raise
        except BaseException:
            self.abort()
            raise
        self._done = True
        return result

    def _verify_and_validate(self) -> UploadResult[T]:
        if self._received == 0:
            raise InvalidUploadError("upload contains no data; send the file's bytes after the header")
        if self._declared_size and self._received != self._declared_size:
            raise InvalidUploadError(
                f"upload is truncated: received {self._received} of the {self._declared_size} bytes "
                "its header declared; send the whole file"
            )
        actual = self._hash.hexdigest()
        if self._declared_sha256 and actual != self._declared_sha256:
            raise InvalidUploadError(
                f"upload's SHA-256 is {actual} but its header declared {self._declared_sha256}; "
                "the file changed or was corrupted in transit, upload it again"
            )
        try:
            validation = self._validate(self.temp_path)
        except Exception as error:
            logger.info("upload of %d bytes failed validation: %s", self._received, error)
            raise UploadValidationError(f"uploaded file was rejected: {error}") from error
        return UploadResult(format_digest(actual), self._received, validation)

    def abort(self) -> None:
        """Close and remove the temp file; nothing is stored. Does nothing after a commit."""
        if self._done:
            return
        self._done = True
        if self._file is not None:
            # Closing flushes buffered bytes, which fails again on a full disk; the file is discarded anyway.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> Upload[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.abort()


class UploadAssembler(Generic[T]):
    """Assembles uploads into an ArtifactStore under a size limit, after a validation callback accepts them.

    validate receives the path of the complete temp file once its size and SHA-256 are verified. It
    returns a value for the caller, such as the model's metadata, or raises to reject the file.
    """

    def __init__(self, store: ArtifactStore, *, max_size_bytes: int, validate: Callable[[Path], T]) -> None:
        if max_size_bytes <= 0:
            raise ValueError(f"max_size_bytes must be positive, got {max_size_bytes}")
        self.store = store
        self.max_size_bytes = max_size_bytes
        self._validate = validate

    def begin(self, *, size_bytes: int = 0, sha256: str = "", suffix: str = "") -> Upload[T]:
        """Start an upload of size_bytes (0 if unknown) with an optional hex SHA-256 to check at the end.

        Raises UploadTooLargeError when size_bytes is over the maximum and InvalidUploadError for a
        malformed sha256; neither creates a file. suffix is appended to the temp file's name.
        """
        if size_bytes < 0:
            raise InvalidUploadError(f"size_bytes must not be negative, got {size_bytes}")
        if size_bytes > self.max_size_bytes:
            raise UploadTooLargeError(
                f"upload declares {size_bytes} bytes, over the maximum of {self.max_size_bytes} bytes; "
                "upload a smaller model or raise the orchestrator's --max-upload-bytes"
            )
        declared_sha256 = sha256.lower().removeprefix(DIGEST_PREFIX)
        if declared_sha256 and not _HEX_DIGEST.fullmatch(declared_sha256):
            raise InvalidUploadError(
                f"invalid sha256 {sha256!r} in the upload header: expected 64 hex digits or an empty string"
            )
        if "/" in suffix or os.sep in suffix:
            raise ValueError(f"invalid temp file suffix {suffix!r}: it must not contain a path separator")
        return Upload(self.store, self.max_size_bytes, self._validate, size_bytes, declared_sha256, suffix)

    def receive(
        self, requests: Iterable[operator_pb2.UploadModelRequest]
    ) -> tuple[operator_pb2.UploadModelHeader, UploadResult[T]]:
        """Consume an UploadModel request stream (the header first, then chunks) and store the file.

        Returns the header and the result. Raises InvalidUploadError when the header is missing, comes
        twice or the stream is empty, plus the errors of begin, Upload.write and Upload.commit.
        """
        iterator = iter(requests)
        first = next(iterator, None)
        if first is None or first.WhichOneof("body") != "header":
            raise InvalidUploadError("upload stream must start with a header message before any chunk")
        header = first.header
        suffix = temp_suffix(header.filename)
        with self.begin(size_bytes=header.size_bytes, sha256=header.sha256, suffix=suffix) as upload:
            for request in iterator:
                if request.WhichOneof("body") != "chunk":
                    raise InvalidUploadError("upload stream contains a second header; send the header once")
                upload.write(request.chunk)
            return header, upload.commit()


def temp_suffix(filename: str) -> str:
    """Return the file name's extension (".onnx") for a temp file, or "" unless it is 1-16 letters and digits."""
    suffix = Path(filename).suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,16}", suffix) else ""
