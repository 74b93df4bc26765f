"""The agent's life cycle: serve local models, register, hold the control stream, upload metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from edgefleet import __version__
from edgefleet.agent.benchmark import BenchmarkWorker
from edgefleet.agent.buffer import BufferLimits, MetricBuffer
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.delivery import Downloader, ModelStore
from edgefleet.agent.identity import Identity, load_identity, lock_state_dir, save_identity
from edgefleet.agent.local_api import LocalApiServer
from edgefleet.agent.metrics import MetricsRecorder
from edgefleet.agent.probe import DiskUsage, disk_usage, resident_bytes
from edgefleet.agent.profiles import EnforcedLimits
from edgefleet.agent.reconcile import DESIRED_FILE, Reconciler
from edgefleet.agent.runtime.host import ModelHost
from edgefleet.agent.tensor_socket import TensorSocketServer
from edgefleet.agent.verify import ArtifactVerifier, VerificationError, key_set_ids
from edgefleet.common.backoff import Backoff
from edgefleet.common.files import SocketPathError, bind_error_message, prepare_socket_path
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.logs import RetryLog
from edgefleet.common.serde import hardware_to_proto
from edgefleet.common.systemd import Notifier
from edgefleet.common.tls import channel_credentials, device_id_from_file
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keepalive:
    """Client keepalive: ping after time_s without reads, give up on the link timeout_s after a ping.

    The defaults ping every 30 s. The orchestrator accepts pings every 10 s or slower by default
    (OrchestratorConfig.keepalive_min_ping_interval_s), so it never rejects these. A rejected ping
    makes the server close the connection with GOAWAY too_many_pings, so keep time_s at or above
    the server's minimum when changing either side.
    """

    time_s: float = 30.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.time_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"keepalive time and timeout must be positive, got {self.time_s} s and {self.timeout_s} s")


# The largest value HTTP/2 allows for SETTINGS_MAX_FRAME_SIZE (RFC 9113, section 6.5.2).
HTTP2_MAX_FRAME_SIZE = 2**24 - 1


def channel_options(keepalive: Keepalive, max_backoff_s: float | None = None) -> list[tuple[str, int]]:
    """Return the gRPC channel options of the agent's connections to the orchestrator.

    max_backoff_s caps the wait between gRPC's own connection attempts; None keeps gRPC's default.
    """
    options = [
        ("grpc.keepalive_time_ms", round(keepalive.time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive.timeout_s * 1000)),
        # gRPC 1.85 closes a connection whose ping goes unanswered after grpc.http2.ping_timeout_ms,
        # 60 s by default. With keepalive_timeout_ms alone a blackholed link stayed open in
        # tests/faults/test_keepalive.py, so both carry the timeout.
        ("grpc.http2.ping_timeout_ms", round(keepalive.timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        # Largest HTTP/2 DATA frame the orchestrator may send: a 256 KiB model chunk then travels in one
        # frame instead of sixteen of the 16 KiB default (bench/bench_download.py).
        ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_SIZE),
    ]
    if max_backoff_s is not None:
        # After a failed connection attempt, a gRPC channel fails every call at once with the last error
        # until its own backoff ends: from 1 s, times 1.6 per attempt, up to 120 s (gRPC's
        # doc/connection-backoff.md). Without this cap an agent reconnected up to two minutes after the
        # orchestrator came back, whatever --max-backoff-s was set to.
        cap_ms = max(1, round(max_backoff_s * 1000))
        options.append(("grpc.initial_reconnect_backoff_ms", min(1000, cap_ms)))
        options.append(("grpc.max_reconnect_backoff_ms", cap_ms))
    return options


CHANNEL_OPTIONS = channel_options(Keepalive())
# Errors that a reconnect cannot fix: the agent exits so that systemd does not restart it in a loop.
FATAL_CODES = (
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    # A missing or expired enrollment token, or a certificate the orchestrator does not accept.
    grpc.StatusCode.UNAUTHENTICATED,
)
# A session that lasted this long counts as healthy, so the next reconnect starts from a short delay.
HEALTHY_SESSION_S = 30.0
# During an outage that keeps the same error, the agent warns once per this many seconds that the
# orchestrator is still unreachable, and logs the attempts in between at debug level.
OUTAGE_WARNING_INTERVAL_S = 300.0
# How often a connected agent checks for downloads to retry, and the least wait before a retry.
RETRY_CHECK_S = 1.0
# A heartbeat carries the model store's free space once it moved this far from the figure the
# orchestrator has. The step is the least of 64 MiB, 1 % of the file system and 1/8 of the smaller
# of the two free figures, but never less than 64 KiB. The relative step matters on a nearly full disk,
# where a few MiB decide which variant files fit and the fixed steps would hide them.
DISK_FREE_REPORT_STEP_BYTES = 64 * 1024 * 1024
DISK_FREE_REPORT_STEP_FRACTION = 0.01
DISK_FREE_REPORT_STEP_OF_FREE = 1 / 8
DISK_FREE_REPORT_MIN_STEP_BYTES = 64 * 1024


class FatalAgentError(Exception):
    """The orchestrator rejected this agent for a reason a retry cannot fix."""


RetryCallback = Callable[[grpc.aio.AioRpcError, float], None]


async def _ended_stream_error(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    """Convert the final status of an ended control stream to an AioRpcError.

    A final status of OK becomes UNAVAILABLE, because the stream ended all the same.
    """
    code = await call.code()
    details = await call.details()
    if code == grpc.StatusCode.OK:
        code, details = grpc.StatusCode.UNAVAILABLE, "control stream ended"
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def write_control(call: grpc.aio.StreamStreamCall, message: agent_pb2.AgentMessage) -> None:
    """Write message to the control stream, or raise AioRpcError with the final status if it ended.

    grpc.aio raises InvalidStateError, not AioRpcError, for a write to a call that has already ended.
    That happens when the orchestrator goes away while the agent is busy, for example applying a
    desired state, so the caller reconnects as it does for any other lost stream.
    """
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        raise await _ended_stream_error(call) from None


async def reconnect_forever(
    session: Callable[[], Awaitable[None]],
    backoff: Backoff,
    stop: asyncio.Event,
    *,
    on_retry: RetryCallback | None = None,
    describe: Callable[[], str] = lambda: "device",
) -> None:
    """Run session() again and again until stop is set, sleeping backoff.next_delay() after each failure.

    A session that fails with a gRPC error is retried after a delay drawn with full jitter, so a
    fleet that lost the orchestrator at once spreads its reconnects across the backoff window. A
    session that lasted HEALTHY_SESSION_S resets the backoff. on_retry(error, delay) is called
    before each wait. Raises FatalAgentError for the FATAL_CODES, naming describe(), which is called then
    so that it can name a device id assigned by an earlier session.
    """
    while not stop.is_set():
        started = time.monotonic()
        try:
            await session()
        except grpc.aio.AioRpcError as error:
            if error.code() in FATAL_CODES:
                raise FatalAgentError(f"orchestrator rejected {describe()}: {error.details()}") from None
            if time.monotonic() - started > HEALTHY_SESSION_S:
                backoff.reset()
            delay = backoff.next_delay()
            if on_retry is not None:
                on_retry(error, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)


class OutageLog:
    """Logs failed connection attempts: a warning for the first and for a new status code, then one per interval.

    A fleet of agents that lost its orchestrator for hours would otherwise log a warning per attempt
    each. The attempts in between are logged at debug level, and the first connection after the
    outage logs how long it lasted. An error counts as new only when its gRPC status code differs,
    because the details of one outage vary from attempt to attempt, such as "Socket closed" and
    "Connection reset by peer" when a proxy resets the connection. Each OutageLog serves one orchestrator address.
    """

    def __init__(
        self,
        orchestrator: str,
        interval_s: float = OUTAGE_WARNING_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.orchestrator = orchestrator
        self.interval_s = interval_s
        self._clock = clock
        self.attempts = 0
        self._started = 0.0
        self._warned = 0.0
        self._last_code = ""
        self._connected_before = False

    def failed(self, code: str, details: str, delay: float) -> None:
        """Record a failed attempt with its gRPC status code name and details; log it as the class describes."""
        now = self._clock()
        error = f"{code}: {details}"
        if self.attempts == 0:
            self._started = now
        self.attempts += 1
        if self.attempts == 1 or code != self._last_code:
            self._warned = now
            log.warning(
                "connection to orchestrator %s failed (%s); retrying in %.1f s",
                self.orchestrator,
                error,
                delay,
            )
        elif now - self._warned >= self.interval_s:
            self._warned = now
            log.warning(
                "orchestrator %s still unreachable after %d attempts over %.0f s (%s); retrying in %.1f s",
                self.orchestrator,
                self.attempts,
                now - self._started,
                error,
                delay,
            )
        else:
            log.debug("connection attempt %d to orchestrator %s failed (%s)", self.attempts, self.orchestrator, error)
        self._last_code = code

    def ended(self) -> None:
        if self.attempts:
            # "again" only after an earlier connection of this process, not after a failed first start.
            log.info(
                "connected to orchestrator %s %safter %d failed attempts over %.0f s",
                self.orchestrator,
                "again " if self._connected_before else "",
                self.attempts,
                self._clock() - self._started,
            )
        self.attempts = 0
        self._last_code = ""
        self._connected_before = True


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        hardware: HardwareProfile,
        limits: EnforcedLimits,
        allowed_runtimes: tuple[str, ...],
        *,
        keepalive: Keepalive | None = None,
        buffer_limits: BufferLimits | None = None,
        read_disk_usage: Callable[[Path], DiskUsage] = disk_usage,
    ) -> None:
        """Set up the agent's parts.

        keepalive and buffer_limits default to Keepalive() and BufferLimits(). read_disk_usage reads
        the free space of the model store's file system for heartbeats, and tests replace it.
        """
        self.config = config
        self.hardware = hardware
        self._read_disk_usage = read_disk_usage
        # The free space the orchestrator has: sent in the registration or the last heartbeat that carried it.
        self._reported_disk_free = hardware.disk_free_bytes
        self.limits = limits
        config.state_dir.mkdir(parents=True, exist_ok=True)
        # Held until run() returns; raises IdentityError (a ValueError) while another agent runs here.
        self._state_lock = lock_state_dir(config.state_dir)
        self.identity: Identity = load_identity(config.state_dir)
        self.credentials: grpc.ChannelCredentials | None = None
        if not config.insecure:
            # Raises CredentialsError (a ValueError) for missing or unreadable files.
            self.credentials = channel_credentials(config.ca_cert, config.cert, config.key)
            self._adopt_certificate_id(device_id_from_file(config.cert) if config.cert else "")
        self.verifier = ArtifactVerifier(config.state_dir, self.identity.device_id)
        self.recorder = MetricsRecorder(config.metrics_window_s)
        # Windows wait here, on disk, until the orchestrator acknowledges them, across restarts too.
        self.metric_buffer = MetricBuffer(config.state_dir / "metrics", buffer_limits)
        self.channel_options = channel_options(keepalive or Keepalive(), config.max_backoff_s)
        self.host = ModelHost(default_threads=limits.threads, on_latency=self._on_latency)
        self.store = ModelStore(config.state_dir / "models")
        self._sync_channel = (
            grpc.insecure_channel(config.orchestrator, options=self.channel_options)
            if self.credentials is None
            else grpc.secure_channel(config.orchestrator, self.credentials, options=self.channel_options)
        )
        self.downloader = Downloader(self._sync_channel, self.store, device_id=self.identity.device_id)
        # Benchmarks run on their own thread within the device's thread budget and report on the control stream.
        self.benchmarks = BenchmarkWorker(self._send, max_threads=limits.threads)
        self.reconciler = Reconciler(
            host=self.host,
            store=self.store,
            downloader=self.downloader,
            state_dir=config.state_dir,
            allowed_runtimes=allowed_runtimes,
            default_threads=limits.threads,
            # A profile's threads may exceed its pinned CPUs, as an explicit choice of the operator.
            max_threads=max(len(limits.cpus), limits.threads),
            memory_budget_bytes=limits.memory_budget_bytes,
            memory_limit_bytes=limits.memory_limit_bytes,
            # The runtimes are imported now (ModelHost), so this is the agent's memory without a model.
            process_bytes=resident_bytes(),
            report=self._queue_report,
            on_serving=self._benchmark_installed,
            verifier=self.verifier,
        )
        self.local_api = LocalApiServer(self.host, config.socket_path)
        self.tensor_socket = TensorSocketServer(self.host, config.tensor_socket_path)
        self.ready = asyncio.Event()  # Set once registered or serving from local state.
        self.notifier = Notifier()
        self._outage = OutageLog(config.orchestrator)
        # During an outage every round of metric uploads fails the same way, every few seconds.
        self._upload_log = RetryLog(log)
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = False  # A control stream is open.
        self.sessions_opened = 0  # Control streams opened since start, reconnects included.

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    def _adopt_certificate_id(self, certificate_id: str) -> None:
        """Take the device id from the client certificate; raise ValueError when the stored id differs."""
        if not certificate_id or certificate_id == self.identity.device_id:
            return
        if self.identity.device_id:
            raise ValueError(
                f"the certificate {self.config.cert} is issued to device {certificate_id!r}, but the state directory "
                f"{self.config.state_dir} belongs to device {self.identity.device_id!r}; use that device's "
                "certificate or a new state directory"
            )
        self.identity = replace(self.identity, device_id=certificate_id)
        save_identity(self.config.state_dir, self.identity)

    def _on_latency(self, name: str, variant_id: str, latency_ms: float | None, ok: bool) -> None:
        served = self.host.get(name)
        self.recorder.record(name, served.version if served else "", variant_id, latency_ms, ok)

    def _queue_report(self, state: agent_pb2.ReportedState) -> None:
        """Send reported state from any thread; dropped while disconnected (a full report follows the next hello)."""
        if self._loop is None or self._outbox is None:
            return
        message = agent_pb2.AgentMessage(reported_state=state)
        outbox = self._outbox
        self._loop.call_soon_threadsafe(outbox.put_nowait, message)

    def _send(self, message: agent_pb2.AgentMessage) -> None:
        """Send a message on the control stream from any thread; dropped while disconnected."""
        if self._loop is None or self._outbox is None:
            return
        outbox = self._outbox
        self._loop.call_soon_threadsafe(outbox.put_nowait, message)

    def _benchmark_installed(self, variant_id: str, path: Path, model_format: str) -> None:
        self.benchmarks.submit(variant_id, path, model_format)

    def _run_benchmark(self, command_id: str, request: agent_pb2.RunBenchmark) -> None:
        """Queue a RunBenchmark command on a served variant; the ack follows the report."""
        served = [m for m in self.host.list() if m.variant_id == request.variant_id]
        if not served:
            installed = ", ".join(m.variant_id for m in self.host.list()) or "none"
            error = f"variant {request.variant_id!r} is not served on this device (served: {installed})"
            log.warning("cannot run benchmark %s: %s", command_id, error)
            self._send(agent_pb2.AgentMessage(ack=agent_pb2.CommandAck(command_id=command_id, error=error)))
            return
        model = served[0]
        self.benchmarks.submit(
            model.variant_id,
            model.path,
            model.format,
            max_threads=request.max_threads,
            runs=request.runs,
            command_id=command_id,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until stop is set.

        Raises FatalAgentError when the orchestrator rejects this device, and SocketPathError when the
        agent cannot bind its local API socket or tensor socket.
        """
        self._loop = asyncio.get_running_loop()
        # Checked before the models load, which may take long, and before either socket is bound, so that a
        # bad --tensor-socket leaves no local API socket behind.
        prepare_socket_path(self.config.socket_path, "local API socket", "--socket")
        prepare_socket_path(self.config.tensor_socket_path, "tensor socket", "--tensor-socket")
        if self.device_id:
            await asyncio.to_thread(self.reconciler.restore)
        elif (self.config.state_dir / DESIRED_FILE).exists():
            # The file belongs to a former device id, since identity.json has none, and no signature in it
            # verifies for the id that the orchestrator assigns next.
            log.info(
                "not serving the models of %s, which a former device id received; waiting for the desired state "
                "of the new id",
                self.config.state_dir / DESIRED_FILE,
            )
        # The sockets open after the restore, so that a client does not get NOT_FOUND for a model that is still
        # loading from local files. Until then a client fails to connect, as to an agent that has not started.
        self._start_sockets()
        if self.host.list():
            self._mark_ready(f"serving {len(self.host.list())} models from local state; connecting to the orchestrator")
        channel = (
            grpc.aio.insecure_channel(self.config.orchestrator, options=self.channel_options)
            if self.credentials is None
            else grpc.aio.secure_channel(self.config.orchestrator, self.credentials, options=self.channel_options)
        )
        background = [asyncio.create_task(self._upload_loop(channel, stop))]
        if self.notifier.watchdog_interval_s is not None:
            background.append(asyncio.create_task(self._watchdog_loop(self.notifier.watchdog_interval_s)))
        try:
            await self._connect_loop(channel, stop)
        finally:
            self.notifier.stopping(f"stopping; device {self.device_id or '(unregistered)'}")
            self.reconciler.stop()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._final_upload(channel)
            await channel.close()
            self._sync_channel.close()
            self.local_api.stop()
            await asyncio.to_thread(self.tensor_socket.stop)
            await asyncio.to_thread(self.benchmarks.close)
            self.host.close()
            self.notifier.close()
            os.close(self._state_lock)
            log.info("agent stopped device_id=%s", self.device_id)

    def _start_sockets(self) -> None:
        """Start the local API and the tensor socket; on failure, raise SocketPathError with neither one bound."""
        self.local_api.start()
        path = self.config.tensor_socket_path
        try:
            self.tensor_socket.start()
        except SocketPathError:
            self.local_api.stop()
            raise
        except OSError as error:
            self.local_api.stop()
            raise SocketPathError(bind_error_message(error, path, "tensor socket", "--tensor-socket")) from error

    def _mark_ready(self, status: str) -> None:
        """Tell systemd the agent is ready (once) and publish a status line."""
        if not self.ready.is_set():
            self.ready.set()
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    async def _watchdog_loop(self, interval_s: float) -> None:
        # Pings come from the event loop, so a stuck loop stops them and systemd restarts the agent.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    async def _connect_loop(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        def on_retry(error: grpc.aio.AioRpcError, delay: float) -> None:
            self.notifier.status(
                f"orchestrator {self.config.orchestrator} unreachable ({error.code().name}); "
                f"retrying in {delay:.0f} s; serving {len(self.host.list())} models"
            )
            self._outage.failed(error.code().name, error.details() or "", delay)

        await reconnect_forever(
            lambda: self._session(channel, stop),
            Backoff(cap_s=self.config.max_backoff_s),
            stop,
            on_retry=on_retry,
            describe=lambda: f"device {self.device_id or '(new)'}",
        )

    async def _session(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        usage = await asyncio.to_thread(self._read_disk_usage, self.store.root)
        if usage.total_bytes:
            self.hardware = replace(self.hardware, disk_free_bytes=usage.reported_free_bytes)
        self._reported_disk_free = self.hardware.disk_free_bytes
        response = await stub.Register(
            agent_pb2.RegisterRequest(
                device_id=self.identity.device_id,
                instance_key=self.identity.instance_key,
                hardware=hardware_to_proto(self.hardware),
                labels=self.config.labels,
                agent_version=__version__,
                enrollment_token=self.config.enrollment_token,
            ),
            timeout=15,
        )
        if response.device_id != self.identity.device_id:
            self.identity = replace(self.identity, device_id=response.device_id)
            save_identity(self.config.state_dir, self.identity)
            self.downloader.device_id = response.device_id
            # A state directory reused after identity.json was deleted keeps the former id's counters,
            # which would reject the new id's first assignments.
            await asyncio.to_thread(self.verifier.clear_counters, response.device_id)
        self.verifier.device_id = self.device_id
        try:
            await asyncio.to_thread(self.verifier.update_keys, response.trusted_keys, first_use=True)
        except VerificationError as error:
            log.error(
                "ignoring the signing key set %s from the registration: %s", key_set_ids(response.trusted_keys), error
            )
        log.info("registered as device_id=%s with orchestrator %s", self.device_id, self.config.orchestrator)
        self._outage.ended()
        self._mark_ready(
            f"connected to {self.config.orchestrator} as {self.device_id}; serving {len(self.host.list())} models"
        )

        self._outbox = asyncio.Queue()
        call = stub.Control()
        await write_control(
            call,
            agent_pb2.AgentMessage(
                hello=agent_pb2.Hello(
                    device_id=self.device_id,
                    instance_key=self.identity.instance_key,
                    desired_generation=self.reconciler.hello_generation(),
                )
            ),
        )
        await write_control(call, agent_pb2.AgentMessage(reported_state=self.reconciler.reported_state()))
        interval = max(1, response.heartbeat_interval_seconds)
        self.connected = True
        self.sessions_opened += 1
        apply_lock = asyncio.Lock()
        tasks = [
            asyncio.create_task(self._write_loop(call)),
            asyncio.create_task(self._heartbeat_loop(interval)),
            asyncio.create_task(self._read_loop(call, apply_lock)),
            asyncio.create_task(self._retry_loop(apply_lock)),
            asyncio.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if not stop.is_set():
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "control stream ended",
                )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()
            self._outbox = None
            self.connected = False

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        assert self._outbox is not None
        outbox = self._outbox
        while True:
            message = await outbox.get()
            await write_control(call, message)

    async def _heartbeat_loop(self, interval_s: int) -> None:
        sequence = 0
        while True:
            await asyncio.sleep(interval_s)
            sequence += 1
            heartbeat = agent_pb2.Heartbeat(sequence=sequence)
            heartbeat.sent_at.GetCurrentTime()
            disk_free = await self._changed_disk_free()
            if disk_free is not None:
                heartbeat.disk_free_bytes = disk_free
            if self._outbox is not None:
                self._outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=heartbeat))

    async def _changed_disk_free(self) -> int | None:
        """Read the model store's free space, and return it if it moved far enough from the reported figure.

        Far enough is the least of DISK_FREE_REPORT_STEP_BYTES, DISK_FREE_REPORT_STEP_FRACTION of the
        file system and DISK_FREE_REPORT_STEP_OF_FREE of the smaller free figure, but never less than
        DISK_FREE_REPORT_MIN_STEP_BYTES. So a download or a file written or deleted elsewhere on the
        disk shows up without a new figure on every heartbeat. Returns None otherwise, and when the
        read failed.
        """
        usage = await asyncio.to_thread(self._read_disk_usage, self.store.root)
        if not usage.total_bytes:
            return None
        free = usage.reported_free_bytes
        step = min(
            DISK_FREE_REPORT_STEP_BYTES,
            int(usage.total_bytes * DISK_FREE_REPORT_STEP_FRACTION),
            int(min(free, self._reported_disk_free) * DISK_FREE_REPORT_STEP_OF_FREE),
        )
        if abs(free - self._reported_disk_free) < max(step, DISK_FREE_REPORT_MIN_STEP_BYTES):
            return None
        log.info(
            "free space of the model store %s changed from %d to %d bytes, so the next heartbeat reports it",
            self.store.root,
            self._reported_disk_free,
            free,
        )
        self._reported_disk_free = free
        self.hardware = replace(self.hardware, disk_free_bytes=free)
        return free

    async def _read_loop(self, call: grpc.aio.StreamStreamCall, apply_lock: asyncio.Lock) -> None:
        """Read commands from the orchestrator, applying desired states in order in tasks of their own.

        The loop goes on reading while a desired state is applied, so a newer one can stop a download
        that it no longer wants (Reconciler.supersede).
        """
        applying: set[asyncio.Task[None]] = set()
        try:
            async for message in call:
                kind = message.WhichOneof("body")
                if kind == "desired_state":
                    desired = message.desired_state
                    log.info(
                        "received desired state generation %d with %d models", desired.generation, len(desired.models)
                    )
                    # The key set is adopted now, not when the apply runs: an apply may wait behind a long
                    # download, and a reconnect drops the waiting applies, while the orchestrator sends a key
                    # rotation or retirement only once.
                    await asyncio.to_thread(self.reconciler.update_keys, desired)
                    ticket = self.reconciler.supersede(desired)
                    task = asyncio.create_task(self._apply(desired, ticket, apply_lock))
                    applying.add(task)
                    task.add_done_callback(applying.discard)
                elif kind == "heartbeat_ack":
                    continue
                elif kind == "run_benchmark":
                    self._run_benchmark(message.command_id, message.run_benchmark)
                else:
                    log.info("ignoring unsupported command %s (%s)", kind, message.command_id)
        finally:
            for task in applying:
                task.cancel()

    async def _apply(self, desired: agent_pb2.DesiredState, ticket: int, apply_lock: asyncio.Lock) -> None:
        # asyncio.Lock wakes its waiters in order, so desired states are applied in the order they came.
        async with apply_lock:
            try:
                await asyncio.to_thread(self.reconciler.apply, desired, ticket=ticket)
            except Exception:
                log.exception("applying desired state generation %d failed", desired.generation)

    async def _retry_loop(self, apply_lock: asyncio.Lock) -> None:
        """Retry, while the control stream stays open, the downloads that failed in a way that may succeed later.

        The waits grow with full jitter up to --max-backoff-s, as reconnects do, and start short again
        once nothing waits for a retry.
        """
        backoff = Backoff(cap_s=self.config.max_backoff_s)
        while True:
            if not self.reconciler.retry_later:
                backoff.reset()
                await asyncio.sleep(RETRY_CHECK_S)
                continue
            await asyncio.sleep(RETRY_CHECK_S + backoff.next_delay())
            async with apply_lock:
                await asyncio.to_thread(self.reconciler.retry_pending)

    async def _upload_loop(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        """Move finished windows to disk every interval, and start sending unless a send is still running.

        Writing to disk does not wait for the sending, so windows reach the disk buffer on time even
        while an upload hangs on a dead link until its deadline.
        """
        sending: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                await asyncio.sleep(min(self.config.metrics_window_s, 5.0))
                try:
                    await asyncio.to_thread(self._spill, False)
                except Exception:
                    log.exception("moving metric windows to the disk buffer failed; retrying at the next interval")
                if sending is None or sending.done():
                    sending = asyncio.create_task(self._send_logged(channel))
        finally:
            if sending is not None:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)

    async def _send_logged(self, channel: grpc.aio.Channel) -> None:
        try:
            await self._upload(channel, include_open=False)
        except Exception:
            log.exception("metric upload failed for device_id=%s; retrying at the next interval", self.device_id)

    async def _final_upload(self, channel: grpc.aio.Channel) -> None:
        """Write the open windows to the disk buffer at shutdown and try to deliver them within a short bound."""
        await asyncio.to_thread(self._spill, True)
        try:
            await asyncio.wait_for(self._upload(channel, include_open=True), timeout=self.config.shutdown_grace_s)
        except TimeoutError:
            log.warning(
                "%d metric batches not delivered before shutdown; they stay on disk for the next start",
                len(self.metric_buffer),
            )

    async def _upload(self, channel: grpc.aio.Channel, *, include_open: bool) -> None:
        """Write finished windows to the disk buffer as new batches, then send the buffered batches oldest first.

        A batch keeps the id it got on disk across retries and restarts, so the orchestrator stores it
        once. Its file is deleted only after the orchestrator acknowledged it (stored now or before).
        A batch the orchestrator rejects as INVALID_ARGUMENT is dropped with a warning, because
        resending it cannot succeed. After any other error the remaining batches wait for the next round.
        """
        await asyncio.to_thread(self._spill, include_open)
        if not self.device_id:
            return
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        while True:
            batch = await asyncio.to_thread(self.metric_buffer.oldest)
            if batch is None:
                return
            request = agent_pb2.UploadMetricsRequest(
                device_id=self.device_id, batch_id=batch.batch_id, windows=batch.windows
            )
            try:
                response = await stub.UploadMetrics(request, timeout=10)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    await asyncio.to_thread(self.metric_buffer.drop, batch.batch_id, error.details() or "rejected")
                    continue
                # Compared by status code only, because the details of one outage vary between attempts.
                self._upload_log.failed(
                    "metrics",
                    error.code().name,
                    "metric upload of batch %s failed (%s: %s); %d batches wait on disk for the next try",
                    batch.batch_id,
                    error.code().name,
                    error.details(),
                    len(self.metric_buffer),
                )
                return
            self._upload_log.succeeded("metrics", "metric upload")
            log.debug(
                "uploaded batch %s: %d windows (duplicate=%s)",
                batch.batch_id,
                response.accepted,
                response.duplicate,
            )
            await asyncio.to_thread(self.metric_buffer.remove, batch.batch_id)

    def _spill(self, include_open: bool) -> None:
        """Move the recorder's finished windows (all with include_open) into the disk buffer."""
        while True:
            windows = self.recorder.drain(include_open=include_open)
            if not windows:
                return
            try:
                self.metric_buffer.append(windows)
            except OSError as error:
                log.error(
                    "cannot write %d metric windows (%d inferences) to the buffer %s: %s; they are lost",
                    len(windows),
                    sum(w.inference_count for w in windows),
                    self.metric_buffer.directory,
                    error,
                )
                return
