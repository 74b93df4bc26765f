"""Signal handling shared by the long-running processes: SIGTERM is graceful, a second SIGINT forces exit."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report an interrupted command.


def install_stop_signals(stop: asyncio.Event, *, process: str, grace_s: float) -> None:
    """Set stop on SIGTERM or SIGINT; a second SIGINT ends the process at once with exit code 130.

    Call from a coroutine running on the loop that should receive the signals.
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

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
