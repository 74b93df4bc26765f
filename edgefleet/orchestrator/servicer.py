"""Thin gRPC servicers: they log, run the plain handlers off the event loop and map errors to status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc

from edgefleet.common.errors import EdgefleetError, InvalidArgument, internal_error_message
from edgefleet.common.serde import from_timestamp, timestamp
from edgefleet.orchestrator import serde
from edgefleet.orchestrator.domain import IdentityConflict
from edgefleet.orchestrator.fleet import TAKEOVER_WINDOW_S, TAKEOVERS_FOR_DUPLICATE, StreamSession
from edgefleet.orchestrator.handlers import catalog, deploy, devices, explain, metrics, rollouts
from edgefleet.orchestrator.handlers import jobs as compression_jobs
from edgefleet.orchestrator.security import admin as security_admin
from edgefleet.orchestrator.security.auth import revoked_text
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.orchestrator.store.engine import DatabaseUnavailable
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
# Artifact bytes read ahead per worker-thread hop of a download: 4 chunks at the default size, and
# 64 MiB for the default 64 concurrent downloads.
DOWNLOAD_BATCH_BYTES = 1024 * 1024


def _take_chunks(chunks: Iterator[agent_pb2.ArtifactChunk], max_bytes: int) -> list[agent_pb2.ArtifactChunk]:
    """Return the next chunks of a download, at least one and about max_bytes of data; [] at the end."""
    batch: list[agent_pb2.ArtifactChunk] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk.data)
        if size >= max_bytes:
            break
    return batch


class _UnexpectedErrors:
    """Logs each unexpected error with its id, and the traceback only the first time the same error occurs.

    An agent retries a download that fails the same way, so one broken artifact would otherwise log
    a traceback of some 50 lines per device and retry. Every id still gets a line, so the id that a
    caller saw can be found in the log.
    """

    # Distinct errors kept; one more clears them all, which at worst logs some tracebacks again.
    MAX_KEYS = 256

    def __init__(self) -> None:
        self._first: dict[tuple[str, str, str], tuple[str, int]] = {}

    def log(self, method: str, error_id: str, error: BaseException) -> None:
        key = (method, type(error).__name__, str(error))
        first = self._first.get(key)
        if first is None:
            if len(self._first) >= self.MAX_KEYS:
                self._first.clear()
            self._first[key] = (error_id, 1)
            log.error("[%s] unexpected error id=%s", method, error_id, exc_info=error)
            return
        first_id, count = first[0], first[1] + 1
        self._first[key] = (first_id, count)
        log.error(
            "[%s] unexpected error id=%s: %s: %s (the same error as id=%s, whose traceback is logged; %d times so far)",
            method,
            error_id,
            type(error).__name__,
            error,
            first_id,
            count,
        )


_unexpected_errors = _UnexpectedErrors()


class UnavailableCalls:
    """Logs the calls that fail because the database is unavailable, without a line for each.

    During an outage every agent's metric upload and every operator call fails the same way, every
    few seconds. The first failure of each method, and one whose message changed, is logged at info
    level; repeats go to debug level. recovered(), called when the database works again, logs how
    many calls of each method failed and starts over.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[str, int]] = {}

    def failed(self, method: str, error: DatabaseUnavailable) -> None:
        with self._lock:
            previous = self._failures.get(method)
            count = previous[1] + 1 if previous is not None else 1
            self._failures[method] = (error.message, count)
        if previous is None or previous[0] != error.message:
            log.info(
                "[%s] %s: %s (repeats are logged at debug level until the database works again)",
                method,
                error.code.name,
                error.message,
            )
        else:
            log.debug("[%s] %s: %s", method, error.code.name, error.message)

    def recovered(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, {}
        if failures:
            log.info(
                "calls that failed while the database was unavailable: %s",
                ", ".join(f"{method} {count}" for method, (_, count) in sorted(failures.items())),
            )


unavailable_calls = UnavailableCalls()


async def abort_with(context: grpc.aio.ServicerContext, method: str, error: BaseException) -> None:
    """End the call with the error's status; unexpected errors become INTERNAL without details."""
    if isinstance(error, DatabaseUnavailable):
        unavailable_calls.failed(method, error)
        await context.abort(error.code, error.message)
    if isinstance(error, EdgefleetError):
        log.info("[%s] %s: %s", method, error.code.name, error.message)
        await context.abort(error.code, error.message)
    error_id = uuid.uuid4().hex[:12]
    _unexpected_errors.log(method, error_id, error)
    await context.abort(grpc.StatusCode.INTERNAL, internal_error_message(error_id))


def _store_disconnect(state: OrchestratorState, device_id: str, last_heard: datetime) -> None:
    try:
        state.store.set_connected(device_id, False, last_heard)
    except NotFoundError:
        # An operator removed the device, which closed this stream; no row is left to update.
        log.info("device_id=%s was removed, so its disconnect is not recorded", device_id)
    except DatabaseUnavailable as error:
        # No traceback: during an outage every stream that closes ends here, and the cause is known.
        log.warning(
            "recording that device_id=%s disconnected failed: %s; the store shows it connected until it reconnects",
            device_id,
            error.message,
        )
    except Exception:
        log.exception("recording that device_id=%s disconnected failed; the store shows it connected", device_id)


async def _record_disconnect(state: OrchestratorState, session: StreamSession) -> None:
    """Store that a device's stream closed, even when the call is cancelled while the write waits.

    last_seen stays at the device's last message, not the close: a keepalive timeout closes the
    stream of a dead device a minute or more after it was last heard from.

    A cancelled await on run_in_executor also cancels the job if no worker thread has taken it yet,
    and the agent's cancel often arrives just after its half-close started this write. Shielding
    keeps the job queued, so the device is not left stored as connected.
    """
    last_heard = state.hub.last_seen.get(session.device_id, session.opened_at)
    loop = asyncio.get_running_loop()
    await asyncio.shield(loop.run_in_executor(None, _store_disconnect, state, session.device_id, last_heard))


async def _report_duplicate(state: OrchestratorState, device_id: str, instance_key: str, peer: str) -> None:
    """Warn that two agents seem to share one identity and record it as an identity conflict."""
    log.warning(
        "the control stream of device_id=%s was taken over %d times within %.0f s, now from %s: two agents "
        "probably share this device's identity (a copied state directory or cloned disk image)",
        device_id,
        TAKEOVERS_FOR_DUPLICATE,
        TAKEOVER_WINDOW_S,
        peer,
    )
    conflict = IdentityConflict(
        device_id=device_id, key_fingerprint=serde.key_hash(instance_key)[:12], peer=peer, seen_at=datetime.now(UTC)
    )
    try:
        await asyncio.to_thread(state.store.record_identity_conflict, conflict)
    except Exception:
        log.exception("recording the identity conflict of device_id=%s failed", device_id)


def unary(
    handler: Callable[[Any, OrchestratorState], Response],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Adapt handler(request, state) to an async gRPC method that runs it in a worker thread."""

    @functools.wraps(handler)
    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await asyncio.to_thread(handler, request, self.state)
        except Exception as error:
            await abort_with(context, handler.__name__, error)
            raise  # abort_with always raises; this satisfies the type checker.

    return method


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, state: OrchestratorState) -> None:
        self.state = state

    async def _device_id(self, context: grpc.aio.ServicerContext, claimed: str) -> str:
        """Return the device id of an agent call that passed the security checks; claimed without security."""
        security = self.state.security
        if security is None:
            return claimed
        identity = security.identify(context.auth_context(), claimed)
        await asyncio.to_thread(security.check_device, identity)
        return identity.device_id

    async def Register(
        self, request: agent_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RegisterResponse:
        try:
            identity = None
            if self.state.security is not None:
                identity = self.state.security.identify(context.auth_context(), request.device_id)
            return await asyncio.to_thread(devices.register, request, self.state, context.peer(), identity)
        except Exception as error:
            await abort_with(context, "AgentService.Register", error)
            raise

    async def Control(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.OrchestratorMessage]:
        peer = context.peer()
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        except EdgefleetError as error:
            await abort_with(context, "AgentService.Control", error)
            raise
        try:
            if first.WhichOneof("body") != "hello":
                raise InvalidArgument("body", "the first message on a control stream must be hello")
            hello = first.hello
            await self._device_id(context, hello.device_id)
            device = await asyncio.to_thread(
                devices.verify_identity, hello.device_id, hello.instance_key, self.state, peer
            )
        except Exception as error:
            await abort_with(context, "AgentService.Control", error)
            raise

        hub = self.state.hub
        # Opened before the desired state is read, so that a deploy committing in between pushes its
        # state on this stream. The send below then skips the older state it read.
        session = hub.open(device.device_id, peer)
        try:
            generation, assignments = await asyncio.to_thread(self.state.store.get_desired_state, device.device_id)
            await asyncio.to_thread(self.state.store.set_connected, device.device_id, True, datetime.now(UTC))
        except Exception as error:
            hub.release(session)
            await abort_with(context, "AgentService.Control", error)
            raise
        log.info("control stream opened for device_id=%s from %s", device.device_id, peer)
        if hub.duplicate_suspected(device.device_id):
            await _report_duplicate(self.state, device.device_id, hello.instance_key, peer)
        # A device that missed commands while offline is brought up to date at once.
        if hello.desired_generation != generation:
            session.send(serde.desired_state_message(generation, assignments))

        failure: list[BaseException] = []
        reader = asyncio.create_task(self._read(session, request_iterator, failure))
        try:
            while True:
                message = await session.queue.get()
                if message is None:
                    break
                if self.state.security is not None and message.WhichOneof("body") == "desired_state":
                    message = await asyncio.to_thread(self.state.security.sign_message, device.device_id, message)
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            session.close_reason = session.close_reason or "the call was cancelled"
            raise
        except Exception as error:
            session.close_reason = session.close_reason or f"sending a message failed: {error}"
            raise
        finally:
            reader.cancel()
            # Logged before the await below: gRPC can cancel this task while the disconnect write waits,
            # and the CancelledError would skip the line.
            log.info("control stream closed for device_id=%s: %s", device.device_id, session.close_reason)
            if hub.release(session):
                await _record_disconnect(self.state, session)
        if failure:
            await abort_with(context, "AgentService.Control", failure[0])
        if session.replaced_by:
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"a newer control stream of device {device.device_id!r} from {session.replaced_by} replaced this one; "
                "this is normal after a reconnect, but if it repeats, another agent uses this device's identity "
                "(a copied state directory or cloned disk image): give each device its own state directory",
            )
        security = self.state.security
        if security is not None and await asyncio.to_thread(security.is_revoked, device.device_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, revoked_text(device.device_id))
        removed = await asyncio.to_thread(self.state.store.get_removed_device, device.device_id)
        if removed is not None:
            await abort_with(context, "AgentService.Control", devices.removed_error(removed, self.state))

    async def _update_disk_free(self, device_id: str, free_bytes: int) -> None:
        """Store the free space a heartbeat reported, so that variant selection and `devices show` see it."""
        try:
            await asyncio.to_thread(self.state.store.update_disk_free, device_id, free_bytes)
        except NotFoundError:
            # The device was removed while its stream is open. When the stream ends, it is closed with
            # the removal error.
            log.info("not storing the free disk space of device_id=%s, which is no longer registered", device_id)
            return
        log.debug("device_id=%s reports %d bytes of free disk space", device_id, free_bytes)

    async def _read(
        self,
        session: StreamSession,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        failure: list[BaseException],
    ) -> None:
        """Handle the agent's messages until it closes the stream or sends something invalid."""
        device_id = session.device_id
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("body")
                if kind == "heartbeat":
                    self.state.hub.heartbeat(device_id)
                    sent_at = from_timestamp(message.heartbeat.sent_at)
                    if sent_at is not None:
                        self.state.hub.record_clock_skew(device_id, sent_at)
                    if message.heartbeat.HasField("disk_free_bytes"):
                        await self._update_disk_free(device_id, message.heartbeat.disk_free_bytes)
                    session.send(
                        agent_pb2.OrchestratorMessage(
                            heartbeat_ack=agent_pb2.HeartbeatAck(
                                sequence=message.heartbeat.sequence, server_time=timestamp(datetime.now(UTC))
                            )
                        )
                    )
                elif kind == "reported_state":
                    self.state.hub.heartbeat(device_id)
                    await asyncio.to_thread(devices.save_reported_state, device_id, message.reported_state, self.state)
                elif kind == "ack":
                    if not message.ack.ok:
                        log.warning(
                            "device_id=%s failed command %s: %s",
                            device_id,
                            message.ack.command_id,
                            message.ack.error,
                        )
                elif kind == "benchmark":
                    try:
                        await asyncio.to_thread(explain.save_benchmark_report, device_id, message.benchmark, self.state)
                    except EdgefleetError as error:
                        # A report about a deleted variant, say, is dropped without closing the stream.
                        log.warning("dropped a benchmark report of device_id=%s: %s", device_id, error.message)
                else:
                    raise InvalidArgument("body", f"unexpected control message {kind or 'with no body'}")
            # grpc.aio (1.85) ends the request iterator without an error when a keepalive timeout drops the
            # connection, as when the agent closes its side, so the two look the same here.
            reason = "the agent's side of the stream ended: the agent closed it or the connection was lost"
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            log.info("control stream of device_id=%s broke: %s", device_id, error.code().name)
            reason = f"the stream broke with {error.code().name}"
        except Exception as error:
            failure.append(error)
            reason = f"handling a message from the agent failed: {error}"
        session.close(reason)

    async def DownloadArtifact(
        self, request: agent_pb2.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        downloads = self.state.limits.downloads
        try:
            await self._device_id(context, request.device_id)
            downloads.acquire()
        except Exception as error:
            await abort_with(context, "AgentService.DownloadArtifact", error)
            raise
        try:
            try:
                chunks = await asyncio.to_thread(catalog.open_download, request, self.state)
            except Exception as error:
                await abort_with(context, "AgentService.DownloadArtifact", error)
                raise
            iterator = iter(chunks)
            while True:
                # File reads run in a worker thread, a few chunks per hop: one hop per chunk cost more
                # CPU than the read itself.
                batch = await asyncio.to_thread(_take_chunks, iterator, DOWNLOAD_BATCH_BYTES)
                if not batch:
                    return
                for chunk in batch:
                    yield chunk
        finally:
            downloads.release()

    async def UploadMetrics(
        self, request: agent_pb2.UploadMetricsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.UploadMetricsResponse:
        try:
            await self._device_id(context, request.device_id)
            return await asyncio.to_thread(metrics.upload_metrics, request, self.state)
        except Exception as error:
            await abort_with(context, "AgentService.UploadMetrics", error)
            raise


class OperatorServicer(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(self, state: OrchestratorState) -> None:
        self.state = state

    ListDevices = unary(devices.list_devices)
    GetDevice = unary(devices.get_device)
    RemoveDevice = unary(devices.remove_device)
    ListModels = unary(catalog.list_models)
    GetModel = unary(catalog.get_model)
    ListVariants = unary(catalog.list_variants)
    DeleteModel = unary(catalog.delete_model)
    Deploy = unary(deploy.deploy)
    CreateCompressionJob = unary(compression_jobs.create_compression_job)
    GetCompressionJob = unary(compression_jobs.get_compression_job)
    ListCompressionJobs = unary(compression_jobs.list_compression_jobs)
    CancelCompressionJob = unary(compression_jobs.cancel_compression_job)
    QueryMetrics = unary(metrics.query_metrics)
    CreateEnrollmentToken = unary(security_admin.create_enrollment_token)
    ListEnrollmentTokens = unary(security_admin.list_enrollment_tokens)
    RevokeEnrollmentToken = unary(security_admin.revoke_enrollment_token)
    RevokeDevice = unary(security_admin.revoke_device)
    CreateApiToken = unary(security_admin.create_api_token)
    ListApiTokens = unary(security_admin.list_api_tokens)
    RevokeApiToken = unary(security_admin.revoke_api_token)
    ListSigningKeys = unary(security_admin.list_signing_keys)
    RotateSigningKey = unary(security_admin.rotate_signing_key)
    RetireSigningKey = unary(security_admin.retire_signing_key)
    ExplainSelection = unary(explain.explain_selection)
    CreateRollout = unary(rollouts.create_rollout)
    GetRollout = unary(rollouts.get_rollout)
    ListRollouts = unary(rollouts.list_rollouts)
    UpdateRollout = unary(rollouts.update_rollout)

    async def UploadModel(
        self,
        request_iterator: AsyncIterator[operator_pb2.UploadModelRequest],
        context: grpc.aio.ServicerContext,
    ) -> operator_pb2.Model:
        try:
            return await catalog.upload_model(request_iterator, self.state)
        except Exception as error:
            await abort_with(context, "OperatorService.UploadModel", error)
            raise
