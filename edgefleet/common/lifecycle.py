"""Signal handling shared by the long-running processes: SIGTERM, SIGINT and SIGHUP stop them gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report an interrupted command.


def install_stop_signals(stop: asyncio.Event, *, process: str, grace_s: float) -> None:
    """Set stop on SIGTERM, SIGINT or SIGHUP; a second SIGINT ends the process at once with exit code 130.

    SIGHUP stops the process as SIGTERM does, because the daemons have no configuration to reload,
    and the default action would end them at once, with no log line and without their shutdown work.
    A closed terminal or `systemctl kill -s HUP` sends it. Call from a coroutine running on the loop
    that should receive the signals.
    """
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1 and signum == signal.SIGINT:
            log.warning("second interrupt: %s exits without waiting for its shutdown", process)
            os._exit(EXIT_INTERRUPTED)
        # Not a bound on the whole stop: work already running in worker threads may take as long again.
        log.info(
            "received %s; %s stops, giving open calls %.0f s to finish", signal.Signals(signum).name, process, grace_s
        )
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
