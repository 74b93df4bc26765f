"""Retried polls for the CLI commands that follow a job or a rollout while the orchestrator restarts."""

from __future__ import annotations

import sys
import time
from typing import Any

from edgefleet.cli.main import Client, CliError
from edgefleet.common.backoff import Backoff
from edgefleet.common.errors import EXIT_UNAVAILABLE


def call_retrying(
    client: Client, method: str, request: Any, *, retry_s: float, base_s: float, cap_s: float, goes_on: str
) -> Any:
    """Call method and retry it while the orchestrator is unreachable, for up to retry_s seconds.

    Prints once on stderr that it retries, ending with goes_on (what continues on the orchestrator
    meanwhile). Raises the last CliError when the orchestrator stays unreachable, and any other
    CliError at once. Retries wait base_s, doubling up to cap_s, with full jitter.
    """
    give_up_at: float | None = None
    backoff = Backoff(base_s=base_s, cap_s=cap_s)
    while True:
        try:
            return client.call(method, request)
        except CliError as error:
            if error.code != EXIT_UNAVAILABLE:
                raise
            now = time.monotonic()
            if give_up_at is None:
                give_up_at = now + retry_s
                # The unreachable error ends with a full stop, so drop it before appending the retry clause.
                reason = str(error).rstrip(".")
                print(f"edgefleet: {reason}; retrying for up to {retry_s:g} s ({goes_on})", file=sys.stderr, flush=True)
            if now >= give_up_at:
                raise
            time.sleep(min(backoff.next_delay(), give_up_at - now))
