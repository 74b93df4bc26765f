"""Measure what the agent's two Unix-socket inference APIs add over an in-process ModelHost.infer call.

A child process plays the agent: it loads the models into a ModelHost and serves them with the
agent's LocalApiServer (gRPC) and TensorSocketServer (the framed tensor protocol), as the agent does on
a device. This process plays the application: it loads the same models into its own ModelHost and
times ModelHost.infer against each socket API side by side, interleaved, on the same model and input.
It measures the tensor socket call and the gRPC Infer call in separate passes, so that neither API's
cache footprint slows the other. The difference of the p50s is what each socket API adds (target: at most
150 us). A tiny model shows the fixed cost alone; EfficientNet-Lite0 shows it against a real inference.
Besides the copying client, the tensor socket rows cover inputs from TensorSocketClient.input_arrays
(zero-copy) and the client's hybrid polling for replies. On a 10 ms model the p50 difference varies by
about 100 us from run to run with the inference time, so each row also gives the p50 of each call's
time outside its runtime call (the reply's latency_ms), less the same for ModelHost.infer: that
difference leaves the inference's own jitter out. Each row ends with the CPUs that other processes
used during its pass: a row with more than about 0.05 measured a shared machine.

A last row per model, `bare socket`, is the floor of any Unix-socket API on this machine. A third
process runs its own onnxruntime session in a loop: it blocks in recv for a 1-byte request, runs the
model on an input it already holds and sends back the 8-byte run time. It has no framing, no input
transfer and no Python beyond those three calls, so what it adds is two thread wake-ups and the system
calls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from common import interleaved_samples

from edgefleet.agent.local_api import LocalApiServer, array_to_tensor, wait_for_socket
from edgefleet.agent.runtime import ModelHost
from edgefleet.agent.tensor_socket import TensorSocketServer
from edgefleet.agent.tensor_socket_client import TensorSocketClient
from edgefleet.v1 import inference_pb2, inference_pb2_grpc

TARGET_OVERHEAD_US = 150.0


@dataclass(frozen=True)
class TensorClients:
    """One tensor socket client per mode, each on its own connection."""

    copy: TensorSocketClient  # The default: infer copies the inputs into the shared region.
    zero_copy: TensorSocketClient  # The inputs come from input_arrays.
    polling: TensorSocketClient  # hybrid_poll=True.
    zero_copy_polling: TensorSocketClient

    def close(self) -> None:
        for client in (self.copy, self.zero_copy, self.polling, self.zero_copy_polling):
            client.close()


def tiny_onnx(path: Path) -> Path:
    """Write a 1x64 -> 1x64 MatMul model whose inference takes microseconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.eye(64, dtype=np.float32), name="weights")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weights"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 64])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def serve(directory: Path, models: list[tuple[str, Path]]) -> None:
    """Serve models on both sockets in directory until stdin closes, as the agent does."""
    with ModelHost(default_threads=1) as host:
        for name, path in models:
            host.install(name, "1", f"{name}:1:source", path, "onnx", threads=1)
        grpc_server = LocalApiServer(host, directory / "agent.sock")
        tensor_server = TensorSocketServer(host, directory / "agent.tensor.sock")
        grpc_server.start()
        tensor_server.start()
        try:
            sys.stdin.read()
        finally:
            tensor_server.stop()
            grpc_server.stop()


def serve_bare(socket_path: Path, model: Path) -> None:
    """Run model once per 1-byte request on socket_path and reply with the run time in nanoseconds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    feeds = {spec.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in spec.shape], np.float32)}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(1)
    connection, _ = listener.accept()
    with listener, connection:
        while connection.recv(1):
            start = time.perf_counter_ns()
            session.run(None, feeds)
            connection.sendall(struct.pack("<q", time.perf_counter_ns() - start))


@dataclass(frozen=True)
class BareReply:
    latency_ms: float


class BareSocketClient:
    """The application side of serve_bare: one request byte out, the run time back."""

    def __init__(self, socket_path: Path, server_pid: int) -> None:
        self.server_pid = server_pid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))

    def __call__(self) -> BareReply:
        self.sock.sendall(b"r")
        reply = self.sock.recv(8, socket.MSG_WAITALL)
        return BareReply(latency_ms=struct.unpack("<q", reply)[0] / 1e6)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def bare_server(directory: Path, name: str, model: Path) -> Iterator[BareSocketClient]:
    """Start serve_bare for model in a child process and yield a connected client."""
    socket_path = directory / f"{name}.bare.sock"
    command = [sys.executable, __file__, "--serve-bare", str(socket_path), str(model)]
    child = subprocess.Popen(command)
    try:
        if not wait_for_socket(socket_path, timeout_s=120):
            raise SystemExit(f"the bare socket server for {name} did not start within 120 s")
        client = BareSocketClient(socket_path, child.pid)
        try:
            yield client
        finally:
            client.close()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


class OutsideRun:
    """Records, for a call that returns a reply with latency_ms, its time outside the runtime call."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.samples_us: list[float] = []

    def __call__(self) -> None:
        start = time.perf_counter_ns()
        reply = self.call()
        self.samples_us.append((time.perf_counter_ns() - start) / 1e3 - reply.latency_ms * 1e3)

    def p50_us(self, skip: int) -> float:
        """Return the p50 in microseconds of the samples after the first skip (the warm-up calls)."""
        return statistics.median(self.samples_us[skip:])


def interleaved_p50(calls: dict[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, float]:
    """Time the calls interleaved (see common.interleaved_samples); return each p50 in microseconds."""
    return {name: statistics.median(values) / 1e3 for name, values in interleaved_samples(calls, warmup, runs).items()}


def busy_cpu_s(pids: list[int]) -> tuple[float, float]:
    """Return the CPU seconds all processes have used since boot and those the processes pids have used."""
    total = psutil.cpu_times()
    everyone = total.user + total.nice + total.system + total.irq + total.softirq + total.steal
    ours = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        ours += times.user + times.system
    return everyone, ours


def measure(
    host: ModelHost,
    tensor_clients: TensorClients,
    stub: inference_pb2_grpc.InferenceServiceStub,
    name: str,
    path: Path,
    runs: int,
    agent_pid: int,
    directory: Path,
) -> None:
    """Time ModelHost.infer against each socket API and client mode on one model and print a row for each."""
    served = host.install(name, "1", f"{name}:1:source", path, "onnx", threads=1)
    spec = served.inputs[0]
    data = np.random.default_rng(0).standard_normal([max(d, 1) for d in spec.shape]).astype(np.float32)
    feeds = {spec.name: data}
    request = inference_pb2.InferRequest(model_name=name, inputs=[array_to_tensor(spec.name, data)])
    # The application writes its input straight into the shared region, so only infer is timed.
    shapes = {spec.name: list(data.shape)}
    zero_copy = tensor_clients.zero_copy.input_arrays(name, shapes)
    zero_copy[spec.name][...] = data
    zero_copy_polling = tensor_clients.zero_copy_polling.input_arrays(name, shapes)
    zero_copy_polling[spec.name][...] = data
    warmup = max(runs // 10, 5)

    apis: dict[str, Callable[[], Any]] = {
        "tensor socket": lambda: tensor_clients.copy.infer(name, feeds),
        "zero-copy": lambda: tensor_clients.zero_copy.infer(name, zero_copy),
        "hybrid poll": lambda: tensor_clients.polling.infer(name, feeds),
        "zero-copy+poll": lambda: tensor_clients.zero_copy_polling.infer(name, zero_copy_polling),
        "grpc": lambda: stub.Infer(request, timeout=30),
    }
    # One pass per API, so that no API's cache footprint slows another.
    for api, call in apis.items():
        measure_pass(host, name, feeds, api, call, [os.getpid(), agent_pid], warmup, runs)
    with bare_server(directory, name, path) as bare:
        measure_pass(host, name, feeds, "bare socket", bare, [os.getpid(), bare.server_pid], warmup, runs)


def measure_pass(
    host: ModelHost,
    name: str,
    feeds: dict[str, np.ndarray],
    api: str,
    call: Callable[[], Any],
    pids: list[int],
    warmup: int,
    runs: int,
) -> None:
    """Time ModelHost.infer and call interleaved and print their row; pids are the processes taking part."""
    in_process = OutsideRun(lambda: host.infer(name, feeds))
    over_api = OutsideRun(call)
    start, everyone_before, ours_before = time.monotonic(), *busy_cpu_s(pids)
    result = interleaved_p50({"in-process": in_process, "api": over_api}, warmup, runs)
    everyone_after, ours_after = busy_cpu_s(pids)
    other_cpus = ((everyone_after - everyone_before) - (ours_after - ours_before)) / (time.monotonic() - start)
    added = result["api"] - result["in-process"]
    added_outside = over_api.p50_us(warmup) - in_process.p50_us(warmup)
    verdict = "met" if added <= TARGET_OVERHEAD_US else "missed"
    print(
        f"{name:<20} {api:<14} {result['in-process']:>18.1f} {result['api']:>11.1f} {added:>9.1f}  "
        f"{verdict:<7} {added_outside:>16.1f} {max(other_cpus, 0.0):>10.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="timed calls of each kind on the tiny model")
    parser.add_argument("--real-runs", type=int, default=300, help="timed calls of each kind on EfficientNet-Lite0")
    parser.add_argument("--skip-real", action="store_true", help="measure the tiny model only")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # Internal: run as the agent side.
    parser.add_argument("--model", nargs=2, action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", nargs=2, type=Path, help=argparse.SUPPRESS)  # Internal: the floor's server.
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(*args.serve_bare)
        return 0
    if args.serve:
        serve(args.serve, [(name, Path(path)) for name, path in args.model])
        return 0
    print(
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp, ModelHost(default_threads=1) as host:
        directory = Path(tmp)
        models = [("tiny", tiny_onnx(directory / "tiny.onnx"), args.runs)]
        if not args.skip_real:
            from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx

            models.append(("efficientnet-lite0", ensure_efficientnet_lite0_onnx(), args.real_runs))
        command = [sys.executable, __file__, "--serve", str(directory)]
        for name, path, _ in models:
            command += ["--model", name, str(path)]
        agent = subprocess.Popen(command, stdin=subprocess.PIPE)
        try:
            if not wait_for_socket(directory / "agent.tensor.sock", timeout_s=120):
                raise SystemExit("the agent side did not start its sockets within 120 s")
            channel = grpc.insecure_channel(f"unix://{directory / 'agent.sock'}")
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            tensor_path = directory / "agent.tensor.sock"
            tensor_clients = TensorClients(
                copy=TensorSocketClient(tensor_path),
                zero_copy=TensorSocketClient(tensor_path),
                polling=TensorSocketClient(tensor_path, hybrid_poll=True),
                zero_copy_polling=TensorSocketClient(tensor_path, hybrid_poll=True),
            )
            print(
                f"{'MODEL':<20} {'API':<14} {'IN-PROCESS P50 US':>18} {'API P50 US':>11} {'ADDED US':>9}  "
                f"<= {TARGET_OVERHEAD_US:.0f} US {'ADDED OUTSIDE US':>16} {'OTHER CPUS':>10}"
            )
            for name, path, runs in models:
                measure(host, tensor_clients, stub, name, path, runs, agent.pid, directory)
            tensor_clients.close()
            channel.close()
        finally:
            agent.communicate(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
