"""Eviction of idle tensor socket connections at the connection limit, with forced interleavings.

The tests pause a server thread or the accept thread with hooks, so that a request and an eviction
meet in the order under test, and check that no request is lost and that no client hangs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent import tensor_socket
from edgefleet.agent.runtime import ModelHost
from edgefleet.agent.tensor_socket import FrameReader, TensorSocketError, TensorSocketServer, read_frame, write_frame
from edgefleet.agent.tensor_socket_client import TensorSocketClient
from tests.agent.models import linear_reference, onnx_linear

BATCH = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
LARGE = np.random.default_rng(5).standard_normal((2048, 4)).astype(np.float32)  # 32 KiB: shared memory
INFER_HEADER = {"op": "infer", "model": "linear", "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}]}
WAIT_S = 10.0


@pytest.fixture
def host(tmp_path: Path) -> Iterator[ModelHost]:
    with ModelHost(default_threads=1) as model_host:
        model_host.install("linear", "1", "linear:1:source", onnx_linear(tmp_path / "linear.onnx"), "onnx")
        yield model_host


@pytest.fixture
def limited(host: ModelHost, tmp_path: Path) -> Iterator[TensorSocketServer]:
    """A server that serves one connection at a time."""
    server = TensorSocketServer(host, tmp_path / "agent.tensor.sock", max_connections=1)
    server.start()
    yield server
    server.stop()


def wait_until(condition: Callable[[], bool], description: str) -> None:
    """Poll condition until it holds; fail after WAIT_S seconds, which only a hang reaches."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {description}"
        time.sleep(0.001)


def raw_connection(server: TensorSocketServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(str(server.socket_path))
    return sock


def send_infer(sock: socket.socket) -> None:
    write_frame(sock, INFER_HEADER, [BATCH.reshape(-1).view(np.uint8)])


def read_reply(sock: socket.socket) -> dict[str, Any] | None:
    """Read one reply frame; return its header, or None when the server closed the connection."""
    try:
        frame = read_frame(sock)
    except ConnectionResetError:
        return None
    return None if frame is None else frame[0]


def make_evictable(server: TensorSocketServer) -> None:
    """Wait until the server's only connection waits for a request, then date its wait back an hour."""

    def waiting() -> bool:
        with server._lock:
            return [served.idle_since is not None for served in server._connections.values()] == [True]

    wait_until(waiting, "the connection waits for its next request")
    with server._lock:
        for served in server._connections.values():
            assert served.idle_since is not None
            served.idle_since -= 3600.0


def outcome(call: Callable[[], Any]) -> str:
    """Run call and name how it ended: 'answered' or the error code; other errors fail the test."""
    try:
        call()
    except TensorSocketError as error:
        return error.code
    return "answered"


def test_read_request_outlives_eviction(limited: TensorSocketServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection whose request the server has read gets its reply, whatever a newcomer does meanwhile."""
    monkeypatch.setattr(tensor_socket, "EVICT_IDLE_AFTER_S", 0.0)
    request_read = threading.Event()
    release = threading.Event()
    read_raw = FrameReader.read_raw

    def pausing_read_raw(reader: FrameReader, spin_s: float | None = None) -> Any:
        frame = read_raw(reader, spin_s)
        if frame is not None and threading.current_thread().name == "tensor-conn" and not request_read.is_set():
            request_read.set()
            assert release.wait(WAIT_S)
        return frame

    with raw_connection(limited) as first:
        monkeypatch.setattr(FrameReader, "read_raw", pausing_read_raw)
        send_infer(first)
        assert request_read.wait(WAIT_S)

        # The newcomer connects while the first connection's server thread pauses after reading its request.
        with TensorSocketClient(limited.socket_path, timeout_s=WAIT_S) as newcomer:
            newcomer_outcome = outcome(lambda: newcomer.infer("linear", {"x": BATCH}))
            release.set()
            reply = read_reply(first)

    assert reply is not None, "the request read before the eviction got no reply"
    assert reply["ok"] is True
    assert newcomer_outcome in ("answered", "RESOURCE_EXHAUSTED")


def test_queued_request_outlives_eviction(limited: TensorSocketServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that reaches the socket while the accept thread evicts its connection gets its reply."""
    monkeypatch.setattr(tensor_socket, "EVICT_IDLE_AFTER_S", 0.0)
    evict_idle = TensorSocketServer._evict_idle
    sent = threading.Event()

    with raw_connection(limited) as first:
        send_infer(first)
        assert read_reply(first) is not None

        def evict_after_request(server: TensorSocketServer) -> Any:
            if not sent.is_set():  # The accept thread has the server's lock here.
                send_infer(first)
                sent.set()
            return evict_idle(server)

        monkeypatch.setattr(TensorSocketServer, "_evict_idle", evict_after_request)
        make_evictable(limited)
        with TensorSocketClient(limited.socket_path, timeout_s=WAIT_S) as newcomer:
            newcomer_outcome = outcome(lambda: newcomer.infer("linear", {"x": BATCH}))
            assert sent.is_set()
            reply = read_reply(first)
            after = read_reply(first) if newcomer_outcome == "answered" else None

    assert reply is not None, "the request sent as its connection was evicted got no reply"
    assert reply["ok"] is True
    assert newcomer_outcome in ("answered", "RESOURCE_EXHAUSTED")
    assert after is None  # An evicted connection closes after its last reply.


def test_evicted_client_meets_limit(limited: TensorSocketServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An evicted client whose reconnect meets the limit gets RESOURCE_EXHAUSTED and keeps shared memory."""
    monkeypatch.setattr(tensor_socket, "EVICT_IDLE_AFTER_S", 600.0)
    with TensorSocketClient(limited.socket_path, timeout_s=WAIT_S) as evicted:
        first = evicted.infer("linear", {"x": LARGE})
        make_evictable(limited)
        with TensorSocketClient(limited.socket_path, timeout_s=WAIT_S) as newcomer:
            newcomer.infer("linear", {"x": BATCH})
            with pytest.raises(TensorSocketError, match="at most 1 tensor socket connections") as caught:
                evicted.infer("linear", {"x": LARGE})
            shared_after_rejection = evicted.shared_memory
        wait_until(lambda: limited.connection_count == 0, "the newcomer's connection closes")
        copied_before = evicted.copied_input_bytes
        again = evicted.infer("linear", {"x": LARGE})

    np.testing.assert_allclose(first.outputs["y"], linear_reference(LARGE), rtol=1e-5)
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert shared_after_rejection is True
    np.testing.assert_allclose(again.outputs["y"], linear_reference(LARGE), rtol=1e-5)
    assert evicted.copied_input_bytes == copied_before + LARGE.nbytes  # The inputs went through shared memory.


def test_evicted_prepared_client_meets_limit(limited: TensorSocketServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that repeats a prepared zero-copy call gets RESOURCE_EXHAUSTED when its reconnect meets the limit."""
    monkeypatch.setattr(tensor_socket, "EVICT_IDLE_AFTER_S", 600.0)
    with TensorSocketClient(limited.socket_path, timeout_s=WAIT_S) as evicted:
        inputs = evicted.input_arrays("linear", {"x": LARGE.shape})
        inputs["x"][...] = LARGE
        evicted.infer("linear", inputs)
        evicted.infer("linear", inputs)  # Repeated with the inputs in place: prepared from now on.
        prepared_calls = len(evicted._connection.prepared) if evicted._connection is not None else 0
        make_evictable(limited)
        with TensorSocketClient(limited.socket_path, timeout_s=WAIT_S) as newcomer:
            newcomer.infer("linear", {"x": BATCH})
            with pytest.raises(TensorSocketError) as caught:
                evicted.infer("linear", inputs)
        wait_until(lambda: limited.connection_count == 0, "the newcomer's connection closes")
        inputs = evicted.input_arrays("linear", {"x": LARGE.shape})
        inputs["x"][...] = LARGE
        again = evicted.infer("linear", inputs)

    assert prepared_calls == 1
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert caught.value.reason == tensor_socket.CONNECTION_LIMIT
    np.testing.assert_allclose(again.outputs["y"], linear_reference(LARGE), rtol=1e-5)
