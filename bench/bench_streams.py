"""Measure how many idle agent control streams one orchestrator process holds, and what each one costs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import grpc
import psutil
from common import machine_line, mib, raise_open_files_limit, rss_of, sigterm_as_interrupt

from edgefleet.cli.views import table
from edgefleet.demo.processes import LocalFleet
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2, operator_pb2, operator_pb2_grpc

TARGET_STREAMS = 5000
STEPS = (1000, 2500, 5000, 10000)
QUICK_STEPS = (50, 100)
# Agents ping every 30 s, as edgefleet.agent.agent.CHANNEL_OPTIONS does. Each channel gets its own
# subchannel pool, so that every channel opens its own HTTP/2 connection instead of sharing one.
CLIENT_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.use_local_subchannel_pool", 1),
]
# ListDevices returns every online device in one message, so the 4 MiB default is raised.
OPERATOR_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
REGISTER_CONCURRENCY = 16  # Register calls in flight per client process.
OPEN_CONCURRENCY = 64  # Streams per client process that wait for their first heartbeat ack at once.
OPEN_TIMEOUT_S = 300.0


def bench_hardware() -> common_pb2.HardwareProfile:
    """Return a valid hardware profile of a two-core ARM gateway, as an agent's probe reports it."""
    return common_pb2.HardwareProfile(
        cpu_model="Cortex-A72",
        architecture="aarch64",
        logical_cores=2,
        usable_cores=2.0,
        cpu_features=["neon", "fp16"],
        memory_total_bytes=2 * 1024**3,
        memory_available_bytes=1024**3,
        disk_free_bytes=8 * 1024**3,
        runtimes=[common_pb2.Runtime(name="onnxruntime", version="1.32.0", providers=["CPUExecutionProvider"])],
        os="Linux",
        kernel="6.1.0",
    )


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    instance_key: str


@dataclass(frozen=True)
class WorkerStats:
    """Counters of one client process, read at the end of the idle window."""

    open_streams: int  # Streams that received their first heartbeat ack and have not ended.
    acked_in_window: int  # Open streams that received at least one heartbeat ack in the window.
    ack_latencies_ms: list[float]  # Heartbeat write to ack read, for every ack in the window.
    failures: dict[str, int]  # Ended streams and failed calls by status code name.
    cpu_s: float  # CPU time of the client process since it started.


@dataclass
class WorkerState:
    heartbeat_s: float
    open_streams: int = 0
    last_ack: dict[str, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    streams_on_last_channel: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class StreamEnded(Exception):
    """The orchestrator ended a control stream."""


async def read_ack(call: Any, sequence: int) -> None:
    """Read messages until the ack of heartbeat sequence arrives; raise StreamEnded at the end of the stream."""
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            raise StreamEnded("the orchestrator closed the control stream")
        if message.WhichOneof("body") == "heartbeat_ack" and message.heartbeat_ack.sequence == sequence:
            return


async def heartbeat(call: Any, state: WorkerState, device_id: str, sequence: int) -> None:
    sent = time.monotonic()
    await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=sequence)))
    await read_ack(call, sequence)
    now = time.monotonic()
    state.last_ack[device_id] = now
    state.latencies_ms.append((now - sent) * 1000)


async def hold_stream(stub: Any, device: DeviceIdentity, state: WorkerState, opened: asyncio.Future[bool]) -> None:
    """Open a control stream, wait for the first heartbeat ack, then heartbeat every interval until cancelled."""
    call = stub.Control()
    counted = False
    try:
        hello = agent_pb2.Hello(device_id=device.device_id, instance_key=device.instance_key)
        await call.write(agent_pb2.AgentMessage(hello=hello))
        await heartbeat(call, state, device.device_id, 0)
        state.open_streams += 1
        counted = True
        opened.set_result(True)
        # A random first delay spreads the heartbeats evenly over the interval, as independent agents do.
        await asyncio.sleep(random.uniform(0, state.heartbeat_s))
        sequence = 1
        while True:
            started = time.monotonic()
            await heartbeat(call, state, device.device_id, sequence)
            sequence += 1
            await asyncio.sleep(max(0.0, state.heartbeat_s - (time.monotonic() - started)))
    except asyncio.CancelledError:
        call.cancel()
        raise
    except grpc.aio.AioRpcError as error:
        state.failures[error.code().name] += 1
    except StreamEnded:
        state.failures["ENDED"] += 1
    finally:
        if counted:
            state.open_streams -= 1
            state.last_ack.pop(device.device_id, None)
        if not opened.done():
            opened.set_result(False)


def next_channel(state: WorkerState, address: str, streams_per_channel: int) -> grpc.aio.Channel:
    """Return the newest channel, or open a new one when it carries streams_per_channel streams."""
    if not state.channels or state.streams_on_last_channel >= streams_per_channel:
        state.channels.append(grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS))
        state.streams_on_last_channel = 0
    state.streams_on_last_channel += 1
    return state.channels[-1]


async def register_all(address: str, devices: Sequence[DeviceIdentity]) -> tuple[int, dict[str, int]]:
    """Register devices with REGISTER_CONCURRENCY calls in flight; return (registered, failures by code)."""
    hardware = bench_hardware()
    failures: Counter[str] = Counter()
    limit = asyncio.Semaphore(REGISTER_CONCURRENCY)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)

        async def register(device: DeviceIdentity) -> bool:
            request = agent_pb2.RegisterRequest(
                device_id=device.device_id,
                instance_key=device.instance_key,
                hardware=hardware,
                labels={"fleet": "bench"},
                agent_version="bench",
            )
            async with limit:
                try:
                    await stub.Register(request, timeout=120)
                except grpc.aio.AioRpcError as error:
                    failures[error.code().name] += 1
                    return False
            return True

        results = await asyncio.gather(*(register(device) for device in devices))
    return sum(results), dict(failures)


async def open_all(
    address: str, devices: Sequence[DeviceIdentity], state: WorkerState, streams_per_channel: int
) -> int:
    """Open a stream per device with OPEN_CONCURRENCY opening at once; return how many got their first ack."""
    limit = asyncio.Semaphore(OPEN_CONCURRENCY)
    loop = asyncio.get_running_loop()

    async def open_one(device: DeviceIdentity) -> bool:
        async with limit:
            stub = agent_pb2_grpc.AgentServiceStub(next_channel(state, address, streams_per_channel))
            opened: asyncio.Future[bool] = loop.create_future()
            task = asyncio.create_task(hold_stream(stub, device, state, opened))
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)
            try:
                return await asyncio.wait_for(opened, OPEN_TIMEOUT_S)
            except TimeoutError:
                state.failures["OPEN_TIMEOUT"] += 1
                return False

    results = await asyncio.gather(*(open_one(device) for device in devices))
    return sum(results)


def collect_stats(state: WorkerState, window_start: float) -> WorkerStats:
    stats = WorkerStats(
        open_streams=state.open_streams,
        acked_in_window=sum(1 for seen in state.last_ack.values() if seen >= window_start),
        ack_latencies_ms=state.latencies_ms,
        failures=dict(state.failures),
        cpu_s=time.process_time(),
    )
    state.latencies_ms = []
    return stats


async def serve_commands(connection: Connection, address: str, heartbeat_s: float, streams_per_channel: int) -> None:
    """Run the commands the parent sends until "stop" or until the parent goes away."""
    state = WorkerState(heartbeat_s=heartbeat_s)
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                command, argument = await loop.run_in_executor(None, connection.recv)
            except EOFError:
                return
            if command == "register":
                started = time.monotonic()
                registered, failures = await register_all(address, argument)
                connection.send((registered, failures, time.monotonic() - started))
            elif command == "open":
                opened = await open_all(address, argument, state, streams_per_channel)
                connection.send(opened)
            elif command == "stats":
                connection.send(collect_stats(state, argument))
            elif command == "stop":
                return
            else:
                raise ValueError(f"unknown command {command!r}; expected register, open, stats or stop")
    finally:
        for task in list(state.tasks):
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        for channel in state.channels:
            await channel.close()


def worker_main(connection: Connection, address: str, heartbeat_s: float, streams_per_channel: int) -> None:
    """Entry point of a client process; the parent stops it, so Ctrl-C in the terminal is ignored here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_open_files_limit()
    asyncio.run(serve_commands(connection, address, heartbeat_s, streams_per_channel))


@dataclass
class Worker:
    process: BaseProcess
    connection: Connection

    def request(self, command: str, argument: object = None) -> Any:
        self.connection.send((command, argument))
        return self.connection.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.connection.send(("stop", None))
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start_workers(count: int, address: str, heartbeat_s: float, streams_per_channel: int) -> list[Worker]:
    # spawn, not fork: the parent has gRPC loaded, and a forked gRPC runtime is not safe to use.
    context = multiprocessing.get_context("spawn")
    workers = []
    for index in range(count):
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=worker_main,
            args=(child_end, address, heartbeat_s, streams_per_channel),
            name=f"bench-client-{index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        workers.append(Worker(process=process, connection=parent_end))
    return workers


def ask_all(workers: Sequence[Worker], command: str, arguments: Sequence[object]) -> list[Any]:
    """Send one command to every worker at once, then collect the replies in order."""
    for worker, argument in zip(workers, arguments, strict=True):
        worker.connection.send((command, argument))
    return [worker.connection.recv() for worker in workers]


def count_online(address: str) -> tuple[int, float, int]:
    """Return (devices online, seconds ListDevices took, response bytes) as the orchestrator reports them."""
    with grpc.insecure_channel(address, options=OPERATOR_CHANNEL_OPTIONS) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        started = time.monotonic()
        response = stub.ListDevices(
            operator_pb2.ListDevicesRequest(status=common_pb2.DEVICE_STATUS_ONLINE), timeout=300
        )
        return len(response.devices), time.monotonic() - started, response.ByteSize()


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True)
class StepResult:
    streams: int
    open_streams: int
    acked_in_window: int
    online: int
    open_s: float
    rss: int
    rss_per_stream: int
    orchestrator_cpu_percent: float
    client_cpu_percent: float
    ack_p50_ms: float
    ack_p99_ms: float
    list_devices_s: float
    list_devices_bytes: int
    orchestrator_fds: int
    failures: dict[str, int]


def split(items: Sequence[DeviceIdentity], parts: int) -> list[list[DeviceIdentity]]:
    """Deal items round-robin into parts lists."""
    return [list(items[index::parts]) for index in range(parts)]


def run_step(
    workers: Sequence[Worker],
    new_devices: Sequence[DeviceIdentity],
    total: int,
    orchestrator: psutil.Process,
    rss_registered: int,
    address: str,
    idle_s: float,
) -> StepResult:
    """Open streams for new_devices, then measure the idle orchestrator holding total streams."""
    started = time.monotonic()
    opened = ask_all(workers, "open", split(new_devices, len(workers)))
    open_s = time.monotonic() - started
    print(f"  {total} streams: {sum(opened)} of {len(new_devices)} new streams opened in {open_s:.1f} s", flush=True)

    # The idle window: every stream sends one heartbeat per interval and nothing else happens.
    window_start = time.monotonic()
    # This call also drops the ack latencies of the opening phase.
    client_cpu_start = sum(stats.cpu_s for stats in ask_all(workers, "stats", [window_start] * len(workers)))
    orchestrator.cpu_percent(None)
    time.sleep(idle_s)
    orchestrator_cpu = orchestrator.cpu_percent(None)
    window = time.monotonic() - window_start
    stats: list[WorkerStats] = ask_all(workers, "stats", [window_start] * len(workers))
    client_cpu = sum(s.cpu_s for s in stats) - client_cpu_start
    rss = orchestrator.memory_info().rss
    fds = orchestrator.num_fds()

    online, list_s, list_bytes = count_online(address)
    latencies = [latency for s in stats for latency in s.ack_latencies_ms]
    failures: Counter[str] = Counter()
    for s in stats:
        failures.update(s.failures)
    return StepResult(
        streams=total,
        open_streams=sum(s.open_streams for s in stats),
        acked_in_window=sum(s.acked_in_window for s in stats),
        online=online,
        open_s=open_s,
        rss=rss,
        rss_per_stream=(rss - rss_registered) // max(total, 1),
        orchestrator_cpu_percent=orchestrator_cpu,
        client_cpu_percent=100 * client_cpu / window,
        ack_p50_ms=statistics.median(latencies) if latencies else float("nan"),
        ack_p99_ms=percentile(latencies, 0.99),
        list_devices_s=list_s,
        list_devices_bytes=list_bytes,
        orchestrator_fds=fds,
        failures=dict(failures),
    )


def print_results(results: Sequence[StepResult], rss_start: int, rss_registered: int, quick: bool) -> None:
    print()
    print(f"Orchestrator RSS: {mib(rss_start)} MiB at start, {mib(rss_registered)} MiB with every device registered")
    rows = [
        (
            r.streams,
            r.open_streams,
            r.acked_in_window,
            r.online,
            f"{r.open_s:.1f}",
            mib(r.rss),
            f"{r.rss_per_stream / 1024:.1f}",
            f"{r.orchestrator_cpu_percent:.1f}",
            f"{r.client_cpu_percent:.1f}",
            f"{r.ack_p50_ms:.1f}",
            f"{r.ack_p99_ms:.1f}",
            f"{r.list_devices_s:.1f}",
            mib(r.list_devices_bytes),
            r.orchestrator_fds,
            ",".join(f"{code}={count}" for code, count in sorted(r.failures.items())) or "none",
        )
        for r in results
    ]
    print(
        table(
            (
                "STREAMS",
                "OPEN",
                "ACKED",
                "ONLINE",
                "OPEN S",
                "RSS MIB",
                "KIB/STREAM",
                "CPU %",
                "CLIENT CPU %",
                "ACK P50 MS",
                "ACK P99 MS",
                "LIST S",
                "LIST MIB",
                "FDS",
                "FAILURES",
            ),
            rows,
        )
    )
    print()
    print(
        "OPEN: streams that got their first heartbeat ack and are still open. ACKED: open streams acked during the\n"
        "idle window. ONLINE: devices that ListDevices(status=ONLINE) returns. OPEN S: time to open the step's new\n"
        "streams. KIB/STREAM: (RSS - RSS with every device registered) / streams. CPU %: orchestrator CPU over the\n"
        "idle window (100 % = one core). LIST S and LIST MIB: time and response size of that ListDevices call.\n"
        "FDS: orchestrator file descriptors."
    )
    best = max((r.streams for r in results if r.acked_in_window == r.streams), default=0)
    verdict = "met" if best >= TARGET_STREAMS else "NOT met"
    if quick:
        verdict = "not checked in a quick run"
    print(f"Target of {TARGET_STREAMS} concurrent idle control streams in one process: {verdict} (held {best})")


def steps_for(max_streams: int, quick: bool) -> list[int]:
    candidates = QUICK_STEPS if quick else STEPS
    steps = [step for step in candidates if step < max_streams]
    steps.append(max_streams)
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stepped benchmark and print one row per step; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--max-streams", type=int, default=None, help=f"largest step, in streams (default {TARGET_STREAMS}, quick 100)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 50 and 100 streams, a 1 s heartbeat, a 3 s idle window"
    )
    parser.add_argument("--clients", type=int, default=4, help="client processes that hold the streams")
    parser.add_argument("--streams-per-channel", type=int, default=200, help="streams per client HTTP/2 connection")
    parser.add_argument(
        "--heartbeat-s", type=float, default=None, help="seconds between heartbeats of one stream (default 10, quick 1)"
    )
    parser.add_argument("--idle-s", type=float, default=None, help="idle window per step in seconds (default 20)")
    args = parser.parse_args(argv)
    max_streams = args.max_streams or (max(QUICK_STEPS) if args.quick else TARGET_STREAMS)
    heartbeat_s = args.heartbeat_s or (1.0 if args.quick else 10.0)
    idle_s = args.idle_s or 2 * heartbeat_s + (1.0 if args.quick else 0.0)
    if max_streams < 1 or args.clients < 1 or args.streams_per_channel < 1:
        parser.error("--max-streams, --clients and --streams-per-channel must be at least 1")
    if idle_s < heartbeat_s:
        parser.error(f"--idle-s ({idle_s:g}) must be at least the heartbeat interval ({heartbeat_s:g} s)")
    steps = steps_for(max_streams, args.quick)

    print(f"Machine: {machine_line()}")
    print(
        f"Steps: {', '.join(map(str, steps))} streams over {args.clients} client processes, at most "
        f"{args.streams_per_channel} streams per connection, a heartbeat every {heartbeat_s:g} s, "
        f"{idle_s:g} s idle window",
        flush=True,
    )
    raise_open_files_limit()
    workers: list[Worker] = []
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as temp, sigterm_as_interrupt():
        fleet = LocalFleet(Path(temp), heartbeat_interval_s=heartbeat_s, secure=False)
        try:
            fleet.start_orchestrator()
            assert fleet.orchestrator is not None
            orchestrator = psutil.Process(fleet.orchestrator.popen.pid)
            rss_start = rss_of(orchestrator.pid)
            workers = start_workers(args.clients, fleet.address, heartbeat_s, args.streams_per_channel)

            devices = [DeviceIdentity(f"bench-{i:05d}", secrets.token_hex(16)) for i in range(max_streams)]
            cpu_before = orchestrator.cpu_times()
            started = time.monotonic()
            replies = ask_all(workers, "register", split(devices, len(workers)))
            register_s = time.monotonic() - started
            cpu_after = orchestrator.cpu_times()
            registered = sum(reply[0] for reply in replies)
            register_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
            print(
                f"Registered {registered} of {len(devices)} devices in {register_s:.1f} s "
                f"({registered / register_s:.0f}/s, orchestrator CPU {register_cpu:.1f} s, "
                f"{1000 * register_cpu / max(registered, 1):.2f} ms per device)",
                flush=True,
            )
            if registered != len(devices):
                failures = Counter[str]()
                for reply in replies:
                    failures.update(reply[1])
                print(f"Registration failed for some devices: {dict(failures)}", file=sys.stderr)
                return 1
            time.sleep(1.0)
            rss_registered = rss_of(orchestrator.pid)

            results = []
            done = 0
            for step in steps:
                results.append(
                    run_step(workers, devices[done:step], step, orchestrator, rss_registered, fleet.address, idle_s)
                )
                done = step
                if results[-1].acked_in_window < step:
                    print(f"  stopping: only {results[-1].acked_in_window} of {step} streams were acked", flush=True)
                    break
            print_results(results, rss_start, rss_registered, args.quick)
            return 0
        except KeyboardInterrupt:
            print("\nInterrupted; stopping the clients and the orchestrator.", file=sys.stderr)
            return 130
        finally:
            for worker in workers:
                worker.stop()
            fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
