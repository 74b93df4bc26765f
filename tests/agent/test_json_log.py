"""The agent's JSON log stays one JSON object a line while LiteRT prints to fd 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.agent.models import tflite_linear
from tests.faults.fleet import MODEL, deploy, online_device, wait_serving
from tests.faults.processes import ROOT, STEP_TIMEOUT_S, AgentProcess, OrchestratorProcess, wait_for
from tests.servers import upload_requests

pytestmark = pytest.mark.slow

XNNPACK_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Parse every line of text as a JSON object; fail naming the first line that is not one."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
        assert isinstance(record, dict), f"line {number} is not a JSON object: {line!r}"
        records.append(record)
    return records


def test_agent_json_log_with_tflite_model(tmp_path: Path) -> None:
    model = tflite_linear().read_bytes()
    orchestrator = OrchestratorProcess(tmp_path)
    orchestrator.start()
    agent = AgentProcess(tmp_path, "camera", orchestrator.address, "--log-format", "json", "--log-level", "debug")
    agent.start()
    channel, operator = orchestrator.operator()
    try:
        device_id = wait_for(agent.device_id, "the agent to register")
        wait_for(lambda: online_device(operator, device_id), "the device to come online")
        requests = upload_requests(model, MODEL, "1", filename="linear.tflite")
        operator.UploadModel(requests, timeout=STEP_TIMEOUT_S)
        deploy(operator, device_id, "1")
        wait_serving(operator, device_id, "1")
    finally:
        channel.close()
        agent.stop()
        orchestrator.stop()
    # The agent's stdout and stderr both go to this file.
    records = parse_lines(agent.log_path.read_text())

    xnnpack = [r for r in records if r["message"].endswith(XNNPACK_LINE)]
    assert len(xnnpack) == 1, "LiteRT prints the XNNPACK line once per process"
    assert xnnpack[0]["level"] == "debug"
    assert xnnpack[0]["logger"] == "edgefleet.agent.runtime.native_stderr"


# A process that loads a TFLite model while a second thread logs a record and writes raw bytes to
# fd 2. It prints nothing else, so its first interpreter prints the XNNPACK line during load().
LOAD_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, threading
    from edgefleet.agent.runtime import native_stderr
    from edgefleet.agent.runtime.litert import LiteRTRunner
    from edgefleet.common.logs import configure_logging

    configure_logging("debug", "json")
    inside, written = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        logging.getLogger("other").info("record from another thread")
        os.write(2, b"raw line from another thread\\n")
        written.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with native_stderr.capture_native_stderr("running the test block"):
        inside.set()
        written.wait()
        LiteRTRunner(gpu_delegate_libraries=()).load(sys.argv[1], threads=1)
    thread.join()
    os.write(2, b'{"after": "fd 2 restored"}\\n')
    """
)


def test_capture_keeps_other_threads_output() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tflite_linear())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    records = parse_lines(result.stderr)
    by_message = {r.get("message", ""): r for r in records}
    prefix = f"stderr output while running the test block; loading {tflite_linear()}: "
    xnnpack = by_message[prefix + XNNPACK_LINE]
    assert xnnpack["level"] == "debug"
    raw = by_message[prefix + "raw line from another thread"]
    assert raw["level"] == "warning"
    other = by_message["record from another thread"]
    assert other["logger"] == "other"
    assert records[-1] == {"after": "fd 2 restored"}
    # The other thread's record went straight to stderr, before the captured lines were logged.
    assert records.index(other) < records.index(raw)
