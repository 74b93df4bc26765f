"""Measure DownloadArtifact throughput over loopback gRPC per chunk size, and the bytes a resume re-sends.

The first table serves the artifact from a bare gRPC servicer over the orchestrator's chunk iterator,
to find the transport's cost per chunk size. The second downloads a real 100 MB ONNX model from a real
orchestrator process (embedded SQLite, plaintext loopback), after registering a device and deploying
the model to it, at the default chunk size: the path an agent takes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from edgefleet.agent.agent import CHANNEL_OPTIONS
from edgefleet.agent.delivery import Downloader, ModelStore
from edgefleet.demo.processes import LocalFleet
from edgefleet.orchestrator.artifacts import FileArtifactStore, sha256_file
from edgefleet.orchestrator.download import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, DownloadError, iter_chunks
from edgefleet.orchestrator.server import SERVER_OPTIONS
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc

KiB = 1024
MiB = 1024 * 1024
CHUNK_SIZES = (64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB)
TARGET_MB_PER_S = 1000.0


class BenchServicer(agent_pb2_grpc.AgentServiceServicer):
    """DownloadArtifact over iter_chunks; counts bytes served and can cut one stream with UNAVAILABLE."""

    def __init__(self, artifacts: FileArtifactStore) -> None:
        self.artifacts = artifacts
        self.lock = threading.Lock()
        self.bytes_served = 0
        self.cut_at_offset: int | None = None

    def DownloadArtifact(
        self, request: agent_pb2.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.ArtifactChunk]:
        try:
            chunks = iter_chunks(self.artifacts, request.digest, request.offset, request.chunk_size)
        except DownloadError as error:
            context.abort(error.status_code, str(error))
        for chunk in chunks:
            if self.cut_at_offset is not None and chunk.offset >= self.cut_at_offset:
                self.cut_at_offset = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "benchmark cut the stream")
            with self.lock:
                self.bytes_served += len(chunk.data)
            yield chunk


def start_server(servicer: BenchServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def serve_in_child(root: str, connection: Connection) -> None:
    """Run the orchestrator side in its own process, as in production, and send its address back."""
    server, address = start_server(BenchServicer(FileArtifactStore(root)))
    connection.send(address)
    while connection.recv() == "cpu":
        connection.send(time.process_time())
    server.stop(grace=None)


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    client_cpu_s: float  # CPU time of this process: gRPC threads, verification, writes.
    server_cpu_s: float  # CPU time of the server process.


def server_cpu_s(connection: Connection) -> float:
    connection.send("cpu")
    return float(connection.recv())


def process_cpu_s(pid: int) -> float:
    """Return the user and system CPU seconds of a process."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def measure(run: Callable[[], None], server_cpu: Callable[[], float]) -> Measurement:
    server_start = server_cpu()
    cpu_start = time.process_time()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    return Measurement(wall, time.process_time() - cpu_start, server_cpu() - server_start)


def raw_stream(address: str, digest: str, chunk_size: int, device_id: str = "") -> None:
    """Receive every chunk without verifying or storing it."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.DownloadArtifactRequest(digest=digest, chunk_size=chunk_size, device_id=device_id)
        for _chunk in stub.DownloadArtifact(request):
            pass


def full_download(address: str, digest: str, chunk_size: int, device_root: Path, device_id: str = "") -> None:
    """Run Downloader.fetch: verify each chunk, write, fsync every 8 MiB and check the whole file."""
    store = ModelStore(device_root)
    store.discard_partial(digest)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        Downloader(channel, store, chunk_size=chunk_size, device_id=device_id).fetch(digest)
    store.discard_partial(digest)


def measure_resume(artifacts: FileArtifactStore, digest: str, size: int, device_root: Path) -> tuple[int, int]:
    """Cut one stream at 85 % and return (bytes re-sent, chunk size) for the default chunk size."""
    servicer = BenchServicer(artifacts)
    servicer.cut_at_offset = int(size * 0.85)
    server, address = start_server(servicer)
    store = ModelStore(device_root)
    store.discard_partial(digest)
    try:
        with grpc.insecure_channel(address) as channel:
            Downloader(channel, store, sleep=lambda seconds: None).fetch(digest)
    finally:
        server.stop(grace=None)
        store.discard_partial(digest)
    return servicer.bytes_served - size, DEFAULT_CHUNK_SIZE


def onnx_of_size(path: Path, size: int) -> Path:
    """Write a valid ONNX model (one MatMul) whose float32 weight takes about size bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    side = int((size / 4) ** 0.5)
    weight = np.random.default_rng(0).standard_normal((side, side), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])],
        [numpy_helper.from_array(weight, "weight")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def deployed_artifact(fleet: LocalFleet, model_path: Path) -> tuple[str, str]:
    """Register a device with the fleet's orchestrator, upload and deploy model_path; return (device id, digest)."""
    import secrets

    from edgefleet.agent.probe import probe_hardware
    from edgefleet.cli.main import upload_requests
    from edgefleet.common.serde import hardware_to_proto

    with grpc.insecure_channel(fleet.address) as channel:
        registration = agent_pb2_grpc.AgentServiceStub(channel).Register(
            agent_pb2.RegisterRequest(
                instance_key=secrets.token_hex(16),
                hardware=hardware_to_proto(probe_hardware(store_dir=fleet.work_dir)),
                agent_version="bench",
            ),
            timeout=60,
        )
    with fleet.operator_channel() as channel:
        operator = operator_pb2_grpc.OperatorServiceStub(channel)
        header = operator_pb2.UploadModelHeader(
            name="large",
            version="1",
            size_bytes=model_path.stat().st_size,
            sha256=sha256_file(model_path),
            filename=model_path.name,
        )
        operator.UploadModel(upload_requests(model_path, header, progress=False), timeout=600)
        response = operator.Deploy(
            operator_pb2.DeployRequest(model_name="large", device_id=registration.device_id), timeout=60
        )
    return registration.device_id, response.assignment.digest


def median_of(measurements: list[Measurement]) -> Measurement:
    """Return the run with the median wall time."""
    return sorted(measurements, key=lambda measurement: measurement.wall_s)[len(measurements) // 2]


def format_row(measurement: Measurement, size: int) -> str:
    gigabytes = size / 1e9
    return (
        f"{size / measurement.wall_s / 1e6:>8.0f} {measurement.client_cpu_s / gigabytes:>10.2f} "
        f"{measurement.server_cpu_s / gigabytes:>10.2f}"
    )


def main() -> None:
    """Print throughput and CPU cost per chunk size, raw and through the Downloader, then the resume case."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=100, help="artifact size in MB (10**6 bytes)")
    parser.add_argument("--runs", type=int, default=3, help="runs per chunk size; the median is printed")
    parser.add_argument("--skip-orchestrator", action="store_true", help="skip the real-orchestrator table")
    args = parser.parse_args()
    size = args.size_mb * 1000 * 1000

    with tempfile.TemporaryDirectory(prefix="bench-download-") as temp:
        temp_path = Path(temp)
        source = temp_path / "artifact.bin"
        source.write_bytes(os.urandom(size))
        artifacts = FileArtifactStore(temp_path / "artifacts")
        digest = artifacts.put_file(source, move=True)
        device_root = temp_path / "device"

        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        server_process = context.Process(target=serve_in_child, args=(str(artifacts.root), child_end))
        server_process.start()
        address = parent_end.recv()

        print(f"bench_download: {args.size_mb} MB artifact, loopback gRPC {grpc.__version__},")
        print(f"server in a separate process, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(f"target {TARGET_MB_PER_S:.0f} MB/s; median of {args.runs} runs; CPU in seconds per GB")
        print(f"{'':>8} {'raw stream':^30} {'Downloader':^30}")
        columns = f"{'MB/s':>8} {'client':>10} {'server':>10}"
        print(f"{'chunk':>8} {columns} {columns}")
        try:
            for chunk_size in CHUNK_SIZES:
                server_cpu = partial(server_cpu_s, parent_end)
                raw = median_of(
                    [measure(partial(raw_stream, address, digest, chunk_size), server_cpu) for _ in range(args.runs)]
                )
                full = median_of(
                    [
                        measure(partial(full_download, address, digest, chunk_size, device_root), server_cpu)
                        for _ in range(args.runs)
                    ]
                )
                print(f"{chunk_size // KiB:>4} KiB {format_row(raw, size)} {format_row(full, size)}")
        finally:
            parent_end.send("stop")
            server_process.join(timeout=10)

        resent, chunk_size = measure_resume(artifacts, digest, size, device_root)
        print(f"resume after a cut at 85 %: {resent} bytes re-sent (chunk size {chunk_size // KiB} KiB)")
        if not args.skip_orchestrator:
            through_orchestrator(temp_path, size, args.runs)


def through_orchestrator(temp_path: Path, size: int, runs: int) -> None:
    """Print raw and Downloader figures for a real model downloaded from a real orchestrator process."""
    fleet = LocalFleet(temp_path / "fleet", secure=False)
    fleet.start_orchestrator()
    assert fleet.orchestrator is not None
    rows: list[tuple[str, Measurement]] = []
    try:
        model_path = onnx_of_size(temp_path / "large.onnx", size)
        model_size = model_path.stat().st_size
        device_id, digest = deployed_artifact(fleet, model_path)
        model_path.unlink()
        server_cpu = partial(process_cpu_s, fleet.orchestrator.popen.pid)
        device_root = temp_path / "fleet-device"
        for chunk_size in (DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE):
            stream = partial(raw_stream, fleet.address, digest, chunk_size, device_id)
            download = partial(full_download, fleet.address, digest, chunk_size, device_root, device_id)
            # The first stream computes and caches the chunk digests, as the first device of a rollout does.
            rows.append((f"{chunk_size // KiB} KiB, first stream", measure(stream, server_cpu)))
            rows.append(
                (f"{chunk_size // KiB} KiB, raw stream", median_of([measure(stream, server_cpu) for _ in range(runs)]))
            )
            rows.append(
                (
                    f"{chunk_size // KiB} KiB, Downloader",
                    median_of([measure(download, server_cpu) for _ in range(runs)]),
                )
            )
    finally:
        fleet.stop()
    print(f"real orchestrator process, {model_size / 1e6:.0f} MB ONNX model:")
    print(f"{'':>26} {'MB/s':>8} {'client':>10} {'server':>10}")
    for label, measurement in rows:
        print(f"{label:>26} {format_row(measurement, model_size)}")


if __name__ == "__main__":
    main()
