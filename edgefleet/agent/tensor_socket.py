"""The tensor socket: a framed binary inference protocol on a Unix socket, for latency-critical apps.

The gRPC local API costs a few hundred microseconds per call in Python, more than a small model's
inference. This protocol carries the same Infer call as raw tensor bytes behind a short JSON header,
with large tensors in memory shared with the agent. docs/tensor-socket.md specifies the frames for
clients in other languages; tensor_socket_client.TensorSocketClient is the Python client."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import mmap
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edgefleet.agent.tensor_limits import check_shape
from edgefleet.common.files import check_socket_path, claim_socket_path
from edgefleet.common.logs import RepeatedErrors

if TYPE_CHECKING:
    from edgefleet.agent.runtime.host import InferenceResult

log = logging.getLogger(__name__)
# numpy dtype kinds with a fixed byte layout: bool, signed and unsigned integers, floats, complex.
NUMERIC_KINDS = "biufc"
_T = TypeVar("_T")

_LITTLE_ENDIAN = sys.byteorder == "little"

MAGIC = b"EFT1"
_PREFIX = struct.Struct("<4sIQ")
MAX_HEADER_BYTES = 1024 * 1024
# Largest payload accepted or returned, the same limit as the gRPC local API.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
# Connections served at once; each has its own thread. At the limit a new connection replaces the
# one idle longest, if that one has been idle for EVICT_IDLE_AFTER_S; otherwise it gets RESOURCE_EXHAUSTED
# with CONNECTION_LIMIT as its reason. An evicted connection still gets the replies to the requests
# that reached the agent before the eviction.
MAX_CONNECTIONS = 64
EVICT_IDLE_AFTER_S = 10.0
# Both ends poll this long for the next frame before blocking, when more than one CPU is usable. A
# blocked thread's CPU goes idle and waking it is slow: on a 2-core VM a 100 us poll cut the tiny
# model's round trip from about 155 us to 50 us (bench/bench_local_api.py). Each call costs at most this
# much CPU per side. With one CPU the poll would only delay the peer.
SPIN_S = 100e-6
# First step of a payload buffer's growth; each later step doubles it.
_PAYLOAD_GROWTH_BYTES = 1024 * 1024
# A server connection closes after this long without a complete request, and a reply send that makes
# no progress for SEND_TIMEOUT_S ends its connection. Clients reconnect by themselves.
IDLE_TIMEOUT_S = 300.0
SEND_TIMEOUT_S = 30.0
# Inputs of at least this many bytes go through shared memory when the client uses it: below it, the
# socket copy costs less than the region's bookkeeping.
SHARED_MEMORY_MIN_BYTES = 16 * 1024
SHARED_MEMORY_MIN_REGION = 1024 * 1024
# Parsed request headers kept per connection; an application uses one or a few.
MAX_PLANS_PER_CONNECTION = 16
ERROR_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "RESOURCE_EXHAUSTED")
# The reason of the error that a connection over the limit gets as its only frame, before the agent closes it.
CONNECTION_LIMIT = "CONNECTION_LIMIT"


class ProtocolError(ValueError):
    """A frame that breaks the framing rules; the connection cannot continue after it.

    http2 is whether the peer speaks HTTP/2 instead, as a gRPC client or server does.
    """

    def __init__(self, message: str, http2: bool = False) -> None:
        super().__init__(message)
        self.http2 = http2


class TensorSocketError(RuntimeError):
    """An error response from the agent: code is one of ERROR_CODES, and message names the fix.

    reason is CONNECTION_LIMIT when the agent rejected the connection, and empty otherwise.
    """

    def __init__(self, code: str, message: str, reason: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class TensorReply:
    """The outputs of one inference and what served it; latency_ms is the runtime call alone."""

    outputs: dict[str, np.ndarray]
    latency_ms: float
    model_name: str
    model_version: str
    variant_id: str


def _parse_dtype(name: str, dtype_name: object) -> np.dtype[Any]:
    if not isinstance(dtype_name, str):
        raise ValueError(f"input {name!r} has dtype {dtype_name!r}; use a numpy dtype name")
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        raise ValueError(f"input {name!r} has unknown dtype {dtype_name!r}; use a numpy dtype name") from None
    if dtype.kind not in NUMERIC_KINDS:
        raise ValueError(
            f"input {name!r} has dtype {dtype_name!r}; tensors travel as bool, integer, float or complex numbers"
        )
    if dtype.byteorder == ">":
        raise ValueError(
            f"input {name!r} has big-endian dtype {dtype_name!r}, but tensor data is little-endian; "
            f"name the dtype without a byte order, such as {dtype.newbyteorder('=').name!r}"
        )
    return dtype


def decode_array(name: str, dtype_name: str, shape: Sequence[int], data: memoryview | bytes) -> np.ndarray:
    """Interpret data as a little-endian C-order tensor; raise ValueError naming the tensor when they disagree."""
    dtype = _parse_dtype(name, dtype_name)
    dims = tuple(shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"input {name!r} has a negative dimension in shape {list(dims)}")
    expected = math.prod(dims) * dtype.itemsize  # Python integers: a huge shape cannot wrap around.
    if expected != len(data):
        raise ValueError(f"input {name!r}: shape {list(dims)} of {dtype.name} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(dims)


def array_bytes(array: np.ndarray) -> np.ndarray:
    """Return the array's bytes in C order and little-endian, as a flat uint8 array (a view when possible)."""
    if not (array.flags.c_contiguous and array.dtype.byteorder in "=<|" and _LITTLE_ENDIAN):
        array = np.ascontiguousarray(array)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return array.reshape(-1).view(np.uint8)


class FrameReader:
    """Reads frames from one connection, with a single recv for a frame that fits in its buffer."""

    def __init__(
        self,
        sock: socket.socket,
        max_payload: int = MAX_PAYLOAD_BYTES,
        buffer_bytes: int = 64 * 1024,
        spin_s: float = 0.0,
    ) -> None:
        self.sock = sock
        # Seconds to poll for the start of a frame before blocking. A blocked thread's CPU may go idle,
        # and waking it costs more than a short poll when the frame follows quickly.
        self.spin_s = spin_s
        self.max_payload = max_payload
        self._buffer = bytearray(buffer_bytes)
        self._start = 0  # Unconsumed bytes are self._buffer[self._start:self._end].
        self._end = 0
        self._fds: list[int] | None = None  # Collects passed file descriptors during read_with_fds.

    def _fill(self, size: int, spin_s: float | None = None) -> bool:
        """Buffer at least size unconsumed bytes; return False on a clean close before any of them.

        spin_s replaces self.spin_s for this call.
        """
        if spin_s is None:
            spin_s = self.spin_s
        if self._end - self._start >= size:
            return True
        if self._start + size > len(self._buffer):  # Move what is left to the front, growing if needed.
            pending = self._buffer[self._start : self._end]
            if size > len(self._buffer):
                self._buffer = bytearray(size)
            self._buffer[: len(pending)] = pending
            self._start, self._end = 0, len(pending)
        view = memoryview(self._buffer)
        while self._end - self._start < size:
            if self._fds is None:
                count = self._poll(view[self._end :], spin_s) if spin_s and self._end == self._start else -1
                if count < 0:
                    count = self.sock.recv_into(view[self._end :])
            else:
                data, fds, _, _ = socket.recv_fds(self.sock, len(self._buffer) - self._end, 4)
                self._fds.extend(fds)
                count = len(data)
                view[self._end : self._end + count] = data
            if count == 0:
                if self._end == self._start:
                    return False
                raise ConnectionError(
                    f"the peer closed the connection {self._end - self._start} bytes into a frame of at least {size}"
                )
            self._end += count
        return True

    def _poll(self, view: memoryview, spin_s: float) -> int:
        """Receive into view without blocking for up to spin_s; return the byte count, or -1 if none came."""
        deadline = time.perf_counter() + spin_s
        while True:
            try:
                return self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return -1

    def wait_frame(self) -> bool:
        """Block until bytes of the next frame are buffered; return False when the peer closed first."""
        return self._fill(1)

    def poll_frame(self, spin_s: float) -> bool:
        """Poll up to spin_s for the start of the next frame without blocking, and buffer what arrives.

        Returns True when bytes of the next frame are buffered or the peer closed, False when none came in time.
        """
        if self._end > self._start:
            return True
        self._start = self._end = 0
        count = self._poll(memoryview(self._buffer), spin_s)
        if count < 0:
            return False
        self._end = count
        return True

    def read(self) -> tuple[dict[str, Any], bytearray] | None:
        """Read one frame; return (header, payload), or None when the peer closed between frames.

        Raises ProtocolError for a bad magic, an oversized header or payload, or a header that is not a
        JSON object, and ConnectionError when the peer closes inside a frame.
        """
        frame = self.read_raw()
        return None if frame is None else (parse_header(frame[0]), frame[1])

    def read_with_fds(self) -> tuple[tuple[dict[str, Any], bytearray] | None, list[int]]:
        """Read one frame like read, and return with it the file descriptors passed along with it."""
        self._fds = []
        try:
            frame = self.read()
        finally:
            fds, self._fds = self._fds, None
        return frame, fds

    def read_raw(self, spin_s: float | None = None) -> tuple[bytes, bytearray] | None:
        """Read one frame like read, but return its header as the undecoded JSON bytes.

        spin_s replaces self.spin_s as the time to poll for the frame before blocking.
        """
        if not self._fill(_PREFIX.size, spin_s):
            return None

        magic, header_size, payload_size = _PREFIX.unpack_from(self._buffer, self._start)
        if magic != MAGIC:
            start = bytes(self._buffer[self._start : self._start + _PREFIX.size])
            if _is_http2(start):
                raise ProtocolError("the peer speaks HTTP/2 (gRPC), not the tensor socket protocol", http2=True)
            raise ProtocolError(f"frame starts with {magic!r}, not {MAGIC!r}; is the client speaking this protocol?")
        if header_size > MAX_HEADER_BYTES:
            raise ProtocolError(f"frame header of {header_size} bytes exceeds the limit of {MAX_HEADER_BYTES}")
        if payload_size > self.max_payload:
            raise ProtocolError(
                f"frame payload of {payload_size} bytes exceeds the limit of {self.max_payload}; send smaller batches"
            )

        if not self._fill(_PREFIX.size + header_size):
            raise ConnectionError("the peer closed the connection inside a frame header")
        self._start += _PREFIX.size
        header = bytes(self._buffer[self._start : self._start + header_size])
        self._start += header_size

        # The payload gets its own buffer, because arrays returned to the caller point into it. It grows
        # as data arrives, so a peer that announces 64 MiB and sends nothing does not cost 64 MiB.
        buffered = min(payload_size, self._end - self._start)
        payload = bytearray(self._buffer[self._start : self._start + buffered])
        self._start += buffered
        received = buffered
        while received < payload_size:
            payload.extend(bytes(min(payload_size - received, max(received, _PAYLOAD_GROWTH_BYTES))))
            view = memoryview(payload)
            while received < len(payload):
                count = self.sock.recv_into(view[received:])
                if count == 0:
                    raise ConnectionError(
                        f"the peer closed the connection after {received} of {payload_size} payload bytes"
                    )
                received += count
            view.release()

        if self._start == self._end:
            self._start = self._end = 0
        return header, payload


def parse_header(data: bytes) -> dict[str, Any]:
    """Decode a frame header; raise ProtocolError when it is not a UTF-8 JSON object."""
    try:
        header = json.loads(data)
    except (ValueError, RecursionError) as error:  # Also UnicodeDecodeError, and integers over 4300 digits.
        raise ProtocolError(f"frame header is not valid UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header is a JSON {type(header).__name__}, not an object")
    return header


def read_frame(sock: socket.socket, max_payload: int = MAX_PAYLOAD_BYTES) -> tuple[dict[str, Any], bytearray] | None:
    """Read one frame from a socket that no FrameReader reads; see FrameReader.read."""
    return FrameReader(sock, max_payload, buffer_bytes=_PREFIX.size).read()


def encode_header(header: Mapping[str, Any]) -> bytes:
    """Return a frame header as compact UTF-8 JSON."""
    return json.dumps(header, separators=(",", ":")).encode()


def encode_frame(header: bytes, payload_size: int = 0) -> bytes:
    """Return the frame prefix and the encoded header, which payload_size payload bytes must follow."""
    return _PREFIX.pack(MAGIC, len(header), payload_size) + header


def write_frame(sock: socket.socket, header: Mapping[str, Any] | bytes, buffers: Sequence[np.ndarray] = ()) -> None:
    """Send header (a mapping, or encode_header's bytes) and the flat uint8 buffers as one frame.

    Takes one system call when the socket accepts the whole frame at once.
    """
    encoded = header if isinstance(header, bytes) else encode_header(header)
    payload_size = sum(b.nbytes for b in buffers)
    pending: list[memoryview] = [memoryview(encode_frame(encoded, payload_size))]
    pending.extend(b.data for b in buffers if b.nbytes)
    while pending:
        sent = sock.sendmsg(pending)
        while pending and sent >= len(pending[0]):
            sent -= len(pending[0])
            pending.pop(0)
        if pending and sent:
            pending[0] = pending[0][sent:]


@dataclass(frozen=True)
class InferPlan:
    """A checked infer request header: the model and where each input lies in the payload.

    An application sends the same header for every frame of a stream, so the server parses it once
    per connection and reuses the plan.
    """

    model: str
    inputs: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int], ...]  # name, dtype, shape, start, end
    payload_bytes: int
    shared: bool = False  # The inputs lie in the connection's shared memory region, not in the payload.
    output_offset: int = 0  # Byte offset of the outputs in the shared region, above the client's inputs.

    @classmethod
    def parse(cls, request: Mapping[str, Any]) -> InferPlan:
        """Check an infer request header; raise ValueError naming the field or input that is wrong."""
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"'model' must name an installed model, got {model!r}")
        entries = request.get("inputs")
        if not isinstance(entries, list):
            raise ValueError(f"'inputs' must be a list of {{name, dtype, shape}} objects, got {_clip(repr(entries))}")
        inputs: list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]] = []
        offset = 0
        for entry in entries:
            if not isinstance(entry, dict) or not {"name", "dtype", "shape"} <= entry.keys():
                raise ValueError(f"input entry {_clip(repr(entry))} needs 'name', 'dtype' and 'shape'")
            name, shape = str(entry["name"]), entry["shape"]
            if any(name == earlier[0] for earlier in inputs):
                raise ValueError(f"input {name!r} appears twice in 'inputs'; send each input once")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise ValueError(f"input {name!r} has shape {_clip(repr(shape))}; use a list of integers")
            check_shape(name, shape)
            dtype = _parse_dtype(name, entry["dtype"]).newbyteorder("<")
            size = math.prod(shape) * dtype.itemsize
            inputs.append((name, dtype, tuple(shape), offset, offset + size))
            offset += size
        shared = request.get("shm", False)
        if not isinstance(shared, bool):
            raise ValueError(f"'shm' must be true or false, got {shared!r}")
        output_offset = request.get("output_offset", 0)
        if isinstance(output_offset, bool) or not isinstance(output_offset, int) or output_offset < 0:
            raise ValueError(f"'output_offset' must be a byte offset of 0 or more, got {_clip(repr(output_offset))}")
        return cls(model=model, inputs=tuple(inputs), payload_bytes=offset, shared=shared, output_offset=output_offset)

    def feeds(self, payload: bytearray | memoryview) -> dict[str, np.ndarray]:
        """Return the inputs as arrays over payload; raise ValueError when its size does not match."""
        if len(payload) != self.payload_bytes:
            shapes = _clip(", ".join(f"{name} {list(shape)} {dtype.name}" for name, dtype, shape, _, _ in self.inputs))
            raise ValueError(
                f"the inputs ({shapes}) take {self.payload_bytes} bytes, but the payload has {len(payload)}"
            )
        view = memoryview(payload)
        return {
            name: np.frombuffer(view[start:end], dtype=dtype).reshape(shape)
            for name, dtype, shape, start, end in self.inputs
        }


@dataclass
class _PreparedReply:
    """A shared-memory request that the host has prepared, with the layout and header of its reply."""

    inference: Any  # The host's PreparedInference.
    layout: tuple[tuple[np.dtype[Any], tuple[int, ...]], ...]  # dtype and shape of each output, in order.
    reply_prefix: bytes  # The reply header up to the latency value.


@dataclass
class _ServedConnection:
    """A connection's serving thread, and since when it has waited for a request (None while it serves one)."""

    thread: threading.Thread
    idle_since: float | None = field(default_factory=time.monotonic)


class TensorSocketServer:
    """Serves a ModelHost over the tensor socket protocol, one thread per connection.

    host is the agent's ModelHost (anything with infer(name, feeds) and list()). The socket is created
    with mode 0660, so the agent's user and group can connect.
    """

    def __init__(
        self,
        host: Any,
        socket_path: Path,
        max_connections: int = MAX_CONNECTIONS,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        """Prepare the server; raise ValueError when the socket path is too long for a Unix socket."""
        self.host = host
        self.socket_path = socket_path.absolute()
        check_socket_path(self.socket_path, "tensor socket", "--tensor-socket")
        self.max_connections = max_connections
        self.max_payload_bytes = max_payload_bytes  # Per request and per reply; also the largest shared region.
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, _ServedConnection] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._socket_inode = 0
        # Imported here so that applications importing the client do not load the runtimes.
        from edgefleet.agent.runtime.host import ModelNotFoundError

        self._not_found = ModelNotFoundError
        self._reply_prefixes: dict[tuple[object, ...], bytes] = {}
        self._failures = RepeatedErrors(log)  # A model that fails on every call logs one traceback.
        self._rejected_connections = 0

    def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        claim_socket_path(self.socket_path, "--tensor-socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)
        try:
            listener.bind(str(self.socket_path))
            self._socket_inode = self.socket_path.stat().st_ino
            listener.listen(self.max_connections)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="tensor-socket", daemon=True)
        self._accept_thread.start()
        log.info("tensor socket listening on %s", self.socket_path)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting, close every connection once its current call returns, and remove the socket."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # Wakes the thread blocked in accept().
            self._listener.close()
            self._listener = None
        if self._accept_thread is not None:
            self._accept_thread.join(grace_s)
            self._accept_thread = None
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # Wakes a thread waiting for the next request.
        deadline = time.monotonic() + grace_s
        for conn, served in connections.items():
            served.thread.join(max(deadline - time.monotonic(), 0.0))
            if served.thread.is_alive():  # Blocked sending a reply that the client does not read.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                served.thread.join(0.5)
        # Remove the socket only if it is still ours: another server may have claimed the path since.
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self._socket_inode:
                self.socket_path.unlink()

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # The listener was closed by stop().
            evicted: tuple[socket.socket, float] | None = None
            with self._lock:
                if len(self._connections) >= self.max_connections:
                    evicted = self._evict_idle()
                full = len(self._connections) >= self.max_connections
                if not full:
                    served = _ServedConnection(
                        threading.Thread(target=self._serve, args=(conn,), name="tensor-conn", daemon=True)
                    )
                    self._connections[conn] = served
            if evicted is not None:
                log.info("tensor socket: closed a connection idle for %.0f s to admit a new one", evicted[1])
            if full:
                self._reject(conn)
            else:
                served.thread.start()

    def _evict_idle(self) -> tuple[socket.socket, float] | None:
        """Evict the connection idle longest, if for EVICT_IDLE_AFTER_S or more; return it and its idle time.

        Call with self._lock held. The connection is shut down for reading only, while _serve cannot mark
        it busy: the client's later sends fail at once and make it reconnect. Its thread still replies
        to the requests already queued on it, then reads end of file and ends.
        """
        now = time.monotonic()
        idle = [
            (served.idle_since, conn) for conn, served in self._connections.items() if served.idle_since is not None
        ]
        if not idle:
            return None
        idle_since, conn = min(idle, key=lambda entry: entry[0])
        if now - idle_since < EVICT_IDLE_AFTER_S:
            return None
        del self._connections[conn]
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RD)
        return conn, now - idle_since

    def _reject(self, conn: socket.socket) -> None:
        """Reply RESOURCE_EXHAUSTED to a connection over max_connections and close it."""
        message = (
            f"the agent serves at most {self.max_connections} tensor socket connections, and none has been idle "
            f"for {EVICT_IDLE_AFTER_S:.0f} s; reuse a connection"
        )
        self._rejected_connections += 1
        # Log the first rejection and then every 100th, so that a client retrying in a loop does not flood the log.
        if self._rejected_connections % 100 == 1:
            log.warning("tensor socket: rejected a connection (%d so far): %s", self._rejected_connections, message)
        with conn, contextlib.suppress(OSError):
            write_frame(conn, {**_error("RESOURCE_EXHAUSTED", message), "reason": CONNECTION_LIMIT})

    def _serve(self, conn: socket.socket) -> None:
        set_timeouts(conn, receive_s=IDLE_TIMEOUT_S, send_s=SEND_TIMEOUT_S)
        reader = FrameReader(conn, self.max_payload_bytes, spin_s=default_spin_s())
        plans: dict[bytes, InferPlan] = {}  # By the raw header of the requests on this connection.
        region: mmap.mmap | None = None  # The connection's shared memory, once the client asked for it.
        prepared: dict[bytes, _PreparedReply] = {}  # Repeatable requests on region, by raw header.
        with self._lock:
            served = self._connections.get(conn)
        try:
            while not self._stopping.is_set() and served is not None:
                try:
                    served.idle_since = time.monotonic()
                    if not reader.wait_frame():
                        return
                    # Busy from the first byte, so that a later eviction cannot cut off this request. After an
                    # eviction just before this mark the thread still reads what was sent and replies. Only a
                    # request larger than the socket buffer then fails on the client's side, which retries once.
                    with self._lock:
                        served.idle_since = None
                    frame = reader.read_raw()
                    if frame is None:
                        return
                    raw_header, payload = frame
                    fast = prepared.get(raw_header)
                    if fast is not None and region is not None and not payload:
                        reply = self._infer_prepared(plans[raw_header], fast, region)
                        if reply is not None:
                            write_frame(conn, *reply)
                            continue
                        del prepared[raw_header]  # Another model version serves now.
                    plan = plans.get(raw_header)
                    if plan is None:
                        request = parse_header(raw_header)
                        op = request.get("op")
                        if op == "shm":
                            region = self._share_region(conn, request, region)
                            prepared.clear()
                            continue
                        if op != "infer":
                            write_frame(conn, *self._handle_other(request))
                            continue
                        try:
                            plan = InferPlan.parse(request)
                        except ValueError as error:
                            write_frame(conn, _error("INVALID_ARGUMENT", str(error)))
                            continue
                        if len(plans) >= MAX_PLANS_PER_CONNECTION:
                            plans.clear()
                            prepared.clear()
                        plans[raw_header] = plan
                except ProtocolError as error:
                    log.warning("tensor socket: closing a connection after an invalid frame: %s", error)
                    write_frame(conn, _error("INVALID_ARGUMENT", str(error)))
                    return
                write_frame(conn, *self._infer(plan, payload, region, prepared, raw_header))
        except OSError:
            pass  # The client disconnected, so no reply can reach it.
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _share_region(self, conn: socket.socket, request: dict[str, Any], region: mmap.mmap | None) -> mmap.mmap | None:
        """Reply to an shm request with a new sealed memfd of the requested size; return the region to use."""
        size = request.get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= self.max_payload_bytes:
            message = f"'bytes' must be an integer from 1 to {self.max_payload_bytes}, got {size!r}"
            log.warning("tensor socket: invalid shm request: %s", message)
            write_frame(conn, _error("INVALID_ARGUMENT", message))
            return region
        try:
            fd = os.memfd_create("edgefleet-tensors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as error:
            log.warning("tensor socket: cannot create a shared memory region of %d bytes: %s", size, error)
            message = f"the agent cannot create a shared memory region of {size} bytes: {error}; send tensors inline"
            write_frame(conn, _error("RESOURCE_EXHAUSTED", message))
            return region
        try:
            os.ftruncate(fd, size)
            # Sealed so that neither side can shrink the file under the other's mapping (SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            shared = mmap.mmap(fd, size)
            header = encode_header({"ok": True, "bytes": size})
            socket.send_fds(conn, [_PREFIX.pack(MAGIC, len(header), 0) + header], [fd])
        finally:
            os.close(fd)
        return shared

    def _handle_other(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
        op = request.get("op")
        if op == "models":
            return {"ok": True, "models": [_model_entry(m) for m in self.host.list()]}, []
        return _error("INVALID_ARGUMENT", f"unknown op {op!r}; use 'infer', 'models' or 'shm'"), []

    def _infer(
        self,
        plan: InferPlan,
        payload: bytearray,
        region: mmap.mmap | None,
        prepared: dict[bytes, _PreparedReply] | None = None,
        raw_header: bytes = b"",
    ) -> tuple[dict[str, Any] | bytes, list[np.ndarray]]:
        """Run one infer request and return the reply header and payload buffers.

        With prepared, a request whose inputs and outputs lie in region is recorded under raw_header,
        so that _infer_prepared can repeat it.
        """
        try:
            if plan.shared:
                if region is None or len(region) < plan.payload_bytes or payload:
                    raise ValueError(
                        f"inputs in shared memory need {plan.payload_bytes} bytes of a region set up with op 'shm' "
                        f"(this connection has {len(region) if region else 0}) and an empty payload ({len(payload)})"
                    )
                feeds = plan.feeds(memoryview(region)[: plan.payload_bytes])
            else:
                feeds = plan.feeds(payload)
            result = self.host.infer(plan.model, feeds)
            reply = self._reply(plan, result, region)
            if prepared is not None and plan.shared and _outputs_in_region(reply):
                self._prepare(plan, feeds, result, prepared, raw_header)
            return reply
        except Exception as error:
            return self._error_reply(plan.model, error)
        finally:
            feeds = {}  # Release the views of the region before the next request reuses it.

    def _error_reply(self, model: str, error: Exception) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Return the reply to an infer request that raised error; call it from the except block.

        A runtime failure is logged with its traceback, the first time per model and then sparsely.
        """
        if isinstance(error, ValueError):  # InvalidInputError is a ValueError as well.
            return _error("INVALID_ARGUMENT", str(error)), []
        if isinstance(error, self._not_found):
            return _error("NOT_FOUND", str(error)), []
        self._failures.exception(model, "tensor socket inference on model=%s failed", model)
        return _error("INTERNAL", f"inference failed: {error}"), []

    def _prepare(
        self,
        plan: InferPlan,
        feeds: dict[str, np.ndarray],
        result: InferenceResult,
        prepared: dict[bytes, _PreparedReply],
        raw_header: bytes,
    ) -> None:
        """Record a shared-memory request that got its outputs in the region, for _infer_prepared."""
        prepare = getattr(self.host, "prepare", None)
        if prepare is None:
            return
        try:
            inference = prepare(plan.model, feeds)
        except (ValueError, LookupError):  # The model changed since the call; the next request prepares again.
            return
        if inference is None:
            return
        served = inference.entry.info
        if (served.version, served.variant_id) != (result.model_version, result.variant_id):
            # Another version replaced the model after the call: the reply header of result would name
            # the old version for the new one's outputs. The next request prepares again.
            return
        layout = tuple((value.dtype, value.shape) for value in result.outputs.values())
        if len(prepared) >= MAX_PLANS_PER_CONNECTION:
            prepared.clear()
        prepared[raw_header] = _PreparedReply(inference, layout, self._reply_prefix(result, plan.output_offset))

    def _infer_prepared(
        self, plan: InferPlan, fast: _PreparedReply, region: mmap.mmap
    ) -> tuple[dict[str, Any] | bytes, list[np.ndarray]] | None:
        """Repeat a recorded request on the region's current inputs; return None when the model changed.

        Skips decoding the inputs and checking them again, and reuses the reply header while the outputs
        keep their dtypes and shapes.
        """
        try:
            result = self.host.infer_prepared(fast.inference)
        except Exception as error:
            return self._error_reply(plan.model, error)
        if result is None:
            return None
        outputs = result.outputs.values()
        if len(outputs) != len(fast.layout) or any(
            value.dtype != dtype or value.shape != shape
            for value, (dtype, shape) in zip(outputs, fast.layout, strict=True)
        ):
            reply = self._reply(plan, result, region)
            if _outputs_in_region(reply):  # The new outputs fit in the region: keep them.
                fast.layout = tuple((value.dtype, value.shape) for value in outputs)
                fast.reply_prefix = self._reply_prefix(result, plan.output_offset)
            return reply
        _pack(region, [array_bytes(value) for value in outputs], plan.output_offset)
        return fast.reply_prefix + repr(float(result.latency_ms)).encode() + b"}", []

    def _reply(
        self, plan: InferPlan, result: InferenceResult, region: mmap.mmap | None
    ) -> tuple[dict[str, Any] | bytes, list[np.ndarray]]:
        """Return the reply to plan's request for result, with the outputs in region when they fit there."""
        buffers = [array_bytes(value) for value in result.outputs.values()]
        output_bytes = sum(b.nbytes for b in buffers)
        in_region = plan.shared and region is not None and plan.output_offset + output_bytes <= len(region)
        if not in_region and output_bytes > self.max_payload_bytes:
            message = (
                f"the outputs of model {plan.model!r} take {output_bytes} bytes, over the reply limit of "
                f"{self.max_payload_bytes}; send fewer rows per call"
            )
            log.warning("tensor socket: %s", message)
            return _error("RESOURCE_EXHAUSTED", message), []
        output_offset = plan.output_offset if in_region else None
        header = self._reply_header(result, output_offset)
        if output_offset is not None:
            assert region is not None
            _pack(region, buffers, output_offset)
            return header, []
        return header, buffers

    def _reply_header(self, result: InferenceResult, output_offset: int | None) -> bytes:
        """Return the encoded header of a successful infer reply for result.

        output_offset is where the outputs lie in the shared region, or None when they travel in the payload.
        """
        return self._reply_prefix(result, output_offset) + repr(float(result.latency_ms)).encode() + b"}"

    def _reply_prefix(self, result: InferenceResult, output_offset: int | None) -> bytes:
        """Return the reply header for result up to the latency value, which ends it.

        Only the latency changes between replies of one model version and output layout, so the rest of
        the header is encoded once.
        """
        values = result.outputs
        key = (
            result.model_name,
            result.variant_id,
            result.model_version,
            output_offset,
            tuple((name, value.dtype.str, value.shape) for name, value in values.items()),
        )
        prefix = self._reply_prefixes.get(key)
        if prefix is None:
            outputs = [
                {"name": name, "dtype": value.dtype.name, "shape": list(value.shape)} for name, value in values.items()
            ]
            fixed: dict[str, Any] = {
                "ok": True,
                "model_name": result.model_name,
                "model_version": result.model_version,
                "variant_id": result.variant_id,
                "shm": output_offset is not None,
                "outputs": outputs,
            }
            if output_offset is not None:
                fixed["output_offset"] = output_offset
            prefix = encode_header(fixed)[:-1] + b',"latency_ms":'
            if len(self._reply_prefixes) >= MAX_PLANS_PER_CONNECTION * self.max_connections:
                self._reply_prefixes.clear()
            self._reply_prefixes[key] = prefix
        return prefix


def _outputs_in_region(reply: tuple[dict[str, Any] | bytes, list[np.ndarray]]) -> bool:
    """Return whether reply is a success whose outputs the agent wrote into the shared region."""
    header, buffers = reply
    return isinstance(header, bytes) and not buffers


def _pack(region: mmap.mmap, buffers: Sequence[np.ndarray], offset: int = 0) -> None:
    """Copy the flat uint8 buffers one after another into region, the first at offset."""
    for data in buffers:
        region[offset : offset + data.nbytes] = data.data
        offset += data.nbytes


def default_spin_s() -> float:
    """Return SPIN_S, or 0 with one usable CPU, where polling would only delay the peer."""
    return SPIN_S if len(os.sched_getaffinity(0)) > 1 else 0.0


# RFC 9113, section 3.4: an HTTP/2 client starts with this preface, and a server with a SETTINGS frame.
_HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP2_SETTINGS = 0x04


def _is_http2(start: bytes) -> bool:
    """Return whether the first bytes of a stream are an HTTP/2 client preface or a server's first frame."""
    if _HTTP2_CLIENT_PREFACE.startswith(start):
        return True
    # A frame header: 24-bit payload length, type, flags, then the stream id, which is 0 for SETTINGS.
    # A SETTINGS payload is a list of 6-byte entries.
    if len(start) < 9:
        return False
    length = int.from_bytes(start[:3], "big")
    stream_id = int.from_bytes(start[5:9], "big") & 0x7FFFFFFF
    return start[3] == _HTTP2_SETTINGS and stream_id == 0 and length % 6 == 0


def set_timeouts(sock: socket.socket, receive_s: float, send_s: float) -> None:
    """Bound each receive and send on sock; one that runs out raises BlockingIOError.

    Kernel timeouts keep the socket blocking, where Python's own timeout would poll() before each call.
    """
    for option, seconds in ((socket.SO_RCVTIMEO, receive_s), (socket.SO_SNDTIMEO, send_s)):
        whole = int(seconds)
        micros = max(int((seconds - whole) * 1e6), 0 if whole else 1)  # 0 would mean no timeout at all.
        sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, micros))


def _clip(text: str, limit: int = 200) -> str:
    """Shorten text for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


def _model_entry(model: Any) -> dict[str, Any]:
    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in specs]

    return {
        "model_name": model.name,
        "model_version": model.version,
        "variant_id": model.variant_id,
        "runtime": model.runtime,
        "providers": list(model.providers),
        "threads": model.threads,
        "inputs": tensors(model.inputs),
        "outputs": tensors(model.outputs),
    }
