"""Live fleet state in one orchestrator process: open control streams, last-seen times, device status."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edgefleet.orchestrator.domain import Device
from edgefleet.orchestrator.store.base import Store
from edgefleet.v1 import agent_pb2

log = logging.getLogger(__name__)

# Bound on commands queued for one stream. A device that cannot keep up gets its stream closed
# and re-syncs from the desired state when it reconnects, so nothing is lost by the bound.
MAX_QUEUED_COMMANDS = 64

# A device whose stream is taken over this many times within the window is most likely run by two
# agents with one identity (a copied state directory or a cloned disk image): each one's reconnect
# closes the other's stream. A single reconnect after a broken connection takes over once.
TAKEOVER_WINDOW_S = 60.0
TAKEOVERS_FOR_DUPLICATE = 3


@dataclass(eq=False)
class StreamSession:
    """One open control stream. Commands for the agent go through its queue."""

    device_id: str
    peer: str
    opened_at: datetime
    replaced_by: str = ""  # The peer whose newer stream of the same device closed this one.
    queue: asyncio.Queue[agent_pb2.OrchestratorMessage | None] = field(
        default_factory=lambda: asyncio.Queue(MAX_QUEUED_COMMANDS)
    )
    desired_generation: int = 0  # The generation of the newest desired state queued on this stream.
    close_reason: str = ""  # The cause of the stream's end, for the log line of its close.

    def send(self, message: agent_pb2.OrchestratorMessage) -> bool:
        """Queue a message without waiting; return False when the queue is full.

        A desired state older than one queued before is skipped, and True returned. Handlers read the
        desired state in worker threads and queue it later, so a push that read it before a concurrent
        deploy can arrive after that deploy's push. The agent would apply the older state over the newer
        one. The same generation is queued again, because a key rotation resends it with the new key set,
        which the stream attaches when it sends the message.
        """
        if message.WhichOneof("body") == "desired_state":
            generation = message.desired_state.generation
            if generation < self.desired_generation:
                log.info(
                    "skipped desired state generation %d for device_id=%s: generation %d is queued already",
                    generation,
                    self.device_id,
                    self.desired_generation,
                )
                return True
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            return False
        if message.WhichOneof("body") == "desired_state":
            self.desired_generation = message.desired_state.generation
        return True

    def close(self, reason: str = "the orchestrator closed it") -> None:
        """Ask the stream's writer to finish, because of reason. A None in the queue ends it.

        The first reason given is kept for the log line of the close, because later ones follow from it.
        """
        if not self.close_reason:
            self.close_reason = reason
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class FleetHub:
    """Tracks open streams and heartbeats; writes last-seen times to the store in batches.

    A heartbeat only updates a dict in memory. flush() writes all pending times in one
    transaction, so 5,000 agents heartbeating every 10 s cost one write every flush interval
    instead of 500 writes a second.
    """

    def __init__(
        self, store: Store, *, stale_after_s: float, offline_after_s: float, max_clock_skew_s: float = 60.0
    ) -> None:
        self.store = store
        self.stale_after_s = stale_after_s
        self.offline_after_s = offline_after_s
        self.max_clock_skew_s = max_clock_skew_s
        # Device clock minus orchestrator clock at the last heartbeat, in seconds. Kept in memory
        # only: it is measured again at the first heartbeat after a restart.
        self.clock_skew_s: dict[str, float] = {}
        self.sessions: dict[str, StreamSession] = {}
        self.last_seen: dict[str, datetime] = {}
        self._pending: dict[str, datetime] = {}
        self._takeovers: dict[str, deque[datetime]] = {}
        self._duplicate_reported: dict[str, datetime] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # Set by the server once its loop runs.

    def open(self, device_id: str, peer: str) -> StreamSession:
        """Register a new stream for a device, closing an older stream of the same device."""
        previous = self.sessions.get(device_id)
        if previous is not None:
            log.info(
                "replacing control stream of device_id=%s (old peer %s, new peer %s)",
                device_id,
                previous.peer,
                peer,
            )
            previous.replaced_by = peer
            previous.close(f"a newer stream of the device from {peer} replaced it")
        now = datetime.now(UTC)
        if previous is not None:
            takeovers = self._takeovers.setdefault(device_id, deque(maxlen=TAKEOVERS_FOR_DUPLICATE))
            takeovers.append(now)
        session = StreamSession(device_id=device_id, peer=peer, opened_at=now)
        self.sessions[device_id] = session
        self.heartbeat(device_id, now)
        return session

    def duplicate_suspected(self, device_id: str, now: datetime | None = None) -> bool:
        """Return True when the device's stream was taken over TAKEOVERS_FOR_DUPLICATE times within
        TAKEOVER_WINDOW_S, at most once per window, so that the caller reports it once."""
        now = now or datetime.now(UTC)
        recent = [at for at in self._takeovers.get(device_id, ()) if (now - at).total_seconds() <= TAKEOVER_WINDOW_S]
        if len(recent) < TAKEOVERS_FOR_DUPLICATE:
            return False
        reported = self._duplicate_reported.get(device_id)
        if reported is not None and (now - reported).total_seconds() <= TAKEOVER_WINDOW_S:
            return False
        self._duplicate_reported[device_id] = now
        return True

    def release(self, session: StreamSession) -> bool:
        """Forget a stream that ended; return False if a newer stream of the device replaced it."""
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]
            return True
        return False

    def heartbeat(self, device_id: str, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        self.last_seen[device_id] = now
        self._pending[device_id] = now

    def record_clock_skew(self, device_id: str, sent_at: datetime, now: datetime | None = None) -> float:
        """Store and return a device's clock skew from a heartbeat's device-clock send time.

        The value includes the one-way network delay, normally milliseconds. Logs a warning when the
        skew crosses max_clock_skew_s and when it comes back within it.
        """
        now = now or datetime.now(UTC)
        skew = (sent_at - now).total_seconds()
        was_skewed = self.is_clock_skewed(device_id)
        self.clock_skew_s[device_id] = skew
        skewed = self.is_clock_skewed(device_id)
        if skewed and not was_skewed:
            log.warning(
                "device_id=%s clock is off by %+.1f s (bound %.0f s); its metric windows are placed at their "
                "receive time in queries until the clock is fixed",
                device_id,
                skew,
                self.max_clock_skew_s,
            )
        elif was_skewed and not skewed:
            log.info("device_id=%s clock is back within %.0f s (%+.1f s)", device_id, self.max_clock_skew_s, skew)
        return skew

    def is_clock_skewed(self, device_id: str) -> bool:
        """Return whether the device's last measured skew exceeds max_clock_skew_s."""
        return abs(self.clock_skew_s.get(device_id, 0.0)) > self.max_clock_skew_s

    def skewed_devices(self) -> frozenset[str]:
        """Return the ids of devices whose last measured skew exceeds max_clock_skew_s."""
        return frozenset(d for d, skew in self.clock_skew_s.items() if abs(skew) > self.max_clock_skew_s)

    def push(self, device_id: str, message: agent_pb2.OrchestratorMessage) -> bool:
        """Send a message to a connected device; return False when it is not connected here."""
        session = self.sessions.get(device_id)
        if session is None:
            return False
        if not session.send(message):
            log.warning("command queue full for device_id=%s; closing its stream so it re-syncs", device_id)
            session.close(f"its command queue was full ({MAX_QUEUED_COMMANDS} commands)")
            return False
        return True

    def push_threadsafe(self, device_id: str, message: agent_pb2.OrchestratorMessage) -> bool:
        """Schedule push() on the server's event loop from a worker thread.

        Returns whether the device has a stream open now; the push itself happens on the loop.
        """
        if self.loop is None or device_id not in self.sessions:
            return False
        self.loop.call_soon_threadsafe(self.push, device_id, message)
        return True

    def flush(self) -> int:
        """Write pending last-seen times in one transaction; return how many were written.

        Closes the streams of devices that are no longer registered, because an operator removed them
        through another orchestrator process. The stream then ends with the removal error.
        """
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        try:
            unknown = self.store.touch_devices(pending)
        except Exception:
            # Keep the newest times for the next flush instead of losing them.
            for device_id, seen in pending.items():
                self._pending.setdefault(device_id, seen)
            raise
        for device_id in sorted(unknown):
            session = self.sessions.get(device_id)
            if session is not None and self.loop is not None:
                log.warning("closing the control stream of device_id=%s: the device is no longer registered", device_id)
                self.loop.call_soon_threadsafe(session.close, "the device is no longer registered")
        return len(pending)

    def status_of(self, device: Device, now: datetime | None = None) -> str:
        """Derive online, stale or offline from the newest heartbeat and whether a stream is open.

        A device without an open stream is offline however recently it was seen, as DeviceStatus in
        the API defines it.
        """
        now = now or datetime.now(UTC)
        seen = self.last_seen.get(device.device_id) or device.last_seen
        if seen is None or device.device_id not in self.sessions:
            return "offline"
        age = (now - seen).total_seconds()
        if age <= self.stale_after_s:
            return "online"
        if age <= self.offline_after_s:
            return "stale"
        return "offline"
