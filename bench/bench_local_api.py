"""Measure what the agent's Unix-socket inference API adds over the in-process ModelHost.infer call.

Runs one ModelHost in this process and serves it with the agent's LocalApiServer on a Unix socket,
then times ModelHost.infer and the Infer RPC side by side, interleaved, on the same model and
input. The difference of the p50s is the socket API's cost (target: at most 150 us). A tiny model
shows the fixed cost alone; EfficientNet-Lite0 shows it against a real inference.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from common import interleaved_samples

from edgefleet.agent.local_api import LocalApiServer, array_to_tensor
from edgefleet.agent.runtime import ModelHost
from edgefleet.v1 import inference_pb2, inference_pb2_grpc

TARGET_OVERHEAD_US = 150.0


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


def interleaved_p50(calls: dict[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, float]:
    """Time the calls interleaved (see common.interleaved_samples); return each p50 in microseconds."""
    return {name: statistics.median(values) / 1e3 for name, values in interleaved_samples(calls, warmup, runs).items()}


def measure(
    host: ModelHost,
    stub: inference_pb2_grpc.InferenceServiceStub,
    name: str,
    data: np.ndarray,
    input_name: str,
    warmup: int,
    runs: int,
) -> dict[str, float]:
    request = inference_pb2.InferRequest(model_name=name, inputs=[array_to_tensor(input_name, data)])
    feeds = {input_name: data}
    return interleaved_p50(
        {
            "in-process": lambda: host.infer(name, feeds),
            "unix socket": lambda: stub.Infer(request, timeout=30),
        },
        warmup,
        runs,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="timed calls of each kind on the tiny model")
    parser.add_argument("--real-runs", type=int, default=100, help="timed calls of each kind on EfficientNet-Lite0")
    parser.add_argument("--skip-real", action="store_true", help="measure the tiny model only")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    with tempfile.TemporaryDirectory() as tmp, ModelHost(default_threads=1) as host:
        models = [("tiny", tiny_onnx(Path(tmp) / "tiny.onnx"), args.runs)]
        if not args.skip_real:
            from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx

            models.append(("efficientnet-lite0", ensure_efficientnet_lite0_onnx(), args.real_runs))
        server = LocalApiServer(host, Path(tmp) / "agent.sock")
        server.start()
        try:
            with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                print(f"{'MODEL':<20} {'IN-PROCESS P50 US':>18} {'SOCKET P50 US':>14} {'ADDED US':>9}  TARGET")
                for name, path, runs in models:
                    served = host.install(name, "1", f"{name}:1:source", path, "onnx", threads=1)
                    spec = served.inputs[0]
                    data = np.random.default_rng(0).standard_normal([max(d, 1) for d in spec.shape]).astype(np.float32)
                    result = measure(host, stub, name, data, spec.name, warmup=max(runs // 10, 5), runs=runs)
                    added = result["unix socket"] - result["in-process"]
                    verdict = "met" if added <= TARGET_OVERHEAD_US else "missed"
                    print(
                        f"{name:<20} {result['in-process']:>18.1f} {result['unix socket']:>14.1f} {added:>9.1f}  "
                        f"<= {TARGET_OVERHEAD_US:.0f} us: {verdict}"
                    )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
