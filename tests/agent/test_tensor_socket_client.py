"""TensorSocketClient against a real TensorSocketServer and model: interrupted calls, fork(), wrong sockets."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet.agent.runtime import ModelHost
from edgefleet.agent.runtime.host import InferenceResult, PreparedInference
from edgefleet.agent.tensor_socket import FrameReader, ProtocolError, TensorSocketServer
from edgefleet.agent.tensor_socket_client import TensorSocketClient
from tests.agent.models import linear_reference, onnx_linear

# Inputs of 32 KiB, which travel through shared memory when the client uses it.
FIRST, SECOND, THIRD, FOURTH = (
    np.random.default_rng(seed).standard_normal((2048, 4)).astype(np.float32) for seed in range(4)
)
SLOW_RUN_S = 0.5


class SlowHost(ModelHost):
    """A ModelHost that returns each result SLOW_RUN_S after it ran the model on the inputs.

    A client can be interrupted during the wait. The inputs are read before it, so a stale reply
    carries the outputs of the inputs that its own request sent.
    """

    def infer(self, name: str, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
        result = super().infer(name, feeds)
        time.sleep(SLOW_RUN_S)
        return result

    def infer_prepared(self, prepared: PreparedInference) -> InferenceResult | None:
        result = super().infer_prepared(prepared)
        time.sleep(SLOW_RUN_S)
        return result


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[TensorSocketServer]:
    with SlowHost(default_threads=1) as host:
        host.install("linear", "1", "linear:1:source", onnx_linear(tmp_path / "linear.onnx"), "onnx")
        server = TensorSocketServer(host, tmp_path / "agent.tensor.sock")
        server.start()
        yield server
        server.stop()


def interrupt_main_after(delay_s: float) -> threading.Timer:
    """Send SIGINT to the main thread after delay_s, as Ctrl-C in a terminal or notebook does."""
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    timer = threading.Timer(delay_s, signal.pthread_kill, args=(main_thread, signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "inline"])
def test_interrupted_call_then_own_outputs(slow_server: TensorSocketServer, shared_memory: bool) -> None:
    """After a KeyboardInterrupt during a call, each later call returns the outputs of its own inputs."""
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with TensorSocketClient(slow_server.socket_path, timeout_s=10, shared_memory=shared_memory) as client:
            client.infer("linear", {"x": SECOND})  # Connected, with a region in shared-memory mode.
            timer = interrupt_main_after(SLOW_RUN_S / 4)
            with pytest.raises(KeyboardInterrupt):
                client.infer("linear", {"x": FIRST})
            timer.join()
            later = [(x, client.infer("linear", {"x": x}).outputs["y"]) for x in (SECOND, THIRD, FOURTH)]
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    for inputs, outputs in later:
        np.testing.assert_allclose(outputs, linear_reference(inputs), rtol=1e-5)


def test_interrupted_zero_copy_call_then_own_outputs(slow_server: TensorSocketServer) -> None:
    """A prepared zero-copy call cut by KeyboardInterrupt leaves later calls with their own outputs."""
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with TensorSocketClient(slow_server.socket_path, timeout_s=10) as client:
            arrays = client.input_arrays("linear", shapes={"x": FIRST.shape})
            arrays["x"][...] = FIRST
            client.infer("linear", arrays)
            client.infer("linear", arrays)  # Prepared from now on.
            timer = interrupt_main_after(SLOW_RUN_S / 4)
            with pytest.raises(KeyboardInterrupt):
                client.infer("linear", arrays)
            timer.join()
            arrays = client.input_arrays("linear", shapes={"x": SECOND.shape})
            later = []
            for x in (SECOND, THIRD, FOURTH):
                arrays["x"][...] = x
                later.append((x, client.infer("linear", arrays).outputs["y"]))
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    for inputs, outputs in later:
        np.testing.assert_allclose(outputs, linear_reference(inputs), rtol=1e-5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TensorSocketServer]:
    with ModelHost(default_threads=1) as host:
        host.install("linear", "1", "linear:1:source", onnx_linear(tmp_path / "linear.onnx"), "onnx")
        tensor_server = TensorSocketServer(host, tmp_path / "agent.tensor.sock")
        tensor_server.start()
        yield tensor_server
        tensor_server.stop()


FORK_CALLS = 40


def count_own_outputs(client: TensorSocketClient, inputs: np.ndarray) -> dict[str, int]:
    """Call the linear model FORK_CALLS times and count replies that match inputs, other replies and errors."""
    counts = {"own": 0, "other": 0, "error": 0}
    expected = linear_reference(inputs)
    for _ in range(FORK_CALLS):
        try:
            outputs = client.infer("linear", {"x": inputs}).outputs["y"]
        except Exception:
            counts["error"] += 1
            continue
        counts["own" if np.allclose(outputs, expected, rtol=1e-5) else "other"] += 1
    return counts


def run_in_child(work: Callable[[], dict[str, int]]) -> tuple[int, int]:
    """Fork a child that runs work and writes its result as JSON to a pipe. Return the pid and the read end."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # The child: never return into pytest.
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(work()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def child_result(pid: int, read_end: int, timeout_s: float) -> dict[str, int] | None:
    """Read a child's result, or kill the child and return None when it does not finish within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return None
        time.sleep(0.05)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    return json.loads(data) if data else None


# Python 3.12 warns about fork() in a process with threads, and so does JAX once another test in the
# same worker imported it. Neither the agent side's threads nor JAX's run in the children, which only
# use the client.
FORK_WARNINGS = (
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning"),
)


@FORK_WARNINGS[0]
@FORK_WARNINGS[1]
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "inline"])
def test_forked_client_own_outputs(server: TensorSocketServer, shared_memory: bool) -> None:
    """A client used in the parent and in forked children gives each process the outputs of its own inputs."""
    with TensorSocketClient(server.socket_path, timeout_s=5, shared_memory=shared_memory) as client:
        client.infer("linear", {"x": FIRST})  # Connected, with a region in shared-memory mode, before the fork.
        children = [
            run_in_child(functools.partial(count_own_outputs, client, inputs)) for inputs in (SECOND, THIRD, FOURTH)
        ]
        parent_counts = count_own_outputs(client, FIRST)
        child_counts = [child_result(pid, read_end, timeout_s=60) for pid, read_end in children]

    assert parent_counts == {"own": FORK_CALLS, "other": 0, "error": 0}
    for counts in child_counts:
        assert counts == {"own": FORK_CALLS, "other": 0, "error": 0}


def test_grpc_socket_named(tmp_path: Path) -> None:
    """A client pointed at a gRPC socket names the agent's --socket and --tensor-socket options."""
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    grpc_server.add_insecure_port(f"unix://{tmp_path / 'agent.sock'}")
    grpc_server.start()
    try:
        with (
            TensorSocketClient(tmp_path / "agent.sock", timeout_s=10) as client,
            pytest.raises(ProtocolError) as caught,
        ):
            client.infer("linear", {"x": FIRST})
    finally:
        grpc_server.stop(None)

    assert "gRPC socket" in str(caught.value)
    assert "--socket" in str(caught.value)
    assert f"by default {tmp_path / 'agent.tensor.sock'}" in str(caught.value)


def test_http2_client_rejected(server: TensorSocketServer) -> None:
    """The agent rejects an HTTP/2 client on the tensor socket with an error that names HTTP/2."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        frame = FrameReader(sock).read()

    assert frame is not None
    assert frame[0]["code"] == "INVALID_ARGUMENT"
    assert "HTTP/2" in frame[0]["message"]


NOBODY = 65534  # The uid and gid of the unprivileged user nobody.


def connect_as_nobody(path: Path) -> dict[str, str]:
    """Drop to the unprivileged user nobody and return the error of a call on the tensor socket at path."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    try:
        with TensorSocketClient(path, timeout_s=5) as client:
            client.infer("linear", {"x": FIRST})
    except Exception as error:
        return {"type": type(error).__name__, "message": str(error)}
    return {}


@pytest.mark.skipif(os.geteuid() != 0, reason="drops from root to the user nobody")
@FORK_WARNINGS[0]
@FORK_WARNINGS[1]
def test_permission_denied_named(server: TensorSocketServer) -> None:
    """A user outside the agent's group gets PermissionError saying that it needs write access."""
    pid, read_end = run_in_child(functools.partial(connect_as_nobody, server.socket_path))
    error = child_result(pid, read_end, timeout_s=60)

    assert error is not None
    assert error["type"] == "PermissionError"
    assert "permission denied on the tensor socket" in error["message"]
    assert "write access" in error["message"]
    assert "is edgefleet-agent running" not in error["message"]


def test_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a Unix socket path has at most 107"):
        TensorSocketClient(tmp_path / ("d" * 120) / "agent.tensor.sock")
