"""TensorSocketClient: the Python client of the agent's tensor socket (see tensor_socket.py)."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import mmap
import os
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from edgefleet.agent.tensor_limits import check_shape
from edgefleet.agent.tensor_socket import (
    CONNECTION_LIMIT,
    MAX_PAYLOAD_BYTES,
    MAX_PLANS_PER_CONNECTION,
    NUMERIC_KINDS,
    SHARED_MEMORY_MIN_BYTES,
    SHARED_MEMORY_MIN_REGION,
    FrameReader,
    ProtocolError,
    TensorReply,
    TensorSocketError,
    array_bytes,
    default_spin_s,
    encode_frame,
    encode_header,
    parse_header,
    set_timeouts,
    write_frame,
)
from edgefleet.common.files import MAX_SOCKET_PATH_BYTES, access_group

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Hybrid polling of replies (TensorSocketClient(hybrid_poll=True)): the client wakes this long before the
# shortest recent round trip, to cover sleep overshoot (timer slack is 50 us by default) and wake-up time,
# and polls at most HYBRID_POLL_MAX_SPIN_S per call before it blocks.
HYBRID_POLL_LEAD_S = 200e-6
HYBRID_POLL_MAX_SPIN_S = 1e-3
# The client asks for the outputs at the first multiple of this after its inputs in the shared region.
_OUTPUT_ALIGNMENT = 64


class _Connection:
    """One socket to the agent with its frame reader and, once set up, its shared memory region."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(sock, spin_s=default_spin_s())
        self.region: mmap.mmap | None = None
        # The region as flat bytes, and the address of its first byte, to spot arrays that already lie in it.
        self.region_bytes: np.ndarray | None = None
        self.region_address = 0
        # Repeated calls whose inputs all lie in place in the region, by _prepared_key.
        self.prepared: dict[tuple[object, ...], _PreparedCall] = {}

    def replace_region(self, region: mmap.mmap | None) -> None:
        """Unmap the current shared region, if any, and use region from now on."""
        self.prepared.clear()
        self.region_bytes = None
        self.region_address = 0
        if self.region is not None:
            # Arrays from input_arrays, or a caller's views of them, keep the old region mapped until they are
            # freed: mmap.close() raises BufferError while any buffer export is alive.
            with contextlib.suppress(BufferError):
                self.region.close()
        self.region = region
        if region is not None:
            self.region_bytes = np.frombuffer(region, np.uint8)
            self.region_address = _address(self.region_bytes)

    def close(self) -> None:
        self.replace_region(None)
        self.sock.close()


@dataclass(frozen=True)
class _PreparedCall:
    """A zero-copy infer call seen before on this connection, and the reply it got.

    A reply whose header is reply_prefix followed by a number and "}" differs from the recorded one
    only in latency_ms, so it needs no JSON parsing: the outputs lie in the region where they lay before.
    """

    frame: bytes  # The whole request frame: prefix and header, with an empty payload.
    header: bytes
    reply_prefix: bytes  # The reply header up to and including '"latency_ms":'.
    reply: dict[str, Any]
    outputs: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int], ...]  # name, dtype, shape, offset, count


class _ReplyPoller:
    """Hybrid polling for infer replies, as Linux's block layer does for fast devices.

    After a request it sleeps until HYBRID_POLL_LEAD_S before the shortest of the last ROUND_TRIP_WINDOW
    round trips of the same request header, then polls the socket without blocking. When no reply comes
    within HYBRID_POLL_MAX_SPIN_S of polling, it blocks in recv as usual. A miss usually means that other
    processes slow the inference, and polling would take CPU time from it. So the next calls skip the
    sleep and the poll: 1 call after the first miss in a row, then twice as many after each further
    miss, up to MAX_SKIPPED_CALLS.
    """

    ROUND_TRIP_WINDOW = 16
    MAX_SKIPPED_CALLS = 64

    def __init__(self) -> None:
        self._round_trips: dict[bytes, collections.deque[float]] = {}
        self._skip_calls = 0  # Calls left that read the reply without hybrid polling.
        self._backoff_calls = 0  # Calls to skip after the next miss.

    def read_raw(self, reader: FrameReader, header: bytes) -> tuple[bytes, bytearray] | None:
        """Wait for the reply to the request with header just sent, and read it like FrameReader.read_raw."""
        sent_at = time.perf_counter()
        round_trips = self._round_trips.get(header)
        if round_trips is None:
            round_trips = self._round_trips[header] = collections.deque(maxlen=self.ROUND_TRIP_WINDOW)
            if len(self._round_trips) > MAX_PLANS_PER_CONNECTION:
                self._round_trips = {header: round_trips}
        if self._skip_calls:
            self._skip_calls -= 1
            frame = reader.read_raw()
            round_trips.append(time.perf_counter() - sent_at)
            return frame

        if round_trips:
            wake_at = sent_at + min(round_trips) - HYBRID_POLL_LEAD_S
            sleep_s = wake_at - time.perf_counter()
            if sleep_s > 0:
                time.sleep(sleep_s)
        # The reader polls spin_s itself before it blocks, so the two polls together stay in the bound.
        arrived = reader.poll_frame(HYBRID_POLL_MAX_SPIN_S - reader.spin_s)
        arrived_at = time.perf_counter()

        frame = reader.read_raw()
        if arrived:
            self._backoff_calls = 0
        else:
            arrived_at = time.perf_counter()
            self._backoff_calls = min(max(1, 2 * self._backoff_calls), self.MAX_SKIPPED_CALLS)
            self._skip_calls = self._backoff_calls
        # A reply that was already there when the poll began arrived earlier than arrived_at. Recording
        # arrived_at still lowers the minimum, because the sleep ends HYBRID_POLL_LEAD_S before it.
        round_trips.append(arrived_at - sent_at)
        return frame


class TensorSocketClient:
    """A connection to an agent's tensor socket. Calls from several threads are serialised on it.

    Use one client per application thread for parallel calls. A call that finds the connection broken
    (the agent restarted) reconnects and retries once, which is safe because inference has no side effects.
    With shared_memory, inputs of SHARED_MEMORY_MIN_BYTES or more travel through a memory region that
    the agent shares with this connection. The client copies them there once and the runtime reads them
    in place. Arrays from input_arrays already lie in the region, so an application that writes its inputs
    into them makes infer copy nothing. The outputs come back the same way, so large tensors cross no
    socket. With hybrid_poll, the client sleeps through most of each inference and then polls for the
    reply (see _ReplyPoller), which costs CPU time while the agent computes.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        timeout_s: float | None = 30.0,
        shared_memory: bool = True,
        hybrid_poll: bool = False,
    ) -> None:
        """Prepare a client of the tensor socket at socket_path, which connects on its first call.

        So an application may start before the agent: its calls raise ConnectionError until the agent
        listens. Raises ValueError when socket_path is too long for a Unix socket.
        timeout_s bounds each wait for the agent (None waits forever); raises ValueError when it is 0 or less.
        hybrid_poll has no effect with one usable CPU, where polling would take the agent's CPU.
        """
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be above 0 or None to wait forever, got {timeout_s!r}")
        self.socket_path = Path(socket_path)
        length = len(os.fsencode(self.socket_path))
        if length > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"tensor socket path {self.socket_path} is {length} bytes long, but a Unix socket path has at most "
                f"{MAX_SOCKET_PATH_BYTES}; connect through a shorter path, such as a symbolic link to its folder"
            )
        self.timeout_s = timeout_s
        self.shared_memory = shared_memory
        self.hybrid_poll = hybrid_poll
        # Input bytes that infer copied into the shared region: 0 while every input comes from input_arrays.
        self.copied_input_bytes = 0
        self._poller = _ReplyPoller() if hybrid_poll and default_spin_s() > 0 else None
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._headers: dict[tuple[object, ...], bytes] = {}
        self._run_times: dict[bytes, float] = {}  # The last reply's latency_ms in seconds, by infer request header.
        self._output_bytes = 0  # The largest output payload so far, to size the next region.
        self._listed_output_bytes: dict[str, int] = {}  # By model, from the model list when its shapes are fixed.
        self._warned_overwritten = False
        _clients.add(self)

    def _connect(self) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout_s is not None:
            set_timeouts(sock, receive_s=self.timeout_s, send_s=self.timeout_s)
        try:
            sock.connect(str(self.socket_path))
        except BaseException as error:
            sock.close()
            if isinstance(error, PermissionError):
                raise PermissionError(error.errno, _permission_message(self.socket_path)) from error
            if not isinstance(error, OSError):
                raise
            kind = _non_socket_kind(self.socket_path)
            if kind:
                raise ConnectionError(
                    f"cannot connect to the tensor socket {self.socket_path}: it is a {kind}, not a socket; "
                    "give the path of the agent's --tensor-socket"
                ) from error
            raise ConnectionError(
                f"cannot connect to the tensor socket {self.socket_path}: {error.strerror or error}; "
                "is edgefleet-agent running?"
            ) from error
        self._connection = _Connection(sock)
        return self._connection

    def _detach_after_fork(self) -> None:
        """Forget the connection inherited from the parent process, in a child right after fork().

        The child shares the parent's socket and MAP_SHARED region, so its requests and replies would
        mix with the parent's. Closing the inherited descriptors sends nothing to the agent, so the
        parent keeps its connection. The child's next call connects with its own region.
        """
        self._lock = threading.Lock()  # Another thread of the parent may have held it at the fork.
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> TensorSocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, work: Callable[[_Connection], _T]) -> _T:
        """Run one exchange on the connection, reconnecting and retrying once when it broke.

        Any exception other than an error reply that the agent sent in full closes the connection, and
        with it the shared region, before it propagates. An exchange cut short (KeyboardInterrupt, a
        malformed reply) leaves its reply unread, and the next request on the same connection would read
        that reply, or find outputs of the cut request in the region. The next call reconnects instead.
        """
        with self._lock:
            attempt = 1
            while True:
                connection = self._connection or self._connect()
                try:
                    return work(connection)
                except ConnectionError as error:
                    self._drop(connection)
                    if attempt == 2:
                        raise ConnectionError(f"tensor socket {self.socket_path}: {error}") from error
                    attempt += 1
                except TensorSocketError as error:
                    if error.reason == CONNECTION_LIMIT:  # The agent has closed this connection.
                        self._drop(connection)
                    raise
                except (OSError, ProtocolError) as error:
                    self._drop(connection)  # A timeout or a garbled reply leaves the stream out of step.
                    if isinstance(error, BlockingIOError):  # SO_RCVTIMEO or SO_SNDTIMEO ran out.
                        raise TimeoutError(
                            f"the agent did not respond on {self.socket_path} within {self.timeout_s} s; "
                            "is it overloaded?"
                        ) from error
                    if isinstance(error, ProtocolError) and error.http2:
                        raise ProtocolError(_grpc_socket_message(self.socket_path), http2=True) from error
                    raise
                except BaseException:
                    self._drop(connection)
                    raise

    def _drop(self, connection: _Connection) -> None:
        """Close connection and its shared region, so that the next call connects afresh."""
        if self._connection is connection:
            self._connection = None
        connection.close()

    def _region(self, connection: _Connection, need: int) -> mmap.mmap:
        """Return the connection's shared region, asking the agent for a larger one when it is under need bytes."""
        if connection.region is not None and len(connection.region) >= need:
            return connection.region
        size = min(MAX_PAYLOAD_BYTES, max(SHARED_MEMORY_MIN_REGION, 1 << (need - 1).bit_length()))
        try:
            write_frame(connection.sock, {"op": "shm", "bytes": size})
        except ConnectionError:
            _raise_pending_error(connection.reader)
            raise
        frame, fds = connection.reader.read_with_fds()
        try:
            if frame is None:
                raise ConnectionError("the agent closed the connection")
            _check(frame)
            if len(fds) != 1:
                raise ProtocolError(f"the shm reply carried {len(fds)} file descriptors, not 1")
            region = mmap.mmap(fds[0], size)
        finally:
            for fd in fds:
                os.close(fd)
        if connection.region is not None:
            log.debug("tensor socket: shared region grows to %d bytes; earlier input arrays get copied", size)
        connection.replace_region(region)
        return region

    def _shared_region(self, connection: _Connection, need: int) -> mmap.mmap | None:
        """Return the region as _region does, or None when the agent rejects the request for shared memory.

        A RESOURCE_EXHAUSTED rejection of the region turns shared memory off for this client, so later calls
        send inline. A rejection of the connection at the agent's connection limit is raised instead.
        """
        try:
            return self._region(connection, need)
        except TensorSocketError as error:
            if error.code != "RESOURCE_EXHAUSTED" or error.reason == CONNECTION_LIMIT:
                raise
            log.warning("tensor socket: sending tensors inline from now on: %s", error.message)
            self.shared_memory = False
            return None

    def _header(self, model: str, arrays: Mapping[str, np.ndarray], shared: bool) -> bytes:
        """Return the encoded infer header; the same model and input layout give the same bytes, encoded once."""
        key = (model, shared, tuple((name, a.dtype.str, a.shape) for name, a in arrays.items()))
        header = self._headers.get(key)
        if header is None:
            inputs = [{"name": name, "dtype": a.dtype.name, "shape": list(a.shape)} for name, a in arrays.items()]
            request: dict[str, Any] = {"op": "infer", "model": model, "inputs": inputs, "shm": shared}
            if shared:
                request["output_offset"] = _output_offset(sum(a.nbytes for a in arrays.values()))
            header = encode_header(request)
            if len(self._headers) >= MAX_PLANS_PER_CONNECTION:
                self._headers.clear()
            self._headers[key] = header
        return header

    def input_arrays(
        self,
        model: str,
        shapes: Mapping[str, Sequence[int]] | None = None,
        dtypes: Mapping[str, npt.DTypeLike] | None = None,
    ) -> dict[str, np.ndarray]:
        """Allocate model's inputs in the connection's shared region, so that infer sends them without a copy.

        Names, dtypes and shapes come from the agent's model list. shapes sets the shape of an input with a
        dynamic axis (-1), and its other axes must keep their listed sizes. With dtypes the caller describes
        the inputs instead.
        Its keys are the input names in order, shapes gives every shape, and the model list is not read.
        The arrays are uninitialised like np.empty and packed from the start of the region. The region
        has room for one set, so a later call returns arrays over the same memory. Pass the returned dict (or its
        arrays in the same order) to infer. The arrays stay valid memory for as long as they live, also
        after close, a reconnect or a larger region, but from then on infer copies them: call
        input_arrays again. Without shared memory (shared_memory=False, or an agent that cannot share
        it) the arrays are ordinary ones, which infer copies.

        Raises ValueError for a shape or dtype that is missing or invalid, TensorSocketError with code
        NOT_FOUND when the agent serves no such model, and ConnectionError or TimeoutError as infer does.
        """
        specs = self._input_specs(model, shapes, dtypes)
        for name, shape, _ in specs:
            check_shape(name, shape)  # The agent would reject a larger input, and np.empty might not fit.
        input_bytes = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in specs)
        need = _output_offset(input_bytes) + max(self._output_bytes, self._listed_output_bytes.get(model, 0))

        def allocate(connection: _Connection) -> dict[str, np.ndarray] | None:
            if self._shared_region(connection, need) is None:
                return None
            region_bytes = connection.region_bytes
            assert region_bytes is not None
            arrays: dict[str, np.ndarray] = {}
            offset = 0
            for name, shape, dtype in specs:
                size = math.prod(shape) * dtype.itemsize
                arrays[name] = region_bytes[offset : offset + size].view(dtype).reshape(shape)
                offset += size
            return arrays

        arrays = None
        if self.shared_memory and input_bytes <= MAX_PAYLOAD_BYTES:
            arrays = self._run(allocate)
        if arrays is None:
            return {name: np.empty(shape, dtype) for name, shape, dtype in specs}
        return arrays

    def _input_specs(
        self,
        model: str,
        shapes: Mapping[str, Sequence[int]] | None,
        dtypes: Mapping[str, npt.DTypeLike] | None,
    ) -> list[tuple[str, tuple[int, ...], np.dtype[Any]]]:
        """Return (name, shape, dtype) of each input of model, from the caller or the agent's model list."""
        shapes = dict(shapes or {})
        # Name, dtype and the model's listed shape of each input, which is None when the caller gives dtypes.
        listed: list[tuple[str, npt.DTypeLike, Sequence[int] | None]]
        if dtypes is not None:
            missing = [name for name in dtypes if name not in shapes]
            if missing:
                raise ValueError(f"inputs {missing} have a dtype but no shape; pass shapes for every input in dtypes")
            _check_names(dtypes)
            listed = [(name, dtype, None) for name, dtype in dtypes.items()]
        else:
            entries = {entry["model_name"]: entry for entry in self.models()}
            entry = entries.get(model)
            if entry is None:
                raise TensorSocketError("NOT_FOUND", f"model {model!r} is not installed; installed: {sorted(entries)}")
            listed = [(t["name"], t["dtype"], t["shape"]) for t in entry["inputs"]]
            self._listed_output_bytes[model] = _static_bytes(entry["outputs"])
        unknown = sorted(set(shapes) - {name for name, _, _ in listed})
        if unknown:
            raise ValueError(
                f"shapes names {unknown}, which are not inputs of model {model!r}; "
                f"its inputs are {[name for name, _, _ in listed]}"
            )

        specs: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []
        for name, dtype_like, listed_shape in listed:
            given = name in shapes
            shape = shapes[name] if given else listed_shape
            assert shape is not None
            dims = _check_shape(model, name, tuple(shape), None if listed_shape is None else tuple(listed_shape), given)
            dtype = np.dtype(dtype_like)
            if dtype.kind not in NUMERIC_KINDS or dtype.byteorder == ">":
                raise ValueError(
                    f"input {name!r} has dtype {dtype.str}; the tensor socket carries little-endian bool, "
                    "integer, float and complex tensors only"
                )
            specs.append((name, dims, dtype))
        return specs

    def infer(self, model: str, feeds: Mapping[str, np.ndarray]) -> TensorReply:
        """Run model on feeds (input name to array) in the agent and return its outputs.

        Feeds that lie where input_arrays put them are not copied. Raises TensorSocketError with code
        NOT_FOUND for a model that is not installed, INVALID_ARGUMENT for inputs that do not match it and
        INTERNAL when the runtime fails. Raises ConnectionError when the agent cannot be reached and
        TimeoutError when it does not respond within timeout_s. Raises ValueError, before sending, for an
        input of a dtype with no fixed byte layout (strings, objects), and TypeError when feeds is not a
        mapping or an input name is not a str.
        """
        if not isinstance(feeds, Mapping):
            raise TypeError(
                f"feeds must be a mapping of input name to array, like {{'input': array}}, not {type(feeds).__name__}; "
                "client.models() lists each model's input names"
            )
        _check_names(feeds)
        connection = self._connection
        # Only calls with inputs in the region get prepared, so a client without any pays nothing here.
        key = _prepared_key(model, feeds) if connection is not None and connection.prepared else None
        if key is not None:
            done = self._run(lambda connection: self._infer_prepared(connection, key))
            if done is not None:
                return done

        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        for name, array in arrays.items():
            if array.dtype.kind not in NUMERIC_KINDS:
                raise ValueError(
                    f"input {name!r} has dtype {array.dtype}; the tensor socket carries bool, integer, float "
                    "and complex tensors only"
                )
        buffers = [array_bytes(a) for a in arrays.values()]
        input_bytes = sum(b.nbytes for b in buffers)
        # Small inputs go through the socket even when they lie in the region: sending them costs less.
        shared = self.shared_memory and SHARED_MEMORY_MIN_BYTES <= input_bytes <= MAX_PAYLOAD_BYTES

        def inline(connection: _Connection) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            header = self._header(model, arrays, shared=False)
            raw_reply, payload = self._request(connection, header, buffers)
            reply, payload = _check((parse_header(raw_reply), payload))
            self._record_run_time(header, float(reply["latency_ms"]))
            self._output_bytes = max(self._output_bytes, len(payload))
            return reply, _outputs(reply, payload, copy=False)

        def through_region(connection: _Connection) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            region = self._shared_region(connection, _output_offset(input_bytes) + self._output_bytes)
            if region is None:
                return inline(connection)
            copied = _place(connection, buffers)
            self.copied_input_bytes += copied
            header = self._header(model, arrays, shared=True)
            raw_reply, payload = self._request(connection, header)
            call_key = None
            if not copied:  # Only a call whose inputs all lay in place can be repeated without copying.
                call_key = key if key is not None else _prepared_key(model, feeds)
            return self._region_reply(
                connection, header, raw_reply, payload, call_key, overwritten=copied < input_bytes
            )

        reply, outputs = self._run(through_region if shared else inline)
        return _tensor_reply(reply, outputs)

    def _region_reply(
        self,
        connection: _Connection,
        header: bytes,
        raw_reply: bytes,
        payload: bytearray,
        key: tuple[object, ...] | None,
        *,
        overwritten: bool,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Read the reply to a request whose inputs lie in the region; raise TensorSocketError for an error.

        With key, a reply whose outputs lie in the region at output_offset is recorded for _infer_prepared.
        overwritten is whether some inputs were copied in, which an agent that ignores output_offset overwrites.
        """
        region = connection.region
        assert region is not None
        reply = parse_header(raw_reply)
        _check((reply, payload))
        self._record_run_time(header, float(reply["latency_ms"]))
        if not reply.get("shm"):  # The outputs did not fit in the region this time.
            self._output_bytes = max(self._output_bytes, len(payload))
            return reply, _outputs(reply, payload, copy=False)
        output_offset = reply.get("output_offset")
        if output_offset is None and overwritten:
            self._warn_overwritten()
        # Copied out, because the next call reuses the region.
        outputs = _outputs(reply, region, copy=True, offset=output_offset or 0)
        self._output_bytes = max(self._output_bytes, sum(a.nbytes for a in outputs.values()))
        if key is not None and output_offset is not None:
            _prepare(connection, key, header, raw_reply, reply)
        return reply, outputs

    def _request(
        self, connection: _Connection, header: bytes, buffers: Sequence[np.ndarray] = ()
    ) -> tuple[bytes, bytearray]:
        """Send an infer request and read its reply with the header undecoded."""
        try:
            write_frame(connection.sock, header, buffers)
        except ConnectionError:
            # At its connection limit the agent sends an error and closes before reading the request.
            # That error is still in the receive queue.
            frame = connection.reader.read_raw()
            if frame is None or parse_header(frame[0]).get("ok", True):
                raise
            return frame
        return self._read_reply(connection.reader, header)

    def _read_reply(self, reader: FrameReader, header: bytes) -> tuple[bytes, bytearray]:
        """Read the reply to the infer request with header just sent; raise ConnectionError when the agent closed.

        The reader polls before it blocks only while the model's last run for this request took less
        than the poll, so that the reply can arrive within it. For a longer run the poll cannot catch
        the reply. With a 10 ms inference on a 2-CPU VM, polling anyway added 40 to 130 us to the call.
        """
        if self._poller is not None:
            frame = self._poller.read_raw(reader, header)
        else:
            run_time_s = self._run_times.get(header)
            polls = run_time_s is None or run_time_s < reader.spin_s
            frame = reader.read_raw(spin_s=None if polls else 0.0)
        if frame is None:
            raise ConnectionError("the agent closed the connection")
        return frame

    def _record_run_time(self, header: bytes, latency_ms: float) -> None:
        """Remember how long the model ran for a request with header, for _read_reply."""
        if len(self._run_times) >= MAX_PLANS_PER_CONNECTION and header not in self._run_times:
            self._run_times.clear()
        self._run_times[header] = latency_ms / 1e3

    def _infer_prepared(self, connection: _Connection, key: tuple[object, ...]) -> TensorReply | None:
        """Repeat a prepared call with few steps; return None when there is none or the reply differs.

        A different reply (an error, another model version, outputs that no longer fit) drops the
        prepared call and is read again by the full path, which raises or returns what it should.
        """
        prepared = connection.prepared.get(key)
        if prepared is None or connection.region is None:
            return None
        connection.sock.sendall(prepared.frame)
        raw_reply, payload = self._read_reply(connection.reader, prepared.header)
        latency_ms = _latency_after(raw_reply, prepared.reply_prefix)
        if latency_ms is None or payload:
            del connection.prepared[key]
            reply, outputs = self._region_reply(connection, prepared.header, raw_reply, payload, key, overwritten=False)
            return _tensor_reply(reply, outputs)
        self._record_run_time(prepared.header, latency_ms)
        region = connection.region
        outputs = {
            name: np.frombuffer(region, dtype, count, offset).reshape(shape).copy()
            for name, dtype, shape, offset, count in prepared.outputs
        }
        reply = prepared.reply
        return TensorReply(
            outputs=outputs,
            latency_ms=latency_ms,
            model_name=str(reply["model_name"]),
            model_version=str(reply["model_version"]),
            variant_id=str(reply["variant_id"]),
        )

    def _warn_overwritten(self) -> None:
        if not self._warned_overwritten:
            self._warned_overwritten = True
            log.warning(
                "tensor socket: the agent on %s ignores 'output_offset' and wrote the outputs over the start of "
                "the inputs in shared memory; refill the arrays from input_arrays before each call, or update "
                "the agent",
                self.socket_path,
            )

    def models(self) -> list[dict[str, Any]]:
        """Return the models the agent serves, with runtime, providers, threads, inputs and outputs."""
        reply, _ = self._run(lambda connection: _check(_exchange(connection.reader, {"op": "models"})))
        return list(reply["models"])


def _grpc_socket_message(path: Path) -> str:
    """Return the error message for a tensor socket path where a gRPC server listens."""
    tensor_path = path.with_name(path.name.removesuffix(".sock") + ".tensor.sock")
    return (
        f"{path} is a gRPC socket, such as the agent's local API socket (edgefleet-agent --socket), not its "
        f"tensor socket; connect to the --tensor-socket path instead, by default {tensor_path} next to it"
    )


def _permission_message(path: Path) -> str:
    """Return the error message for a tensor socket that this process may not connect to."""
    found = access_group(path)
    if found is None or found[0] != path:  # A folder on the way denies search access.
        return (
            f"permission denied on the tensor socket {path}: this user needs search access to its folders "
            "and write access to the socket, which the agent's group has; add the user to that group"
        )
    return (
        f"permission denied on the tensor socket {path}: this user needs write access to it, which the "
        f"agent's group {found[1]!r} has; add the user to that group (and log in again)"
    )


# Every live client, so that a child process detaches them from the parent's connections after fork().
_clients: weakref.WeakSet[TensorSocketClient] = weakref.WeakSet()


def _non_socket_kind(path: Path) -> str:
    """Return "directory" or "regular file" for such an entry at path, or "" for a socket or no entry."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "regular file"
    return ""


def _detach_clients_after_fork() -> None:
    for client in list(_clients):
        client._detach_after_fork()


os.register_at_fork(after_in_child=_detach_clients_after_fork)


def _address(array: np.ndarray) -> int:
    """Return the address of the array's first byte."""
    return int(array.__array_interface__["data"][0])


def _output_offset(input_bytes: int) -> int:
    """Return where the outputs go in the shared region: after the inputs, aligned for any dtype."""
    return -(-input_bytes // _OUTPUT_ALIGNMENT) * _OUTPUT_ALIGNMENT


def _check_names(tensors: Mapping[Any, object]) -> None:
    """Raise TypeError for a key of tensors that is not a str, because the agent matches inputs by name."""
    for name in tensors:
        if not isinstance(name, str):
            raise TypeError(f"input names must be str, got {name!r} of type {type(name).__name__}")


def _check_shape(
    model: str, name: str, dims: tuple[Any, ...], listed: tuple[int, ...] | None, given: bool
) -> tuple[int, ...]:
    """Return the shape of an input for input_arrays, or raise ValueError naming the input and the fix.

    dims comes from the caller's shapes when given is true, and from the model list otherwise. listed is
    the model's listed shape, or None when the caller describes the inputs with dtypes.
    """
    if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"input {name!r} has shape {list(dims)}; use a list of integers")
    # The shape to suggest: the fixed sizes of the listed shape, with N for each axis of any size.
    template = "[" + ", ".join("N" if d < 0 else str(d) for d in (listed or dims)) + "]"
    if any(d < 0 for d in dims):
        if given:
            raise ValueError(
                f"shapes gives input {name!r} of model {model!r} the shape {list(dims)}, but -1 is not a size; "
                f"pass shapes={{{name!r}: {template}}} with a size N for each axis that the model leaves open"
            )
        raise ValueError(
            f"input {name!r} of model {model!r} has the dynamic shape {list(dims)} (-1 is any size); "
            f"pass shapes={{{name!r}: {template}}} with a size N for each -1 axis"
        )
    if given and listed is not None:
        if len(dims) != len(listed):
            raise ValueError(
                f"shapes gives input {name!r} of model {model!r} the shape {list(dims)}, but the model lists "
                f"{list(listed)} with {len(listed)} axes; pass shapes={{{name!r}: {template}}}"
            )
        for axis, (size, listed_size) in enumerate(zip(dims, listed, strict=True)):
            if listed_size >= 0 and size != listed_size:
                raise ValueError(
                    f"shapes gives input {name!r} of model {model!r} the shape {list(dims)}, but its axis {axis} "
                    f"has the fixed size {listed_size}; pass shapes={{{name!r}: {template}}}"
                )
    return tuple(int(d) for d in dims)


def _static_bytes(tensors: Sequence[Mapping[str, Any]]) -> int:
    """Return the bytes of tensors listed by the models op, or 0 when a shape has a dynamic axis."""
    total = 0
    for tensor in tensors:
        if any(d < 0 for d in tensor["shape"]):
            return 0
        total += math.prod(tensor["shape"]) * np.dtype(tensor["dtype"]).itemsize
    return total


def _place(connection: _Connection, buffers: Sequence[np.ndarray]) -> int:
    """Pack the flat uint8 buffers from the start of the region, skipping those already in place.

    Returns the bytes copied. A buffer elsewhere in the region is copied out first, so that writing
    another buffer's place cannot change it before it is moved.
    """
    region_bytes = connection.region_bytes
    assert region_bytes is not None
    start = connection.region_address
    end = start + region_bytes.nbytes
    moves: list[tuple[int, np.ndarray]] = []
    offset = 0
    for buffer in buffers:
        size = buffer.nbytes
        if size:
            address = _address(buffer)
            if address != start + offset:
                if address < end and address + size > start:
                    buffer = buffer.copy()
                moves.append((offset, buffer))
        offset += size
    for offset, buffer in moves:
        region_bytes[offset : offset + buffer.nbytes] = buffer
    return sum(buffer.nbytes for _, buffer in moves)


def _check(frame: tuple[dict[str, Any], bytearray]) -> tuple[dict[str, Any], bytearray]:
    """Return a reply frame; raise TensorSocketError when it is an error response."""
    reply = frame[0]
    if not reply.get("ok"):
        raise TensorSocketError(
            str(reply.get("code", "INTERNAL")), str(reply.get("message", "")), str(reply.get("reason", ""))
        )
    return frame


def _raise_pending_error(reader: FrameReader) -> None:
    """Raise the error frame that the agent sent before closing the connection, if one is queued.

    Call it after a send failed with ConnectionError: at its connection limit the agent sends an error
    and closes before reading the request. Returns when no error frame is queued.
    """
    with contextlib.suppress(OSError, ProtocolError):
        frame = reader.read()
        if frame is not None and not frame[0].get("ok", True):
            _check(frame)


def _outputs(
    reply: Mapping[str, Any], data: bytearray | mmap.mmap, copy: bool, offset: int = 0
) -> dict[str, np.ndarray]:
    """Cut the reply's outputs out of data from offset on, copying them when data is reused afterwards."""
    outputs: dict[str, np.ndarray] = {}
    for entry in reply["outputs"]:
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        count = math.prod(entry["shape"])
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(entry["shape"])
        outputs[entry["name"]] = array.copy() if copy else array
        offset += count * dtype.itemsize
    return outputs


def _prepared_key(model: str, feeds: Mapping[str, Any]) -> tuple[object, ...] | None:
    """Return what identifies a call with these inputs in place, or None when an input is not an ndarray."""
    parts: list[object] = [model]
    for name, value in feeds.items():
        if type(value) is not np.ndarray:
            return None
        parts.append((name, value.ctypes.data, value.shape, value.strides, value.dtype.str))
    return tuple(parts)


def _prepare(
    connection: _Connection, key: tuple[object, ...], header: bytes, raw_reply: bytes, reply: dict[str, Any]
) -> None:
    """Record a call whose inputs lay in place and whose outputs came back in the region at output_offset."""
    marker = raw_reply.rfind(b'"latency_ms":')
    if marker < 0 or _latency_after(raw_reply, raw_reply[: marker + len(b'"latency_ms":')]) is None:
        return  # An agent that writes latency_ms elsewhere gets the full path every time.
    outputs = []
    offset = int(reply["output_offset"])
    for entry in reply["outputs"]:
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        count = math.prod(entry["shape"])
        outputs.append((str(entry["name"]), dtype, tuple(entry["shape"]), offset, count))
        offset += count * dtype.itemsize
    if len(connection.prepared) >= MAX_PLANS_PER_CONNECTION:
        connection.prepared.clear()
    connection.prepared[key] = _PreparedCall(
        frame=encode_frame(header),
        header=header,
        reply_prefix=raw_reply[: marker + len(b'"latency_ms":')],
        reply=reply,
        outputs=tuple(outputs),
    )


def _latency_after(raw_reply: bytes, prefix: bytes) -> float | None:
    """Return the latency in a reply header that is prefix, a number and "}", or None for any other header."""
    if not raw_reply.startswith(prefix) or not raw_reply.endswith(b"}"):
        return None
    try:
        latency_ms = float(raw_reply[len(prefix) : -1])
    except ValueError:
        return None
    return latency_ms if math.isfinite(latency_ms) else None


def _tensor_reply(reply: Mapping[str, Any], outputs: dict[str, np.ndarray]) -> TensorReply:
    return TensorReply(
        outputs=outputs,
        latency_ms=float(reply["latency_ms"]),
        model_name=str(reply["model_name"]),
        model_version=str(reply["model_version"]),
        variant_id=str(reply["variant_id"]),
    )


def _exchange(reader: FrameReader, header: Mapping[str, Any]) -> tuple[dict[str, Any], bytearray]:
    """Send one request frame without payload and read its reply; raise ConnectionError when the connection broke."""
    try:
        write_frame(reader.sock, header)
    except ConnectionError:
        # At its connection limit the agent sends an error and closes before reading the request.
        # That error is still in the receive queue.
        frame = reader.read()
        if frame is None or frame[0].get("ok", True):
            raise
        return frame
    frame = reader.read()
    if frame is None:
        raise ConnectionError("the agent closed the connection")
    return frame
