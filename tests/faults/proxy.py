"""A TCP proxy on 127.0.0.1 for fault tests: it passes, drops, blackholes or throttles traffic on command."""

from __future__ import annotations

import contextlib
import enum
import logging
import select
import socket
import struct
import threading
import time
from types import TracebackType

log = logging.getLogger(__name__)

_BUFFER_BYTES = 64 * 1024
_POLL_S = 0.05


class Mode(enum.Enum):
    PASS = "pass"  # Forward bytes both ways.
    BLACKHOLE = "blackhole"  # Keep every connection open but forward nothing, like a link that lost its route.
    DROP = "drop"  # Reset every connection and each new one, like a peer host that went away.


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self._open_directions = 2
        self._lock = threading.Lock()

    def direction_done(self) -> None:
        with self._lock:
            self._open_directions -= 1
            last = self._open_directions == 0
        if last:
            self.close()

    def close(self, *, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if reset:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Accepts connections on 127.0.0.1 (port 0 picks a free port) and forwards them to a target on loopback.

    blackhole() stops forwarding without closing anything: bytes wait in the kernel's socket buffers
    and flow again after pass_traffic(). drop() resets every open connection and resets new ones at
    once. throttle() caps the forwarding rate of each direction of each connection. retarget()
    sends new connections to another port, for a server that restarted there.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        if target_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the test proxy forwards to loopback only, not {target_host!r}")
        self.target = (target_host, target_port)
        self.mode = Mode.PASS
        self.bytes_per_s: float | None = None
        self.accepted = 0
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._stopped = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(_POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections if not c.closed.is_set())

    def pass_traffic(self) -> None:
        """Forward again; bytes held back by blackhole() flow on."""
        self.mode = Mode.PASS
        self._forwarding.set()
        log.info("proxy %d: passing traffic", self.port)

    def blackhole(self) -> None:
        """Stop forwarding on every connection, open and new, without closing any."""
        self.mode = Mode.BLACKHOLE
        self._forwarding.clear()
        log.info("proxy %d: blackholing traffic", self.port)

    def drop(self) -> None:
        """Reset every open connection, and each new one until pass_traffic()."""
        self.mode = Mode.DROP
        self._forwarding.set()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close(reset=True)
        log.info("proxy %d: dropping traffic, reset %d connections", self.port, len(connections))

    def throttle(self, bytes_per_s: float | None) -> None:
        """Cap each direction of each connection at bytes_per_s; None removes the cap."""
        self.bytes_per_s = bytes_per_s

    def retarget(self, target_port: int) -> None:
        """Send new connections to target_port; open connections keep their target."""
        self.target = (self.target[0], target_port)

    def close(self) -> None:
        self._stopped.set()
        self._forwarding.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode is Mode.DROP:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                # The target is down: the client sees its connection reset, as it would without the proxy.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(client, upstream)
            with self._lock:
                self._connections = [c for c in self._connections if not c.closed.is_set()]
                self._connections.append(connection)
            for source, target, name in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump, args=(connection, source, target), name=f"proxy-{name}", daemon=True
                ).start()

    def _pump(self, connection: _Connection, source: socket.socket, target: socket.socket) -> None:
        try:
            while not connection.closed.is_set():
                if not self._forwarding.wait(_POLL_S):
                    continue  # Blackholed: leave the bytes unread.
                readable, _, _ = select.select([source], [], [], _POLL_S)
                if not readable or not self._forwarding.is_set():
                    continue
                data = source.recv(_BUFFER_BYTES if self.bytes_per_s is None else min(_BUFFER_BYTES, 4096))
                if not data:
                    with contextlib.suppress(OSError):
                        target.shutdown(socket.SHUT_WR)
                    break
                if self.bytes_per_s is not None:
                    time.sleep(len(data) / self.bytes_per_s)
                target.sendall(data)
        except (OSError, ValueError):
            connection.close()
            return
        connection.direction_done()
