"""Command line entry point: edgefleet-agent (run the daemon) and edgefleet-agent infer (try a model)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from edgefleet.agent.config import HELP, AgentConfig, check_agent_config
from edgefleet.agent.identity import IdentityError, prepare_state_dir
from edgefleet.common.config import ConfigError, DaemonArgumentParser, add_flags, load_config
from edgefleet.common.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from edgefleet.common.files import SocketPathError
from edgefleet.common.labels import label_problem
from edgefleet.common.lifecycle import install_stop_signals
from edgefleet.common.logs import configure_logging
from edgefleet.common.tls import CredentialsError, check_key_pair, read_pem

log = logging.getLogger("edgefleet.agent")


def build_parser() -> argparse.ArgumentParser:
    parser = DaemonArgumentParser(
        prog="edgefleet-agent",
        description="Run the edgefleet agent on a device. `edgefleet-agent infer --help` tries a deployed model.",
    )
    parser.add_argument("--config", type=Path, help="TOML file with any of the settings below (env EDGEFLEET_CONFIG)")
    add_flags(parser, AgentConfig, HELP)
    return parser


def load_agent_config(flags: argparse.Namespace) -> AgentConfig:
    config_file = flags.config
    if config_file is None and os.environ.get("EDGEFLEET_CONFIG"):
        config_file = Path(os.environ["EDGEFLEET_CONFIG"])
    return load_config(AgentConfig, flags=flags, file=config_file)


def check_tls_files(config: AgentConfig) -> None:
    """Check that the CA certificate, the device certificate and its key parse, and that the key matches.

    gRPC reads these files only at the first handshake, and a key that does not match its certificate
    then fails every handshake, which the agent would retry for ever. The orchestrator's agent port
    requires a client certificate, so without --insecure a missing --cert or --key is an error too.
    Does nothing with --insecure. Raises CredentialsError naming the files and the fix.
    """
    if config.insecure:
        return
    read_pem(config.ca_cert, "CA certificate", "--ca-cert")
    if config.cert is None or config.key is None:
        missing = " and ".join(flag for flag, path in (("--cert", config.cert), ("--key", config.key)) if path is None)
        raise CredentialsError(
            f"missing device certificate: set {missing} (`edgefleet pki issue --device-id ID` writes ID.pem and "
            "ID.key), or pass --insecure to run without TLS"
        )
    check_key_pair(config.ca_cert, config.cert, config.key, "the agent")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "infer":
        from edgefleet.agent.infer_cli import main as infer_main

        return infer_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    flags = build_parser().parse_args(argv)
    try:
        config = load_agent_config(flags)
        check_agent_config(config)
        configure_logging(config.log_level, config.log_format)
    except (ConfigError, ValueError) as error:
        print(f"edgefleet-agent: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return run(config)


def run(config: AgentConfig) -> int:
    from edgefleet.agent.agent import Agent, FatalAgentError, Keepalive
    from edgefleet.agent.buffer import BufferLimits
    from edgefleet.agent.probe import probe_hardware
    from edgefleet.agent.probe_cgroup import cpu_quota, memory_limit
    from edgefleet.agent.profiles import DeviceProfile, ProfileError, load_profile

    try:
        profile = load_profile(config.profile) if config.profile else DeviceProfile(name="")
    except ProfileError as error:
        log.error("%s", error)
        return EXIT_CONFIG
    labels = {**profile.labels, **config.labels}
    sources = "the profile and --labels"
    if profile.name and "profile" not in labels:
        labels["profile"] = profile.name
        # This label counts toward the limit too, so the message names it.
        sources = f"the profile, --labels and the label profile={profile.name} that the agent adds"
    # The profile's labels and --labels pass their own checks, but the orchestrator limits them together.
    problem = label_problem(labels)
    if problem:
        log.error(
            "cannot start: invalid labels of %s together: %s; the orchestrator would reject "
            "the device, so remove labels from the profile or from --labels",
            sources,
            problem,
        )
        return EXIT_CONFIG
    try:
        check_tls_files(config)
        prepare_state_dir(config.state_dir)
    except (CredentialsError, IdentityError) as error:
        log.error("cannot start: %s", error)
        return EXIT_CONFIG
    cgroup_memory = memory_limit(Path("/"))
    limits = profile.enforce(cpu_quota(Path("/")), cgroup_memory.limit_bytes if cgroup_memory is not None else None)
    # The free space reported is that of the model store (Agent.store), which may be a file system of its own.
    hardware = profile.apply(probe_hardware(store_dir=config.state_dir / "models"))
    config = AgentConfig(**{**config.__dict__, "labels": labels})
    allowed_runtimes = tuple(r.name for r in hardware.runtimes)
    log.info(
        "starting agent with state dir %s: profile=%s cores=%g threads=%d memory=%d MiB runtimes=%s class=%s",
        config.state_dir,
        profile.name or "-",
        hardware.usable_cores,
        limits.threads,
        hardware.memory_total_bytes >> 20,
        ",".join(allowed_runtimes) or "none",
        hardware.hardware_class,
    )
    if config.insecure:
        log.warning("talking to the orchestrator without TLS (--insecure); use only on a trusted network")
    try:
        agent = Agent(
            config,
            hardware,
            limits,
            allowed_runtimes,
            keepalive=Keepalive(config.keepalive_time_s, config.keepalive_timeout_s),
            buffer_limits=BufferLimits(config.metrics_buffer_max_bytes, config.metrics_buffer_max_batches),
        )
    except ValueError as error:
        log.error("cannot start: %s", error)
        return EXIT_CONFIG
    try:
        asyncio.run(_serve(agent, config.shutdown_grace_s))
    except FatalAgentError as error:
        log.error("%s", error)
        return EXIT_USAGE
    except SocketPathError as error:
        log.error("cannot start: %s", error)
        return EXIT_CONFIG
    except Exception:
        log.exception("agent failed")
        return EXIT_FAILURE
    return EXIT_OK


async def _serve(agent: object, grace_s: float) -> None:
    from edgefleet.agent.agent import Agent

    assert isinstance(agent, Agent)
    stop = asyncio.Event()
    install_stop_signals(stop, process="agent", grace_s=grace_s)
    task = asyncio.create_task(agent.run(stop))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()  # Raises what ended the agent early, such as FatalAgentError.
        return
    try:
        await asyncio.wait_for(task, timeout=grace_s + 2)
    except TimeoutError:
        log.warning("shutdown took longer than %.0f s; exiting anyway", grace_s)


if __name__ == "__main__":
    sys.exit(main())
