"""TensorSocketClient against a real TensorSocketServer and onnxruntime model: interrupted calls, fork()."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.runtime import ModelHost
from edgefleet.agent.runtime.host import InferenceResult, PreparedInference
from edgefleet.agent.tensor_socket import TensorSocketServer
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


# Python 3.12 warns about fork() in a process with threads: the agent side's threads do not run in the
# children, which only use the client.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
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
