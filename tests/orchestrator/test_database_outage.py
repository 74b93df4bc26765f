"""An orchestrator on PostgreSQL whose database goes away returns UNAVAILABLE and recovers by itself."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet.cli.main import main as edgefleet_cli
from edgefleet.common.errors import DATABASE_UNAVAILABLE_TEXT, EXIT_UNAVAILABLE
from edgefleet.orchestrator.store.engine import DatabaseUnavailable, unavailable_error
from edgefleet.v1 import agent_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.faults.processes import OrchestratorProcess, wait_for
from tests.faults.proxy import TcpProxy
from tests.orchestrator.test_jobs import tiny_conv_onnx
from tests.pg import PostgresCluster
from tests.servers import ControlStream, register, upload_requests

# Longer than the job runner's, the rollout engine's and the last-seen flush's retry intervals, so
# each background loop fails several times during the outage.
OUTAGE_S = 5.0


def list_devices_error(address: str) -> grpc.RpcError | None:
    """Call ListDevices; return its error, or None when it succeeds."""
    with grpc.insecure_channel(address) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        try:
            stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10)
        except grpc.RpcError as error:
            return error
    return None


def health_status(address: str, service: str) -> str:
    """Return the grpc.health.v1 status name of service."""
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_database_outage_unavailable_then_recovers(
    postgres_cluster: PostgresCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    postgres_cluster.create_database("outage")
    proxy = TcpProxy(postgres_cluster.port)
    url = f"postgresql+psycopg://{postgres_cluster.superuser}@{proxy.address}/outage"
    orchestrator = OrchestratorProcess(tmp_path, "--db", url)
    try:
        orchestrator.start()
        assert list_devices_error(orchestrator.address) is None

        assert health_status(orchestrator.address, "edgefleet.v1.OperatorService") == "SERVING"
        # A device whose stream closes during the outage: its disconnect cannot be stored.
        agent_channel = grpc.insecure_channel(orchestrator.address)
        agent = agent_pb2_grpc.AgentServiceStub(agent_channel)
        device_id, instance_key = register(agent)
        stream = ControlStream(agent)
        stream.hello(device_id, instance_key)
        stream.heartbeat(1)
        stream.receive_kind("heartbeat_ack")

        proxy.drop()
        stream.close()
        agent_channel.close()
        error = list_devices_error(orchestrator.address)
        assert error is not None
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert error.details().startswith(DATABASE_UNAVAILABLE_TEXT), error.details()

        capsys.readouterr()
        exit_code = edgefleet_cli(["--insecure", "--orchestrator", orchestrator.address, "devices", "list"])
        assert exit_code == EXIT_UNAVAILABLE
        assert f"the orchestrator at {orchestrator.address} responded, but {DATABASE_UNAVAILABLE_TEXT}" in (
            capsys.readouterr().err
        )

        wait_for(
            lambda: health_status(orchestrator.address, "edgefleet.v1.OperatorService") == "NOT_SERVING",
            "readiness to follow the database",
        )
        assert health_status(orchestrator.address, "edgefleet.v1.AgentService") == "NOT_SERVING"
        assert health_status(orchestrator.address, "") == "SERVING"  # Liveness: no restart during the outage.

        time.sleep(OUTAGE_S)
        outage_log = orchestrator.log_tail(400)
        assert "Traceback" not in outage_log
        assert f"recording that device_id={device_id} disconnected failed: {DATABASE_UNAVAILABLE_TEXT}" in outage_log
        assert f"job runner step failed: {DATABASE_UNAVAILABLE_TEXT}" in outage_log
        assert outage_log.count("job runner step failed") == 1

        proxy.pass_traffic()
        wait_for(lambda: list_devices_error(orchestrator.address) is None, "ListDevices to succeed again")
        wait_for(lambda: "job runner step works again" in orchestrator.log_tail(400), "the recovery log line")
        wait_for(
            lambda: health_status(orchestrator.address, "edgefleet.v1.OperatorService") == "SERVING",
            "readiness to return",
        )
    finally:
        orchestrator.stop()
        proxy.close()
        postgres_cluster.drop_database("outage")


def test_metrics_scrape_during_outage_logs_one_line(postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    """A /metrics scrape while the database is away logs a one-line warning and still serves the counters."""
    postgres_cluster.create_database("scrape_outage")
    proxy = TcpProxy(postgres_cluster.port)
    url = f"postgresql+psycopg://{postgres_cluster.superuser}@{proxy.address}/scrape_outage"
    metrics_port_file = tmp_path / "metrics.port"
    orchestrator = OrchestratorProcess(
        tmp_path, "--db", url, "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(metrics_port_file)
    )
    try:
        orchestrator.start()
        metrics_url = f"http://127.0.0.1:{metrics_port_file.read_text().strip()}/metrics"

        proxy.drop()
        with urllib.request.urlopen(metrics_url, timeout=30) as response:
            body = response.read().decode()
        wait_for(lambda: "collecting fleet metrics" in orchestrator.log_tail(400), "the failed scrape's log line")

        outage_log = orchestrator.log_tail(400)
        assert "edgefleet_registrations_total" in body
        assert "Traceback" not in outage_log
        assert f"collecting fleet metrics for /metrics failed: {DATABASE_UNAVAILABLE_TEXT}" in outage_log
    finally:
        orchestrator.stop()
        proxy.close()
        postgres_cluster.drop_database("scrape_outage")


def test_database_watch_survives_pool_timeout(tmp_path: Path) -> None:
    """A ping that waits in vain for a pooled connection is logged, and the watch goes on."""
    import asyncio
    import contextlib

    from grpc_health.v1 import health

    from edgefleet.orchestrator.server import SERVICE_NAMES, _watch_database
    from edgefleet.orchestrator.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    pool = store.engine.pool
    pool._timeout = 0.05  # type: ignore[attr-defined]  # QueuePool's 30 s default would slow the test.
    servicer = health.aio.HealthServicer()

    async def scenario() -> tuple[bool, str]:
        for name in SERVICE_NAMES:
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        watch = asyncio.create_task(_watch_database(store, servicer, 0.02))
        try:
            with contextlib.ExitStack() as held:
                # Every connection of the pool and its overflow is busy, as under a burst of slow calls.
                for _ in range(pool.size() + pool._max_overflow):  # type: ignore[attr-defined]
                    held.enter_context(store.engine.connect())
                await asyncio.sleep(0.5)
            await asyncio.sleep(0.1)
            response = await servicer.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[0]), None)
            return not watch.done(), health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    try:
        watching, status = asyncio.run(scenario())
    finally:
        store.close()

    assert watching
    assert status == "SERVING"


def test_database_outage_requeues_running_job(postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    """A job whose worker loses the database runs again once it is back, instead of ending as failed."""
    postgres_cluster.create_database("job_outage")
    proxy = TcpProxy(postgres_cluster.port)
    url = f"postgresql+psycopg://{postgres_cluster.superuser}@{proxy.address}/job_outage"
    orchestrator = OrchestratorProcess(tmp_path, "--db", url)
    recipe = {
        "quantize": {"calibration": {"images": "builtin:demo-photos"}, "calibration_size": 4},
        "gate": {"max_accuracy_drop": 100.0},
    }
    try:
        orchestrator.start()
        with grpc.insecure_channel(orchestrator.address) as channel:
            operator = operator_pb2_grpc.OperatorServiceStub(channel)
            operator.UploadModel(upload_requests(tiny_conv_onnx(), "tiny", "1"), timeout=60)
            request = operator_pb2.CreateCompressionJobRequest(model_name="tiny", recipe_json=json.dumps(recipe))
            job_id = operator.CreateCompressionJob(request, timeout=30).job_id

            def job() -> operator_pb2.CompressionJob:
                return operator.GetCompressionJob(operator_pb2.GetCompressionJobRequest(job_id=job_id), timeout=30)

            wait_for(lambda: job().state == operator_pb2.JOB_STATE_RUNNING, "the job to start")
            proxy.drop()
            # The worker ends at its first database access in the outage; any of these log lines shows it.
            worker_ends = (f"job {job_id} attempt 1 stopped", f"Process job-{job_id}:", f"job {job_id} failed")
            wait_for(
                lambda: any(text in orchestrator.log_path.read_text() for text in worker_ends),
                "the worker to meet the outage",
                timeout_s=120,
            )

            proxy.pass_traffic()

            def finished_job() -> operator_pb2.CompressionJob | None:
                current = job()
                if current.state in (operator_pb2.JOB_STATE_QUEUED, operator_pb2.JOB_STATE_RUNNING):
                    return None
                return current

            finished = wait_for(finished_job, "the job to finish", timeout_s=120)
    finally:
        orchestrator.stop()
        proxy.close()
        postgres_cluster.drop_database("job_outage")

    assert operator_pb2.JobState.Name(finished.state) == "JOB_STATE_SUCCEEDED", finished.error


@pytest.fixture
def postgres_engine() -> Iterator[sa.Engine]:
    """An engine for the PostgreSQL dialect; these tests only classify errors and never connect."""
    engine = sa.create_engine("postgresql+psycopg://edgefleet@127.0.0.1:1/edgefleet")
    yield engine
    engine.dispose()


def test_failed_ping_then_failed_autocommit_counts_as_unavailable(postgres_engine: sa.Engine) -> None:
    """The pool's pre-ping on a dead connection raises psycopg's ProgrammingError with the lost connection as context.

    psycopg cannot restore autocommit on a connection whose ping failed mid-query, and SQLAlchemy
    reports that error; the OperationalError of the ping is its context.
    """
    driver_error = psycopg.ProgrammingError("can't change 'autocommit' now: connection in transaction status ACTIVE")
    # Raised while the ping's error was being handled, as psycopg's do_ping does.
    driver_error.__context__ = psycopg.OperationalError("connection socket closed")
    error = sa.exc.ProgrammingError(None, None, driver_error)

    unavailable = unavailable_error(postgres_engine, error)

    assert isinstance(unavailable, DatabaseUnavailable)
    assert unavailable.message.startswith(f"{DATABASE_UNAVAILABLE_TEXT} (connection socket closed)")


def test_live_server_error_not_outage(postgres_engine: sa.Engine) -> None:
    error = sa.exc.ProgrammingError("SELECT nope", None, psycopg.errors.UndefinedColumn('column "nope" does not exist'))
    assert unavailable_error(postgres_engine, error) is None


def test_refused_password_not_outage(postgres_engine: sa.Engine) -> None:
    """A wrong password has SQLSTATE 28P01: retrying cannot fix it, so it is not reported as an outage."""
    error = sa.exc.OperationalError(None, None, psycopg.errors.InvalidPassword("password authentication failed"))
    assert unavailable_error(postgres_engine, error) is None


def test_server_shutdown_is_outage(postgres_engine: sa.Engine) -> None:
    error = sa.exc.OperationalError(None, None, psycopg.errors.AdminShutdown("terminating connection"))
    unavailable = unavailable_error(postgres_engine, error)
    assert isinstance(unavailable, DatabaseUnavailable)
    assert "(terminating connection)" in unavailable.message
