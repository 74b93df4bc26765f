"""How the agent logs a signing key set that fails verification."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from edgefleet.v1 import common_pb2, operator_pb2
from tests.security.helpers import SecureOrchestrator
from tests.security.test_signing import start_enrolled_agent, status_of, wait_reported_keys
from tests.servers import AgentThread, linear_onnx, upload_requests, wait_until

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]
StartAgent = Callable[..., AgentThread]


def test_rejected_key_set_logged_once(
    start_secure: StartSecure, start_agent: StartAgent, caplog: pytest.LogCaptureFixture
) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()
    admin.UploadModel(upload_requests(linear_onnx(0), "linear", "1"), timeout=120)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_reported_keys(orchestrator, "ecu-1")
    first_key = admin.ListSigningKeys(operator_pb2.ListSigningKeysRequest(), timeout=30).keys[0].key_id
    agent.stop()
    # The device misses the rotation, and the forced retirement leaves it no key that signs the new set.
    admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=30)
    retired = admin.RetireSigningKey(operator_pb2.RetireSigningKeyRequest(key_id=first_key, force=True), timeout=30)
    new_key = retired.keys[0].key_id
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent")

    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    admin.Deploy(operator_pb2.DeployRequest(model_name="linear", model_version="1", device_id="ecu-1"), timeout=30)
    # The agent applies the desired state after it adopts or rejects its key set, and the assignment,
    # signed by the new key, fails.
    wait_until(
        lambda: (status := status_of(orchestrator, "ecu-1")) is not None
        and status.state == common_pb2.MODEL_STATE_FAILED,
        "the deploy to fail on the device",
    )
    agent.stop()

    rejections = [
        record
        for record in caplog.records
        if record.name == "edgefleet.agent.reconcile"
        and "ignoring the signing key" in record.getMessage()
        and "of desired generation" in record.getMessage()
    ]
    assert len(rejections) == 1, [record.getMessage() for record in rejections]
    message = rejections[0].getMessage()
    assert rejections[0].levelno == logging.ERROR
    assert f"with keys {new_key}, signed by {new_key} of desired generation 1" in message
    assert f"not signed by a key this device trusts ({first_key})" in message
    registration = [record.getMessage() for record in caplog.records if "from the registration" in record.getMessage()]
    assert len(registration) == 1
    assert f"with keys {new_key}, signed by {new_key}" in registration[0]
