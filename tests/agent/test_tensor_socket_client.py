"""TensorSocketClient against a real TensorSocketServer and onnxruntime model: interrupted calls."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Mapping
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
