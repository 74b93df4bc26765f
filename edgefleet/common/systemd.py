"""The sd_notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams to systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager; does nothing when NOTIFY_SOCKET is unset.

    The socket path comes from the environment, as systemd sets it for Type=notify units. An
    abstract socket is written with a leading '@' and sent with a NUL byte in its place.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        enabled = watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid()))
        # Pinging at half the timeout is what sd_watchdog_enabled(3) recommends.
        self.watchdog_interval_s = int(watchdog_usec) / 2e6 if enabled else None
        self._socket: socket.socket | None = None
        self._failures = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        """Send KEY=VALUE lines in one datagram; return False when not under systemd or on failure."""
        if not self.address:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as error:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning("sd_notify to %s failed (%d times): %s", self.address.lstrip("\0"), self._failures, error)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
