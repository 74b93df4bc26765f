"""AgentService.Register against a real orchestrator on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.servers import (
    OrchestratorThread,
    get_device,
    hardware_message,
    new_instance_key,
    register,
    register_request,
)

pytest_plugins = ["tests.servers"]


def list_device_ids(orchestrator: OrchestratorThread) -> list[str]:
    response = orchestrator.operator.ListDevices(operator_pb2.ListDevicesRequest(), timeout=30)
    return [d.device_id for d in response.devices]


def test_register_assigns_id(orchestrator: OrchestratorThread) -> None:
    response = orchestrator.agent.Register(register_request(labels={"site": "lab-1", "kind": "camera"}), timeout=30)

    assert response.device_id.startswith("dev-")
    assert response.heartbeat_interval_seconds == 10
    assert response.server_time.seconds > 0
    device = get_device(orchestrator, response.device_id)
    assert dict(device.labels) == {"site": "lab-1", "kind": "camera"}
    assert device.last_seen.seconds > 0
    assert device.registered_at.seconds > 0
    assert device.agent_version == "0.0.0-test"
    assert device.hardware.memory_total_bytes == hardware_message().memory_total_bytes
    assert device.hardware.hardware_class.startswith("test-2c-2048m-")
    assert device.profile_revisions == 1


def test_register_stable_id(orchestrator: OrchestratorThread) -> None:
    device_id, key = register(orchestrator.agent)

    again, _ = register(orchestrator.agent, device_id, key)

    assert again == device_id
    assert list_device_ids(orchestrator) == [device_id]


def test_register_chosen_id(orchestrator: OrchestratorThread) -> None:
    device_id, _ = register(orchestrator.agent, "camera-01")

    assert device_id == "camera-01"


def test_register_history_on_change(orchestrator: OrchestratorThread) -> None:
    device_id, key = register(orchestrator.agent)
    store = orchestrator.state.store

    register(orchestrator.agent, device_id, key)
    unchanged = len(store.hardware_history(device_id))
    register(orchestrator.agent, device_id, key, hardware=hardware_message(memory_total_bytes=4 * 1024**3))
    changed = len(store.hardware_history(device_id))
    register(orchestrator.agent, device_id, key, hardware=hardware_message(memory_total_bytes=4 * 1024**3))

    assert unchanged == 1
    assert changed == 2
    assert len(store.hardware_history(device_id)) == 2
    assert get_device(orchestrator, device_id).profile_revisions == 2
    assert get_device(orchestrator, device_id).hardware.memory_total_bytes == 4 * 1024**3


def test_register_updates_labels(orchestrator: OrchestratorThread) -> None:
    device_id, key = register(orchestrator.agent, labels={"site": "lab-1"})

    register(orchestrator.agent, device_id, key, labels={"site": "lab-2", "zone": "b"})

    assert dict(get_device(orchestrator, device_id).labels) == {"site": "lab-2", "zone": "b"}


def _without_hardware(request: agent_pb2.RegisterRequest) -> None:
    request.ClearField("hardware")


def _without_key(request: agent_pb2.RegisterRequest) -> None:
    request.instance_key = ""


def _short_key(request: agent_pb2.RegisterRequest) -> None:
    request.instance_key = "short-key"


def _long_cpu_model(request: agent_pb2.RegisterRequest) -> None:
    request.hardware.cpu_model = "x" * 300


def _many_labels(request: agent_pb2.RegisterRequest) -> None:
    for i in range(100):
        request.labels[f"key-{i}"] = "value"


def _bad_label_key(request: agent_pb2.RegisterRequest) -> None:
    request.labels["Not A Key!"] = "value"


def _unknown_accelerator(request: agent_pb2.RegisterRequest) -> None:
    request.hardware.accelerators.add(kind=42, vendor="acme")


def _too_many_cores(request: agent_pb2.RegisterRequest) -> None:
    request.hardware.usable_cores = 8.0


def _no_architecture(request: agent_pb2.RegisterRequest) -> None:
    request.hardware.architecture = ""


def _id_with_slash(request: agent_pb2.RegisterRequest) -> None:
    request.device_id = "dev/1"


def _id_dot_dot(request: agent_pb2.RegisterRequest) -> None:
    request.device_id = ".."


def _id_parent_path(request: agent_pb2.RegisterRequest) -> None:
    request.device_id = "../etc"


INVALID_REQUESTS = [
    pytest.param(_without_hardware, "invalid hardware:", id="no-hardware"),
    pytest.param(_without_key, "invalid instance_key:", id="no-key"),
    pytest.param(_short_key, "invalid instance_key:", id="short-key"),
    pytest.param(_long_cpu_model, "invalid hardware.cpu_model:", id="long-cpu-model"),
    pytest.param(_many_labels, "invalid labels:", id="100-labels"),
    pytest.param(_bad_label_key, "invalid labels['Not A Key!']", id="bad-label-key"),
    pytest.param(_unknown_accelerator, "invalid hardware.accelerators[0].kind:", id="accelerator-42"),
    pytest.param(_too_many_cores, "invalid hardware.usable_cores:", id="usable-above-logical"),
    pytest.param(_no_architecture, "invalid hardware.architecture:", id="no-architecture"),
    pytest.param(_id_with_slash, "invalid device_id:", id="id-slash"),
    pytest.param(_id_dot_dot, "invalid device_id:", id="id-dot-dot"),
    pytest.param(_id_parent_path, "invalid device_id:", id="id-parent-path"),
]


@pytest.mark.parametrize(("mutate", "message"), INVALID_REQUESTS)
def test_register_rejects(
    orchestrator: OrchestratorThread, mutate: Callable[[agent_pb2.RegisterRequest], None], message: str
) -> None:
    request = register_request()
    mutate(request)

    with pytest.raises(grpc.RpcError) as caught:
        orchestrator.agent.Register(request, timeout=30)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(message)
    assert list_device_ids(orchestrator) == []


def test_register_identity_conflict(orchestrator: OrchestratorThread, caplog: pytest.LogCaptureFixture) -> None:
    device_id, _ = register(orchestrator.agent, "camera-01", labels={"site": "lab-1"})
    before = get_device(orchestrator, device_id)
    intruder_key = new_instance_key()
    intruder = register_request(
        device_id, intruder_key, hardware=hardware_message(cpu_model="Other CPU"), labels={"site": "elsewhere"}
    )

    with caplog.at_level(logging.WARNING, logger="edgefleet.orchestrator"), pytest.raises(grpc.RpcError) as caught:
        orchestrator.agent.Register(intruder, timeout=30)

    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "camera-01" in caught.value.details()
    assert any("rejected registration of device_id=camera-01" in r.getMessage() for r in caplog.records)
    after = get_device(orchestrator, device_id)
    assert len(after.identity_conflicts) == 1
    conflict = after.identity_conflicts[0]
    assert conflict.instance_key_fingerprint == hashlib.sha256(intruder_key.encode()).hexdigest()[:12]
    assert conflict.peer.startswith("ipv4:127.0.0.1:")
    assert conflict.seen_at.seconds > 0
    assert after.hardware == before.hardware
    assert dict(after.labels) == {"site": "lab-1"}
    assert after.profile_revisions == before.profile_revisions


def test_register_50_concurrent(orchestrator: OrchestratorThread) -> None:
    def register_one(index: int) -> str:
        hardware = hardware_message(memory_total_bytes=(index + 1) * 256 * 1024**2, memory_available_bytes=0)
        device_id, _ = register(orchestrator.agent, labels={"index": str(index)}, hardware=hardware)
        return device_id

    with ThreadPoolExecutor(max_workers=50) as pool:
        device_ids = list(pool.map(register_one, range(50)))

    assert len(set(device_ids)) == 50
    assert sorted(list_device_ids(orchestrator)) == sorted(device_ids)


def test_register_concurrent_same_id(orchestrator: OrchestratorThread) -> None:
    """Agents racing for one new id: exactly one wins, the rest get ALREADY_EXISTS."""
    keys = [new_instance_key() for _ in range(8)]

    def register_one(key: str) -> grpc.StatusCode:
        try:
            orchestrator.agent.Register(register_request("contested", key), timeout=30)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(register_one, keys))

    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 7


def test_list_filters(orchestrator: OrchestratorThread) -> None:
    register(orchestrator.agent, "cam-1", labels={"kind": "camera"})
    register(orchestrator.agent, "plc-1", labels={"kind": "plc"}, hardware=hardware_message(usable_cores=1.0))

    by_label = orchestrator.operator.ListDevices(
        operator_pb2.ListDevicesRequest(label_selector={"kind": "plc"}), timeout=30
    )
    plc_class = get_device(orchestrator, "plc-1").hardware.hardware_class
    by_class = orchestrator.operator.ListDevices(operator_pb2.ListDevicesRequest(hardware_class=plc_class), timeout=30)
    online = orchestrator.operator.ListDevices(
        operator_pb2.ListDevicesRequest(status=common_pb2.DEVICE_STATUS_ONLINE), timeout=30
    )

    assert [d.device_id for d in by_label.devices] == ["plc-1"]
    assert [d.device_id for d in by_class.devices] == ["plc-1"]
    assert [d.device_id for d in online.devices] == []


def test_register_concurrent_retry(orchestrator: OrchestratorThread) -> None:
    """One agent retrying its first registration in parallel: every call succeeds with the same id."""
    key = new_instance_key()

    def register_once(_: int) -> str:
        device_id, _key = register(orchestrator.agent, "retrying", key)
        return device_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        device_ids = list(pool.map(register_once, range(8)))

    assert device_ids == ["retrying"] * 8
    assert get_device(orchestrator, "retrying").profile_revisions == 1


def test_list_pages(orchestrator: OrchestratorThread) -> None:
    for index in range(5):
        register(orchestrator.agent, f"dev-{index}", labels={"parity": "even" if index % 2 == 0 else "odd"})

    pages = []
    request = operator_pb2.ListDevicesRequest(page_size=2)
    while True:
        response = orchestrator.operator.ListDevices(request, timeout=30)
        pages.append([d.device_id for d in response.devices])
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    even = orchestrator.operator.ListDevices(
        operator_pb2.ListDevicesRequest(page_size=2, label_selector={"parity": "even"}), timeout=30
    )
    even_rest = orchestrator.operator.ListDevices(
        operator_pb2.ListDevicesRequest(
            page_size=2, label_selector={"parity": "even"}, page_token=even.next_page_token
        ),
        timeout=30,
    )

    assert pages == [["dev-0", "dev-1"], ["dev-2", "dev-3"], ["dev-4"]]
    assert [d.device_id for d in even.devices] == ["dev-0", "dev-2"]
    assert [d.device_id for d in even_rest.devices] == ["dev-4"]
    assert even_rest.next_page_token == ""
