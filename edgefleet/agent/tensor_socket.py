"""The tensor socket: a framed binary inference protocol on a Unix socket, for latency-critical apps.

The gRPC local API costs a few hundred microseconds per call in Python, more than a small model's
inference. This protocol carries the same Infer call as raw tensor bytes behind a short JSON header,
one connection per application thread, and adds tens of microseconds.

Every message, request or response, is one frame (integers little-endian):

    magic     4 bytes   b"EFT1"
    header    u32       length of the JSON header in bytes
    payload   u64       length of the payload in bytes
    JSON header (UTF-8), then the payload: the tensors' bytes, in header order, C order, little-endian

Requests: {"op": "infer", "model": NAME, "inputs": [{"name", "dtype", "shape"}...]} with the inputs in
the payload, or {"op": "models"}. Responses: {"ok": true, "model_name", "model_version", "variant_id",
"latency_ms", "outputs": [{"name", "dtype", "shape"}...]} with the outputs in the payload, or
{"ok": true, "models": [...]}, or {"ok": false, "code": CODE, "message": TEXT} where CODE is one of
INVALID_ARGUMENT, NOT_FOUND, INTERNAL, RESOURCE_EXHAUSTED. dtype is a numpy dtype name (float32,
uint8, ...). A frame that breaks the framing gets an error response, and the server closes the connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_LITTLE_ENDIAN = sys.byteorder == "little"

MAGIC = b"EFT1"
_PREFIX = struct.Struct("<4sIQ")
MAX_HEADER_BYTES = 1024 * 1024
# Largest payload accepted or returned, the same limit as the gRPC local API.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
# Connections served at once; each has its own thread. Further ones get RESOURCE_EXHAUSTED.
MAX_CONNECTIONS = 64
# sun_path of struct sockaddr_un is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# Parsed request headers kept per connection; an application uses one or a few.
MAX_PLANS_PER_CONNECTION = 16
ERROR_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "RESOURCE_EXHAUSTED")


class ProtocolError(ValueError):
    """A frame that breaks the framing rules; the connection cannot continue after it."""


class TensorSocketError(RuntimeError):
    """An error response from the agent: code is one of ERROR_CODES, message says what to fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
    if dtype.hasobject:
        raise ValueError(f"input {name!r} has dtype {dtype_name!r}, which has no byte layout; use a numeric dtype")
    return dtype


def decode_array(name: str, dtype_name: str, shape: Sequence[int], data: memoryview | bytes) -> np.ndarray:
    """Interpret data as a little-endian C-order tensor; raise ValueError naming the tensor when they disagree."""
    dtype = _parse_dtype(name, dtype_name)
    dims = tuple(shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"input {name!r} has a negative dimension in shape {list(dims)}")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
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
        self, sock: socket.socket, max_payload: int = MAX_PAYLOAD_BYTES, buffer_bytes: int = 64 * 1024
    ) -> None:
        self.sock = sock
        self.max_payload = max_payload
        self._buffer = bytearray(buffer_bytes)
        self._start = 0  # Unconsumed bytes are self._buffer[self._start:self._end].
        self._end = 0

    def _fill(self, size: int) -> bool:
        """Buffer at least size unconsumed bytes; return False on a clean close before any of them."""
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
            count = self.sock.recv_into(view[self._end :])
            if count == 0:
                if self._end == self._start:
                    return False
                raise ConnectionError(
                    f"the peer closed the connection {self._end - self._start} bytes into a frame of at least {size}"
                )
            self._end += count
        return True

    def read(self) -> tuple[dict[str, Any], bytearray] | None:
        """Read one frame; return (header, payload), or None when the peer closed between frames.

        Raises ProtocolError for a bad magic, an oversized header or payload, or a header that is not a
        JSON object, and ConnectionError when the peer closes inside a frame.
        """
        frame = self.read_raw()
        return None if frame is None else (parse_header(frame[0]), frame[1])

    def read_raw(self) -> tuple[bytes, bytearray] | None:
        """Read one frame like read, but return its header as the undecoded JSON bytes."""
        if not self._fill(_PREFIX.size):
            return None
        magic, header_size, payload_size = _PREFIX.unpack_from(self._buffer, self._start)
        if magic != MAGIC:
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
        # The payload gets its own buffer: arrays returned to the caller point into it.
        payload = bytearray(payload_size)
        buffered = min(payload_size, self._end - self._start)
        payload[:buffered] = self._buffer[self._start : self._start + buffered]
        self._start += buffered
        view = memoryview(payload)
        received = buffered
        while received < payload_size:
            count = self.sock.recv_into(view[received:])
            if count == 0:
                raise ConnectionError(
                    f"the peer closed the connection after {received} of {payload_size} payload bytes"
                )
            received += count
        if self._start == self._end:
            self._start = self._end = 0
        return header, payload


def parse_header(data: bytes) -> dict[str, Any]:
    """Decode a frame header; raise ProtocolError when it is not a UTF-8 JSON object."""
    try:
        header = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"frame header is not UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header is a JSON {type(header).__name__}, not an object")
    return header


def read_frame(sock: socket.socket, max_payload: int = MAX_PAYLOAD_BYTES) -> tuple[dict[str, Any], bytearray] | None:
    """Read one frame from a socket that no FrameReader reads; see FrameReader.read."""
    return FrameReader(sock, max_payload, buffer_bytes=_PREFIX.size).read()


def encode_header(header: Mapping[str, Any]) -> bytes:
    """Return a frame header as compact UTF-8 JSON."""
    return json.dumps(header, separators=(",", ":")).encode()


def write_frame(sock: socket.socket, header: Mapping[str, Any] | bytes, buffers: Sequence[np.ndarray] = ()) -> None:
    """Send header (a mapping, or encode_header's bytes) and the flat uint8 buffers as one frame.

    Takes one system call when the socket accepts the whole frame at once.
    """
    encoded = header if isinstance(header, bytes) else encode_header(header)
    payload_size = sum(b.nbytes for b in buffers)
    pending: list[memoryview] = [memoryview(_PREFIX.pack(MAGIC, len(encoded), payload_size) + encoded)]
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

    @classmethod
    def parse(cls, request: Mapping[str, Any]) -> InferPlan:
        """Check an infer request header; raise ValueError naming the field or input that is wrong."""
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"'model' must name an installed model, got {model!r}")
        entries = request.get("inputs")
        if not isinstance(entries, list):
            raise ValueError(f"'inputs' must be a list of {{name, dtype, shape}} objects, got {entries!r}")
        inputs = []
        offset = 0
        for entry in entries:
            if not isinstance(entry, dict) or not {"name", "dtype", "shape"} <= entry.keys():
                raise ValueError(f"input entry {entry!r} needs 'name', 'dtype' and 'shape'")
            name, shape = str(entry["name"]), entry["shape"]
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise ValueError(f"input {name!r} has shape {shape!r}; use a list of integers")
            if any(d < 0 for d in shape):
                raise ValueError(f"input {name!r} has a negative dimension in shape {shape}")
            dtype = _parse_dtype(name, entry["dtype"]).newbyteorder("<")
            size = math.prod(shape) * dtype.itemsize
            inputs.append((name, dtype, tuple(shape), offset, offset + size))
            offset += size
        return cls(model=model, inputs=tuple(inputs), payload_bytes=offset)

    def feeds(self, payload: bytearray) -> dict[str, np.ndarray]:
        """Return the inputs as arrays over payload; raise ValueError when its size does not match."""
        if len(payload) != self.payload_bytes:
            shapes = ", ".join(f"{name} {list(shape)} {dtype.name}" for name, dtype, shape, _, _ in self.inputs)
            raise ValueError(
                f"the inputs ({shapes}) take {self.payload_bytes} bytes, but the payload has {len(payload)}"
            )
        view = memoryview(payload)
        return {
            name: np.frombuffer(view[start:end], dtype=dtype).reshape(shape)
            for name, dtype, shape, start, end in self.inputs
        }


class TensorSocketServer:
    """Serves a ModelHost over the tensor socket protocol, one thread per connection.

    host is the agent's ModelHost (anything with infer(name, feeds) and list()). The socket is created
    with mode 0660, so the agent's user and group can connect.
    """

    def __init__(self, host: Any, socket_path: Path, max_connections: int = MAX_CONNECTIONS) -> None:
        """Prepare the server; raise ValueError when the socket path is too long for a Unix socket."""
        self.host = host
        self.socket_path = socket_path.absolute()
        length = len(os.fsencode(self.socket_path))
        if length > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"tensor socket path {self.socket_path} is {length} bytes long, but a Unix socket path has at "
                f"most {MAX_SOCKET_PATH_BYTES}; set --tensor-socket or --state-dir to a shorter path"
            )
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._reply_prefixes: dict[tuple[str, str, tuple[tuple[str, str, tuple[int, ...]], ...]], bytes] = {}

    def start(self) -> None:
        from edgefleet.agent.runtime.host import ModelNotFoundError

        self._not_found = ModelNotFoundError
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)  # A socket left by a killed agent blocks the bind.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        listener.listen(self.max_connections)
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
        for thread in connections.values():
            thread.join(grace_s)
        self.socket_path.unlink(missing_ok=True)

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
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    thread = threading.Thread(target=self._serve, args=(conn,), name="tensor-conn", daemon=True)
                    self._connections[conn] = thread
            if full:
                self._refuse(conn)
            else:
                thread.start()

    def _refuse(self, conn: socket.socket) -> None:
        with conn:
            try:
                message = f"the agent serves at most {self.max_connections} tensor socket connections; reuse one"
                write_frame(conn, {"ok": False, "code": "RESOURCE_EXHAUSTED", "message": message})
            except OSError:
                pass

    def _serve(self, conn: socket.socket) -> None:
        reader = FrameReader(conn)
        plans: dict[bytes, InferPlan] = {}  # By the raw header of the requests on this connection.
        try:
            while not self._stopping.is_set():
                try:
                    frame = reader.read_raw()
                    if frame is None:
                        return
                    raw_header, payload = frame
                    plan = plans.get(raw_header)
                    if plan is None:
                        request = parse_header(raw_header)
                        if request.get("op") != "infer":
                            write_frame(conn, *self._handle_other(request))
                            continue
                        try:
                            plan = InferPlan.parse(request)
                        except ValueError as error:
                            write_frame(conn, _error("INVALID_ARGUMENT", str(error)))
                            continue
                        if len(plans) >= MAX_PLANS_PER_CONNECTION:
                            plans.clear()
                        plans[raw_header] = plan
                except ProtocolError as error:
                    write_frame(conn, _error("INVALID_ARGUMENT", str(error)))
                    return
                write_frame(conn, *self._infer(plan, payload))
        except OSError:
            pass  # The client went away; nothing to answer.
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _handle_other(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
        op = request.get("op")
        if op == "models":
            return {"ok": True, "models": [_model_entry(m) for m in self.host.list()]}, []
        return _error("INVALID_ARGUMENT", f"unknown op {op!r}; use 'infer' or 'models'"), []

    def _infer(self, plan: InferPlan, payload: bytearray) -> tuple[dict[str, Any] | bytes, list[np.ndarray]]:
        try:
            result = self.host.infer(plan.model, plan.feeds(payload))
        except ValueError as error:  # InvalidInputError is a ValueError as well.
            return _error("INVALID_ARGUMENT", str(error)), []
        except self._not_found as error:
            return _error("NOT_FOUND", str(error)), []
        except Exception as error:
            log.exception("tensor socket inference on model=%s failed", plan.model)
            return _error("INTERNAL", f"inference failed: {error}"), []
        values = result.outputs
        # Only the latency changes between replies of one model version and output layout, so the rest
        # of the header is encoded once: JSON text up to the latency value, which closes the object.
        key = (result.variant_id, result.model_version, tuple((n, v.dtype.str, v.shape) for n, v in values.items()))
        prefix = self._reply_prefixes.get(key)
        if prefix is None:
            outputs = [{"name": n, "dtype": v.dtype.name, "shape": list(v.shape)} for n, v in values.items()]
            fixed = {
                "ok": True,
                "model_name": result.model_name,
                "model_version": result.model_version,
                "variant_id": result.variant_id,
                "outputs": outputs,
            }
            prefix = encode_header(fixed)[:-1] + b',"latency_ms":'
            if len(self._reply_prefixes) >= MAX_PLANS_PER_CONNECTION * self.max_connections:
                self._reply_prefixes.clear()
            self._reply_prefixes[key] = prefix
        header = prefix + repr(float(result.latency_ms)).encode() + b"}"
        return header, [array_bytes(v) for v in values.values()]


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


class TensorSocketClient:
    """A connection to an agent's tensor socket. Calls from several threads are serialised on it.

    Use one client per application thread for parallel calls. A call that finds the connection broken
    (the agent restarted) reconnects and retries once, which is safe because inference has no side effects.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout_s: float | None = 30.0) -> None:
        """Connect; raise ConnectionError naming the path when no agent listens there."""
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._reader: FrameReader | None = None
        self._headers: dict[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]], bytes] = {}
        self._connect()

    def _connect(self) -> FrameReader:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout_s is not None:
            # Kernel timeouts keep the socket blocking: Python's own timeout would poll() before each call.
            seconds = int(self.timeout_s)
            timeval = struct.pack("ll", seconds, int((self.timeout_s - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            sock.connect(str(self.socket_path))
        except OSError as error:
            sock.close()
            raise ConnectionError(
                f"cannot connect to the tensor socket {self.socket_path}: {error.strerror or error}; "
                "is edgefleet-agent running, and may this user open the socket?"
            ) from error
        self._reader = FrameReader(sock)
        return self._reader

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.sock.close()
                self._reader = None

    def __enter__(self) -> TensorSocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, header: Mapping[str, Any] | bytes, buffers: Sequence[np.ndarray]
    ) -> tuple[dict[str, Any], bytearray]:
        with self._lock:
            for attempt in (1, 2):
                reader = self._reader or self._connect()
                try:
                    frame = _exchange(reader, header, buffers)
                except ConnectionError as error:
                    reader.sock.close()
                    self._reader = None
                    if attempt == 2:
                        raise ConnectionError(f"tensor socket {self.socket_path}: {error}") from error
                    continue
                except (OSError, ProtocolError) as error:
                    reader.sock.close()  # A timeout or a garbled reply leaves the stream out of step.
                    self._reader = None
                    if isinstance(error, BlockingIOError):  # SO_RCVTIMEO or SO_SNDTIMEO ran out.
                        raise TimeoutError(
                            f"the agent did not answer on {self.socket_path} within {self.timeout_s} s"
                        ) from error
                    raise
                break
        reply, payload = frame
        if not reply.get("ok"):
            raise TensorSocketError(str(reply.get("code", "INTERNAL")), str(reply.get("message", "")))
        return reply, payload

    def infer(self, model: str, feeds: Mapping[str, np.ndarray]) -> TensorReply:
        """Run model on feeds (input name to array) in the agent and return its outputs.

        Raises TensorSocketError with code NOT_FOUND for a model that is not installed, INVALID_ARGUMENT
        for inputs that do not match it, INTERNAL when the runtime fails; ConnectionError when the agent
        cannot be reached.
        """
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        # The same model and input layout gives the same header: encode it once.
        key = (model, tuple((name, a.dtype.str, a.shape) for name, a in arrays.items()))
        header = self._headers.get(key)
        if header is None:
            inputs = [{"name": name, "dtype": a.dtype.name, "shape": list(a.shape)} for name, a in arrays.items()]
            header = encode_header({"op": "infer", "model": model, "inputs": inputs})
            if len(self._headers) >= MAX_PLANS_PER_CONNECTION:
                self._headers.clear()
            self._headers[key] = header
        reply, payload = self._call(header, [array_bytes(a) for a in arrays.values()])
        view = memoryview(payload)
        outputs: dict[str, np.ndarray] = {}
        offset = 0
        for entry in reply["outputs"]:
            dtype = np.dtype(entry["dtype"]).newbyteorder("<")
            size = math.prod(entry["shape"]) * dtype.itemsize
            outputs[entry["name"]] = np.frombuffer(view[offset : offset + size], dtype=dtype).reshape(entry["shape"])
            offset += size
        return TensorReply(
            outputs=outputs,
            latency_ms=float(reply["latency_ms"]),
            model_name=str(reply["model_name"]),
            model_version=str(reply["model_version"]),
            variant_id=str(reply["variant_id"]),
        )

    def models(self) -> list[dict[str, Any]]:
        """Return the models the agent serves, with runtime, providers, threads, inputs and outputs."""
        reply, _ = self._call({"op": "models"}, ())
        return list(reply["models"])


def _exchange(
    reader: FrameReader, header: Mapping[str, Any] | bytes, buffers: Sequence[np.ndarray]
) -> tuple[dict[str, Any], bytearray]:
    """Send one request frame and read its reply; raise ConnectionError when the connection broke."""
    try:
        write_frame(reader.sock, header, buffers)
    except ConnectionError:
        # The agent may have answered and closed before reading the request, as it does at its
        # connection limit: that answer is still in the receive queue.
        frame = reader.read()
        if frame is None or frame[0].get("ok", True):
            raise
        return frame
    frame = reader.read()
    if frame is None:
        raise ConnectionError("the agent closed the connection")
    return frame
