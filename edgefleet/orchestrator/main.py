"""Command line entry point: edgefleet-orchestrator."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
from pathlib import Path

from edgefleet.common.config import ConfigError, DaemonArgumentParser, add_flags, load_config
from edgefleet.common.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from edgefleet.common.lifecycle import EXIT_INTERRUPTED, install_stop_signals
from edgefleet.common.logs import configure_logging
from edgefleet.common.paths import writable_directory_problem
from edgefleet.common.tls import CredentialsError
from edgefleet.orchestrator.config import HELP, OrchestratorConfig

log = logging.getLogger("edgefleet.orchestrator")


def main(argv: list[str] | None = None) -> int:
    parser = DaemonArgumentParser(
        prog="edgefleet-orchestrator", description="Run the edgefleet orchestrator (gRPC API, fleet store)."
    )
    parser.add_argument("--config", type=Path, help="TOML file with any of the settings below (env EDGEFLEET_CONFIG)")
    add_flags(parser, OrchestratorConfig, HELP)
    flags = parser.parse_args(argv)
    config_file = flags.config
    try:
        if config_file is None and os.environ.get("EDGEFLEET_CONFIG"):
            config_file = Path(os.environ["EDGEFLEET_CONFIG"])
        # Validates the listen addresses and the numeric settings (OrchestratorConfig.__post_init__).
        config = load_config(OrchestratorConfig, flags=flags, file=config_file)
        check_database_url(config.db_url)
        configure_logging(config.log_level, config.log_format)
    except (ConfigError, ValueError) as error:
        print(f"edgefleet-orchestrator: {error}", file=sys.stderr)
        return EXIT_CONFIG
    from edgefleet.orchestrator.store.instance_lock import InstanceLockLost

    try:
        from edgefleet.orchestrator.security.serving import check_listen_addresses

        # A port in use must end the start before anything is written in the data directory.
        check_listen_addresses(config)
        prepare_data_dir(config.data_dir)
        asyncio.run(serve_config(config))
    except KeyboardInterrupt:
        # A SIGINT between the event loop's start and serve_config's handlers goes to asyncio, which
        # cancels the start and raises this.
        log.warning("interrupted during start-up, before serving; the orchestrator stopped")
        return EXIT_INTERRUPTED
    except InstanceLockLost as error:
        # Another orchestrator serves the database now; a restart by systemd reports it and exits 78.
        log.error("stopped: %s", error)
        return EXIT_UNAVAILABLE
    except (ConfigError, CredentialsError) as error:
        # A restart cannot fix these: an unusable data directory or SQLite file, missing TLS files, or a
        # database that a newer release migrated.
        log.error("cannot start: %s", error)
        return EXIT_CONFIG
    except OSError as error:
        if error.errno == errno.ENOSPC:
            from edgefleet.orchestrator.server import redact_url

            log.error(
                "cannot start: the disk is full (%s); free space in --data-dir %s and next to the database %s, "
                "then start again",
                error,
                config.data_dir,
                redact_url(config.db_url),
            )
            return EXIT_UNAVAILABLE
        log.error("cannot start: %s", error)
        return EXIT_UNAVAILABLE
    except Exception as error:
        if type(error).__name__ == "DatabaseDiskFull":
            # Its message names the full disk, the database file and the fix.
            log.error("cannot start: %s; then start again", error)
            return EXIT_UNAVAILABLE
        if type(error).__name__ in ("OperationalError", "DatabaseUnavailable"):
            # SQLAlchemy's OperationalError: the database is unreachable, missing or refused the login.
            # DatabaseUnavailable: the server went away after the schema upgrade, while the start-up read it.
            from edgefleet.orchestrator.server import redact_url

            cause = error.__cause__ if type(error).__name__ == "DatabaseUnavailable" else error
            log.error("cannot open the database %s: %s", redact_url(config.db_url), str(cause).splitlines()[0])
            return EXIT_UNAVAILABLE
        log.exception("orchestrator failed")
        return EXIT_FAILURE
    return EXIT_OK


def check_database_url(url: str) -> None:
    """Check that url names a supported database; raise ConfigError naming the URL and the supported forms."""
    from edgefleet.orchestrator.store.engine import normalize_url

    normalize_url(url)


def prepare_data_dir(data_dir: Path) -> None:
    """Create data_dir when it is missing and check that this user can write in it.

    Raises ConfigError naming the directory and the fix when it or a parent is a file, or when this
    user cannot create or write it. Other OSErrors, such as a full disk, pass through.
    """
    problem = writable_directory_problem(data_dir)
    if problem is not None:
        raise ConfigError(
            f"invalid --data-dir {data_dir}: it {problem}; it contains the database, the artifacts and admin.token, "
            "so point --data-dir at a directory this user can write, or make this one writable"
        )


async def serve_config(config: OrchestratorConfig) -> None:
    # The handlers go in before the server module's import, which takes about a second, so that a
    # signal during it gets the graceful stop as well.
    stop = asyncio.Event()
    install_stop_signals(stop, process="orchestrator", grace_s=config.shutdown_grace_s)

    from edgefleet.orchestrator.server import serve

    await serve(config, stop)


if __name__ == "__main__":
    sys.exit(main())
