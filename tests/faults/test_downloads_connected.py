"""Downloads that fail or are replaced while the agent stays connected to the orchestrator."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.v1 import operator_pb2
from tests.faults.fleet import MODEL, deploy, linear_model, serving_fleet, upload, wait_serving
from tests.faults.processes import STEP_TIMEOUT_S, AgentProcess, InferenceClient, wait_for

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


@pytest.fixture
def small_model_store(tmp_path: Path) -> Iterator[Path]:
    """Mount a 16 MiB tmpfs as the model store of an agent named camera under tmp_path; yield its path."""
    store = tmp_path / "camera" / "models"
    store.mkdir(parents=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(store)], capture_output=True, check=False
        )
    except FileNotFoundError:
        pytest.skip("needs mount(8) to make a disk smaller than the model")
    if result.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root) to make a disk smaller than the model: {result.stderr.strip()}")
    try:
        yield store
    finally:
        subprocess.run(["umount", "--lazy", str(store)], check=True)


def fill(directory: Path) -> Path:
    """Write zeros into directory/filler until its file system is full; return the filler's path."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle, pytest.raises(OSError, match="No space left"):
        while True:
            handle.write(b"\0" * 65536)
    return filler


def part_of(agent: AgentProcess, model: bytes) -> Path:
    """Return the path of the agent's partial download of model."""
    return agent.state_dir / "models" / "partial" / f"{hashlib.sha256(model).hexdigest()}.part"


def test_disk_full_download_retried_once_space_is_freed(tmp_path: Path, small_model_store: Path) -> None:
    new_model = linear_model(6, padding_floats=2 * MIB)  # About 8 MiB.
    part = small_model_store / "partial" / f"{hashlib.sha256(new_model).hexdigest()}.part"
    with serving_fleet(tmp_path) as (orchestrator, proxy, agent):
        channel, operator = orchestrator.operator()
        with channel:
            device_id = agent.device_id()
            upload(operator, new_model, "2")
            proxy.throttle(2 * MIB)
            deploy(operator, device_id, "2")
            wait_for(lambda: part.exists() and part.stat().st_size > MIB, "a partial download of over 1 MiB")
            filler = fill(small_model_store)
            wait_for(lambda: "disk full while downloading" in agent.log_path.read_text(), "the download to fail")

            proxy.throttle(None)
            filler.unlink()
            wait_serving(operator, device_id, "2")
            output = InferenceClient(agent.socket_path, MODEL).infer_once()
            log_text = agent.log_path.read_text()

    assert output.model_version == "2"
    # The retry came from the open control stream, not from a new registration.
    assert log_text.count("registered as device_id=") == 1
    assert "retrying the download of model=linear" in log_text


def test_new_deploy_stops_replaced_download(tmp_path: Path) -> None:
    replaced = linear_model(7, padding_floats=2 * MIB)  # About 8 MiB: 4 s at 2 MiB/s.
    with serving_fleet(tmp_path) as (orchestrator, proxy, agent):
        part = part_of(agent, replaced)
        channel, operator = orchestrator.operator()
        with channel:
            device_id = agent.device_id()
            upload(operator, replaced, "2")
            upload(operator, linear_model(8), "3")
            proxy.throttle(2 * MIB)
            deploy(operator, device_id, "2")
            wait_for(lambda: part.exists() and part.stat().st_size > MIB, "a partial download of over 1 MiB")
            deploy(operator, device_id, "3")
            wait_serving(operator, device_id, "3")
            # The part of version 2 would hold disk space that the orchestrator counts as used.
            wait_for(lambda: not part.exists(), "the part of the replaced download to be removed")
            output = InferenceClient(agent.socket_path, MODEL).infer_once()
            log_text = agent.log_path.read_text()

    assert output.model_version == "3"
    assert "stopping the download of model=linear" in log_text
    # Version 2 never served: its download stopped when version 3 replaced it.
    assert "variant=linear:3:source serving" in log_text
    assert "variant=linear:2:source serving" not in log_text


def test_stop_during_download_keeps_part(tmp_path: Path) -> None:
    new_model = linear_model(9, padding_floats=2 * MIB)  # About 8 MiB: 8 s at 1 MiB/s.
    with serving_fleet(tmp_path) as (orchestrator, proxy, agent):
        part = part_of(agent, new_model)
        channel, operator = orchestrator.operator()
        with channel:
            upload(operator, new_model, "2")
            proxy.throttle(MIB)
            deploy(operator, agent.device_id(), "2")
            wait_for(lambda: part.exists() and part.stat().st_size > MIB, "a partial download of over 1 MiB")
            code = agent.stop()
            log_text = agent.log_path.read_text()

    assert code == 0
    assert "download stopped: a newer desired state arrived, or the agent stops" in log_text
    # Nothing failed or loaded after the stop: the download ended at once and kept its verified part.
    after_stop = log_text.split("agent stopped")[-1]
    assert "ERROR" not in after_stop
    assert " serving on " not in after_stop
    assert part.exists()


def test_key_rotation_adopted_during_download(tmp_path: Path) -> None:
    """The agent trusts a rotated key set on arrival, not after the download that the apply waits for.

    An apply that waits is dropped when the control stream reconnects, and the orchestrator does not
    send the key set again, so a later retire would leave the device trusting no current key.
    """
    new_model = linear_model(15, padding_floats=2 * MIB)  # About 8 MiB: 8 s at 1 MiB/s.
    with serving_fleet(tmp_path) as (orchestrator, proxy, agent):
        part = part_of(agent, new_model)
        keys_file = agent.state_dir / "trusted_keys.json"
        channel, operator = orchestrator.operator()
        with channel:
            upload(operator, new_model, "2")
            proxy.throttle(MIB)
            deploy(operator, agent.device_id(), "2")
            wait_for(lambda: part.exists() and part.stat().st_size > MIB, "a partial download of over 1 MiB")
            rotated = operator.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(), timeout=STEP_TIMEOUT_S)
            wait_for(
                lambda: json.loads(keys_file.read_text())["version"] == rotated.key_set_version,
                "the agent to trust the rotated key set",
            )
            still_downloading = part.exists()

    assert still_downloading
