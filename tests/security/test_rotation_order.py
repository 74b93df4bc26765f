"""Key rotation pushes and deploys that race on one control stream, with the interleaving forced by a hook.

A desired state carries the key set and signatures of the moment it is sent, so the order of key
updates cannot matter by itself. What can go wrong is a push whose desired state was read from the
store before a concurrent deploy but queued after it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from edgefleet.orchestrator import serde
from edgefleet.orchestrator.fleet import StreamSession
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2
from tests.security.helpers import SecureOrchestrator
from tests.security.test_signing import deploy_and_wait, served_version, start_enrolled_agent, status_of
from tests.servers import STEP_TIMEOUT_S, AgentThread, linear_onnx, upload_requests, wait_until

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]
StartAgent = Callable[..., AgentThread]


def test_rotation_read_before_deploy(
    start_secure: StartSecure, start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation that read the desired state before a deploy does not undo the deploy on the device."""
    orchestrator = start_secure()
    admin = orchestrator.operator()
    for version, seed in (("1", 0), ("2", 1)):
        admin.UploadModel(upload_requests(linear_onnx(seed), "linear", version), timeout=120)
    agent = start_enrolled_agent(orchestrator, start_agent, "ecu-1")
    wait_until(lambda: agent.agent.connected, "the agent to connect")
    deploy_and_wait(orchestrator, "ecu-1", "1", common_pb2.MODEL_STATE_SERVING)
    reconciler = agent.agent.reconciler
    apply = reconciler.apply
    applied: list[int] = []

    def recording_apply(desired: agent_pb2.DesiredState, *, offline: bool = False, ticket: int | None = None) -> None:
        applied.append(desired.generation)
        apply(desired, offline=offline, ticket=ticket)

    monkeypatch.setattr(reconciler, "apply", recording_apply)

    # Pause the rotation handler right after it has read the device's desired state.
    store = orchestrator.server.state.store
    get_desired_state = store.get_desired_state
    rotation_read = threading.Event()
    release = threading.Event()

    def pausing_get_desired_state(device_id: str) -> Any:
        desired = get_desired_state(device_id)
        if sys._getframe(1).f_code.co_name == "_send_key_set" and not rotation_read.is_set():
            rotation_read.set()
            assert release.wait(STEP_TIMEOUT_S)
        return desired

    monkeypatch.setattr(store, "get_desired_state", pausing_get_desired_state)
    rotations: list[operator_pb2.ListSigningKeysResponse] = []
    rotation = threading.Thread(
        target=lambda: rotations.append(admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=60))
    )
    rotation.start()
    try:
        assert rotation_read.wait(STEP_TIMEOUT_S)
        deployed = deploy_and_wait(orchestrator, "ecu-1", "2", common_pb2.MODEL_STATE_SERVING)
        generation = reconciler.generation
    finally:
        release.set()
        rotation.join(STEP_TIMEOUT_S)

    # A second rotation is sent after whatever the first one queued, so once the agent trusts its
    # key, the agent has applied every earlier message on the stream.
    second = admin.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=60)
    second_key = next(k.key_id for k in second.keys if k.active)
    wait_until(lambda: second_key in agent.agent.verifier.keys or None, "the agent to learn the second new key")
    first_key = next(k.key_id for k in rotations[0].keys if k.active)
    after = status_of(orchestrator, "ecu-1")

    assert deployed.variant_id == "linear:2:source"
    assert applied == sorted(applied), f"the agent applied an older desired state after a newer one: {applied}"
    assert first_key in agent.agent.verifier.keys
    assert served_version(agent) == "2"
    assert reconciler.generation == generation
    assert after is not None
    assert after.model_version == "2"
    assert after.state == common_pb2.MODEL_STATE_SERVING
    assert after.error == ""


def test_session_skips_older_desired_state() -> None:
    """A desired state older than one already queued is not queued, while the same generation is."""

    async def queued_generations() -> list[int]:
        session = StreamSession(device_id="ecu-1", peer="test", opened_at=datetime.now(UTC))
        for generation in (3, 2, 3, 4):
            assert session.send(serde.desired_state_message(generation, []))
        generations = []
        while not session.queue.empty():
            message = session.queue.get_nowait()
            assert message is not None
            generations.append(message.desired_state.generation)
        return generations

    assert asyncio.run(queued_generations()) == [3, 3, 4]
