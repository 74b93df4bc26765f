"""Measure the resident memory of real agent processes: imports, registered and idle, serving a model.

With --swaps N it measures the RSS of a ModelHost across N swaps of EfficientNet-Lite0 instead, once
with the agent's release_freed_memory() (glibc malloc_trim) and once without it.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
from common import Memory, machine_line, memory_of, mib, sigterm_as_interrupt

from edgefleet.agent.local_api import array_to_tensor
from edgefleet.cli.main import upload_requests
from edgefleet.cli.views import table
from edgefleet.common.serde import tensor_from_proto
from edgefleet.demo.assets import ensure_efficientnet_lite0_onnx, ensure_efficientnet_lite0_tflite
from edgefleet.demo.processes import LocalFleet
from edgefleet.v1 import common_pb2, inference_pb2, inference_pb2_grpc, operator_pb2, operator_pb2_grpc

PROFILES = ("camera", "car-ecu", "plc")
MODEL_NAME = "efficientnet-lite0"
MODEL_VERSION = "1"
SERVING_TIMEOUT_S = 120.0
# Modules the agent must never load; the import table shows whether any of them slipped in.
FORBIDDEN_MODULES = ("torch", "sqlalchemy", "edgefleet.orchestrator")
# Each stage runs in a fresh interpreter and imports everything of the stages before it.
IMPORT_STAGES = (
    ("bare interpreter", ()),
    ("+ edgefleet.agent.main (the entry point)", ("edgefleet.agent.main",)),
    (
        "+ agent, probe, profiles (what run() imports)",
        ("edgefleet.agent.agent", "edgefleet.agent.probe", "edgefleet.agent.profiles"),
    ),
    ("+ onnxruntime runner", ("edgefleet.agent.runtime.onnx",)),
    ("+ LiteRT runner", ("edgefleet.agent.runtime.litert",)),
)
# The child prints the forbidden modules it has loaded, then waits until the parent closes its stdin.
IMPORT_PROBE = """
import sys
{imports}
print(",".join(m for m in {forbidden!r} if m in sys.modules), flush=True)
sys.stdin.read()
"""


# Swaps EfficientNet-Lite0 in a ModelHost as the agent does: it installs each version on one thread and
# then benchmarks it at 1 and 2 threads on another (the agent's BenchmarkWorker), with the agent's default
# of 20 timed runs. Prints the RSS in KiB after the first load and after each swap. With argv[3] "0", the
# agent's calls of release_freed_memory() do nothing, as before the agent trimmed glibc's arenas.
SWAP_SCRIPT = """
import concurrent.futures, sys
from pathlib import Path
import edgefleet.agent.benchmark as benchmark
import edgefleet.agent.runtime.host as host_module

path, swaps, release = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if not release:
    benchmark.release_freed_memory = host_module.release_freed_memory = lambda: None

def resident_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))

host = host_module.ModelHost(default_threads=2)
installer = concurrent.futures.ThreadPoolExecutor(1)
benchmarker = concurrent.futures.ThreadPoolExecutor(1)
for swap in range(swaps + 1):
    installer.submit(host.install, "effnet", str(swap + 1), f"effnet:{swap + 1}", path, "onnx", 2).result()
    benchmarker.submit(benchmark.benchmark_model, path, "onnx", max_threads=2).result()
    print(resident_kib(), flush=True)
host.close()
"""


@dataclass(frozen=True)
class ImportCost:
    stage: str
    memory: Memory
    forbidden_loaded: str


def measure_imports() -> list[ImportCost]:
    """Start one interpreter per import stage and return its memory once the imports are done."""
    costs = []
    modules: list[str] = []
    for stage, added in IMPORT_STAGES:
        modules.extend(added)
        code = IMPORT_PROBE.format(imports="\n".join(f"import {m}" for m in modules), forbidden=FORBIDDEN_MODULES)
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None
            forbidden = child.stdout.readline().strip()
            memory = memory_of(child.pid)
            child.stdin.close()
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode != 0:
            raise RuntimeError(f"importing {', '.join(modules)} failed with exit status {child.returncode}")
        costs.append(ImportCost(stage=stage, memory=memory, forbidden_loaded=forbidden or "none"))
    return costs


def upload(stub: operator_pb2_grpc.OperatorServiceStub, path: Path, variant_kind: str = "") -> None:
    """Upload a model file with the UploadModel stream, as `edgefleet models upload` does."""
    header = operator_pb2.UploadModelHeader(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        size_bytes=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        filename=path.name,
        variant_kind=variant_kind,
    )
    stub.UploadModel(upload_requests(path, header, progress=False), timeout=300)


def wait_serving(stub: operator_pb2_grpc.OperatorServiceStub, device_id: str) -> str:
    """Wait until the device reports the model as serving; return its variant id.

    Raises RuntimeError when the device reports a failure or does not serve within SERVING_TIMEOUT_S.
    """
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while True:
        device = stub.GetDevice(operator_pb2.GetDeviceRequest(device_id=device_id), timeout=10)
        status = next((m for m in device.models if m.model_name == MODEL_NAME), None)
        if status is not None and status.state == common_pb2.MODEL_STATE_SERVING:
            return status.variant_id
        if status is not None and status.state == common_pb2.MODEL_STATE_FAILED:
            raise RuntimeError(f"device {device_id} failed to load {status.variant_id}: {status.error}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"device {device_id} did not serve {MODEL_NAME} within {SERVING_TIMEOUT_S:g} s")
        time.sleep(0.3)


def run_inferences(socket: Path, count: int) -> float:
    """Run count inferences on zeros through the agent's local API; return the median latency in ms."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        models = stub.ListLocalModels(inference_pb2.ListLocalModelsRequest(), timeout=10).models
        model = next(m for m in models if m.model_name == MODEL_NAME)
        spec = tensor_from_proto(model.inputs[0])
        zeros = np.zeros([max(1, d) for d in spec.shape], dtype=spec.dtype)
        request = inference_pb2.InferRequest(model_name=MODEL_NAME, inputs=[array_to_tensor(spec.name, zeros)])
        latencies = [stub.Infer(request, timeout=60).latency_ms for _ in range(count)]
    return float(np.median(latencies))


@dataclass(frozen=True)
class AgentMemory:
    name: str
    profile: str
    variant_id: str
    registered: Memory
    serving: Memory
    after_inference: Memory
    infer_p50_ms: float


def agent_memory(fleet: LocalFleet, name: str) -> Memory:
    """Return the memory of an agent process and its children, if it has any."""
    process = psutil.Process(fleet.agents[name].popen.pid)
    total = memory_of(process.pid)
    for child in process.children(recursive=True):
        extra = memory_of(child.pid)
        total = Memory(rss=total.rss + extra.rss, uss=total.uss + extra.uss)
    return total


def measure_agents(fleet: LocalFleet, inferences: int, settle_s: float) -> list[AgentMemory]:
    """Start one agent per profile and measure each registered, serving, and after inferences."""
    onnx_path, tflite_path = ensure_efficientnet_lite0_onnx(), ensure_efficientnet_lite0_tflite()
    fleet.start_orchestrator()
    names = {profile: f"{profile}-01" for profile in PROFILES}
    for profile, name in names.items():
        fleet.start_agent(name, profile)
    devices = {d.labels["name"]: d.device_id for d in fleet.wait_for_devices(len(PROFILES))}
    time.sleep(settle_s)
    registered = {name: agent_memory(fleet, name) for name in names.values()}
    print(f"{len(devices)} agents registered; uploading and deploying {MODEL_NAME}", flush=True)

    with fleet.operator_channel() as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        upload(stub, onnx_path)
        upload(stub, tflite_path, variant_kind="tflite-fp32")
        variants = {}
        for name in names.values():
            request = operator_pb2.DeployRequest(
                model_name=MODEL_NAME, model_version=MODEL_VERSION, device_id=devices[name]
            )
            stub.Deploy(request, timeout=30)
            variants[name] = wait_serving(stub, devices[name])
    time.sleep(settle_s)
    serving = {name: agent_memory(fleet, name) for name in names.values()}
    latencies = {name: run_inferences(fleet.socket_of(name), inferences) for name in names.values()}
    after = {name: agent_memory(fleet, name) for name in names.values()}
    return [
        AgentMemory(
            name=name,
            profile=profile,
            variant_id=variants[name],
            registered=registered[name],
            serving=serving[name],
            after_inference=after[name],
            infer_p50_ms=latencies[name],
        )
        for profile, name in names.items()
    ]


def measure_swaps(swaps: int, release: bool) -> list[int]:
    """Run SWAP_SCRIPT in a fresh interpreter; return its RSS in bytes after the first load and each swap."""
    command = [sys.executable, "-c", SWAP_SCRIPT, str(ensure_efficientnet_lite0_onnx()), str(swaps), str(int(release))]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60 + 30 * swaps, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the swap run exited with status {completed.returncode}: {completed.stderr.strip()}")
    readings = [int(line) * 1024 for line in completed.stdout.split()]
    if len(readings) != swaps + 1:
        raise RuntimeError(f"the swap run printed {len(readings)} readings, expected {swaps + 1}")
    return readings


def print_swaps(with_release: Sequence[int], without_release: Sequence[int]) -> None:
    rows = [
        ("first load" if swap == 0 else str(swap), mib(released), mib(unreleased))
        for swap, (released, unreleased) in enumerate(zip(with_release, without_release, strict=True))
    ]
    print(f"RSS in MiB of a ModelHost after each swap of {MODEL_NAME} (install, then benchmark at 1 and 2 threads):")
    print(table(("SWAP", "WITH RELEASE_FREED_MEMORY", "WITHOUT"), rows))


def print_imports(costs: Sequence[ImportCost]) -> None:
    bare = costs[0].memory
    rows = [
        (
            cost.stage,
            mib(cost.memory.rss),
            mib(cost.memory.uss),
            mib(cost.memory.rss - bare.rss),
            cost.forbidden_loaded,
        )
        for cost in costs
    ]
    print("Import cost (each row a fresh interpreter that imports the modules of every row above it):")
    print(table(("STAGE", "RSS MIB", "USS MIB", "RSS OVER BARE MIB", "TORCH/SQLALCHEMY/ORCHESTRATOR"), rows))


def print_agents(results: Sequence[AgentMemory], inferences: int) -> None:
    rows = [
        (
            r.name,
            r.variant_id,
            mib(r.registered.rss),
            mib(r.registered.uss),
            mib(r.serving.rss),
            mib(r.serving.uss),
            mib(r.after_inference.rss),
            mib(r.after_inference.uss),
            f"{r.infer_p50_ms:.1f}",
        )
        for r in results
    ]
    print(f"Agent memory in MiB: registered with no model, serving {MODEL_NAME}, after {inferences} inferences:")
    print(
        table(
            (
                "AGENT",
                "VARIANT",
                "IDLE RSS",
                "IDLE USS",
                "SERVING RSS",
                "SERVING USS",
                "INFERRED RSS",
                "INFERRED USS",
                "INFER P50 MS",
            ),
            rows,
        )
    )
    print("USS: memory that only this process maps (psutil memory_full_info); RSS also counts shared libraries.")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the import cost and the memory of one agent per shipped profile; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inferences", type=int, default=20, help="inferences per agent before the last reading")
    parser.add_argument("--settle-s", type=float, default=3.0, help="seconds to wait before each reading")
    parser.add_argument(
        "--swaps",
        type=int,
        default=0,
        help="measure RSS across this many model swaps, with and without releasing freed memory, "
        "instead of the import and agent figures",
    )
    args = parser.parse_args(argv)
    if args.inferences < 1 or args.settle_s < 0 or args.swaps < 0:
        parser.error("--inferences must be at least 1, --settle-s and --swaps at least 0")

    print(f"Machine: {machine_line()}")
    if args.swaps:
        try:
            with_release = measure_swaps(args.swaps, release=True)
            without_release = measure_swaps(args.swaps, release=False)
        except KeyboardInterrupt:
            print("\nInterrupted.", file=sys.stderr)
            return 130
        print_swaps(with_release, without_release)
        return 0
    print_imports(measure_imports())
    print(flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-agent-memory-") as temp, sigterm_as_interrupt():
        fleet = LocalFleet(Path(temp))
        try:
            results = measure_agents(fleet, args.inferences, args.settle_s)
            print_agents(results, args.inferences)
            return 0
        except KeyboardInterrupt:
            print("\nInterrupted; stopping the agents and the orchestrator.", file=sys.stderr)
            return 130
        finally:
            fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
