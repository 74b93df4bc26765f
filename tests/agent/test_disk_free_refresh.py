"""Heartbeats refresh the free disk space of the agent's model store at a real orchestrator."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from edgefleet.agent.agent import DISK_FREE_REPORT_STEP_BYTES
from edgefleet.agent.probe import DiskUsage
from edgefleet.cli.main import main as cli_main
from edgefleet.orchestrator.selection import CHOSEN, OVER_DISK
from edgefleet.v1 import common_pb2, operator_pb2
from tests.servers import AgentThread, OrchestratorThread, get_device, linear_onnx, upload, wait_until

pytest_plugins = ["tests.servers"]

GIB = 1 << 30
MIB = 1 << 20
MODEL = "linear"
StartOrchestrator = Callable[..., OrchestratorThread]
StartAgent = Callable[..., AgentThread]


class FakeDisk:
    """Stands in for probe.disk_usage: a file system of total_bytes whose free space a test sets."""

    def __init__(self, total_bytes: int, free_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.free_bytes = free_bytes
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> DiskUsage:
        self.paths.append(path)
        return DiskUsage(self.total_bytes, self.free_bytes)


def start_fleet(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent, disk: FakeDisk
) -> tuple[OrchestratorThread, AgentThread, str]:
    """Start an orchestrator with 1 s heartbeats and an agent on the fake disk; return them and the device id."""
    orchestrator = start_orchestrator(heartbeat_interval_s=1.0)
    agent = start_agent(orchestrator.address, "cam", agent_options={"read_disk_usage": disk})

    def online() -> str:
        assert agent.running, f"agent ended: {agent.error!r}"
        device_id = agent.agent.device_id
        if device_id and get_device(orchestrator, device_id).status == common_pb2.DEVICE_STATUS_ONLINE:
            return device_id
        return ""

    return orchestrator, agent, wait_until(online, "the agent to come online")


def stored_disk_free(orchestrator: OrchestratorThread, device_id: str) -> int:
    return get_device(orchestrator, device_id).hardware.disk_free_bytes


def wait_heartbeats(disk: FakeDisk, count: int) -> None:
    """Wait until the agent has read the disk count more times, one read per heartbeat."""
    target = len(disk.paths) + count
    wait_until(lambda: len(disk.paths) >= target, f"{count} heartbeats")


def explain(orchestrator: OrchestratorThread, device_id: str) -> operator_pb2.ExplainSelectionResponse:
    request = operator_pb2.ExplainSelectionRequest(model_name=MODEL, model_version="1", device_id=device_id)
    return orchestrator.operator.ExplainSelection(request, timeout=30)


def test_disk_free_refreshed_by_heartbeat(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = FakeDisk(100 * GIB, 50 * GIB)
    orchestrator, agent, device_id = start_fleet(start_orchestrator, start_agent, disk)
    registered = stored_disk_free(orchestrator, device_id)

    disk.free_bytes = 50 * GIB - (DISK_FREE_REPORT_STEP_BYTES - MIB)
    wait_heartbeats(disk, 3)
    after_small_change = stored_disk_free(orchestrator, device_id)

    disk.free_bytes = 50 * GIB - 3 * DISK_FREE_REPORT_STEP_BYTES
    refreshed = wait_until(
        lambda: stored_disk_free(orchestrator, device_id) == disk.free_bytes, "the new free space at the orchestrator"
    )
    code = cli_main(["--insecure", "--orchestrator", orchestrator.address, "-o", "json", "devices", "show", device_id])
    device_json = json.loads(capsys.readouterr().out)

    assert registered == 50 * GIB
    assert after_small_change == 50 * GIB
    assert refreshed
    assert code == 0
    assert device_json["disk_free_bytes"] == 50 * GIB - 3 * DISK_FREE_REPORT_STEP_BYTES
    assert set(disk.paths) == {agent.agent.store.root}


def test_disk_step_is_one_percent_of_small_disk(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    disk = FakeDisk(1 * GIB, 512 * MIB)
    orchestrator, _, device_id = start_fleet(start_orchestrator, start_agent, disk)

    disk.free_bytes = 512 * MIB - 12 * MIB  # Over 1 % of 1 GiB, under 64 MiB.

    assert wait_until(
        lambda: stored_disk_free(orchestrator, device_id) == 500 * MIB, "the new free space at the orchestrator"
    )


def test_selection_sees_refreshed_disk_free(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    disk = FakeDisk(100 * GIB, 50 * GIB)
    orchestrator, _, device_id = start_fleet(start_orchestrator, start_agent, disk)
    model = linear_onnx()
    upload(orchestrator, model, MODEL, "1")
    before = explain(orchestrator, device_id)

    disk.free_bytes = len(model) - 1
    wait_until(lambda: stored_disk_free(orchestrator, device_id) == len(model) - 1, "the full disk at the orchestrator")
    full = explain(orchestrator, device_id)
    with pytest.raises(grpc.RpcError) as deploy_error:
        orchestrator.operator.Deploy(operator_pb2.DeployRequest(model_name=MODEL, device_id=device_id), timeout=30)

    disk.free_bytes = 50 * GIB
    wait_until(lambda: stored_disk_free(orchestrator, device_id) == 50 * GIB, "the freed disk at the orchestrator")
    freed = explain(orchestrator, device_id)

    assert before.chosen_variant_id == f"{MODEL}:1:source"
    assert full.chosen_variant_id == ""
    assert full.candidates[0].reason.startswith(f"{OVER_DISK}: ")
    assert deploy_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "delete files on the device" in (deploy_error.value.details() or "")
    assert freed.chosen_variant_id == f"{MODEL}:1:source"
    assert freed.candidates[0].reason.startswith(CHOSEN)


def test_stored_variant_kept_on_full_disk(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    """A variant the device already serves needs no free space, so a full disk does not exclude it."""
    disk = FakeDisk(100 * GIB, 50 * GIB)
    orchestrator, _, device_id = start_fleet(start_orchestrator, start_agent, disk)
    model = linear_onnx()
    upload(orchestrator, model, MODEL, "1")
    orchestrator.operator.Deploy(operator_pb2.DeployRequest(model_name=MODEL, device_id=device_id), timeout=30)

    def serving() -> bool:
        states = [status.state for status in get_device(orchestrator, device_id).models]
        return states == [common_pb2.MODEL_STATE_SERVING]

    wait_until(serving, "the model to serve")
    disk.free_bytes = len(model) - 1
    wait_until(lambda: stored_disk_free(orchestrator, device_id) == len(model) - 1, "the full disk at the orchestrator")
    full = explain(orchestrator, device_id)
    redeploy = orchestrator.operator.Deploy(
        operator_pb2.DeployRequest(model_name=MODEL, device_id=device_id), timeout=30
    )

    assert full.chosen_variant_id == f"{MODEL}:1:source"
    assert full.candidates[0].reason.startswith(CHOSEN)
    assert redeploy.assignment.variant_id == f"{MODEL}:1:source"


def test_full_disk_heartbeat_excludes_variant(start_orchestrator: StartOrchestrator, start_agent: StartAgent) -> None:
    """0 free bytes means unknown at the orchestrator, so a model store filled to the last byte must not send 0."""
    disk = FakeDisk(100 * GIB, 50 * GIB)
    orchestrator, _, device_id = start_fleet(start_orchestrator, start_agent, disk)
    upload(orchestrator, linear_onnx(), MODEL, "1")

    disk.free_bytes = 0
    wait_until(lambda: stored_disk_free(orchestrator, device_id) != 50 * GIB, "the full disk at the orchestrator")
    full = explain(orchestrator, device_id)

    assert stored_disk_free(orchestrator, device_id) == 1
    assert full.chosen_variant_id == ""
    assert full.candidates[0].reason.startswith(f"{OVER_DISK}: ")


def test_full_disk_at_registration_excludes_variant(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent
) -> None:
    disk = FakeDisk(100 * GIB, 0)
    orchestrator, _, device_id = start_fleet(start_orchestrator, start_agent, disk)
    upload(orchestrator, linear_onnx(), MODEL, "1")

    full = explain(orchestrator, device_id)

    assert stored_disk_free(orchestrator, device_id) == 1
    assert full.chosen_variant_id == ""
    assert full.candidates[0].reason.startswith(f"{OVER_DISK}: ")



def test_freed_space_on_nearly_full_disk_reported(
    start_orchestrator: StartOrchestrator, start_agent: StartAgent
) -> None:
    """Deleting 40 MiB on a large disk with 10 MiB free is under the 64 MiB step but decides which files fit."""
    disk = FakeDisk(256 * GIB, 10 * MIB)
    orchestrator, _, device_id = start_fleet(start_orchestrator, start_agent, disk)
    registered = stored_disk_free(orchestrator, device_id)

    disk.free_bytes = 50 * MIB
    freed = wait_until(
        lambda: stored_disk_free(orchestrator, device_id) == 50 * MIB, "the freed space at the orchestrator"
    )

    disk.free_bytes = 50 * MIB - 32 * 1024  # Under the 64 KiB floor: not worth a database write.
    wait_heartbeats(disk, 3)

    assert registered == 10 * MIB
    assert freed
    assert stored_disk_free(orchestrator, device_id) == 50 * MIB
