"""Temporary files of a compression worker stay in its work directory, which the runner removes."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path


def stage_and_block(work_dir: str, ready: Event) -> None:
    """Stage a file in a temporary directory as quantize_static_qdq does, then block until killed."""
    # Imported here, in the child: test_jobs checks that the test process never imports the worker module.
    from edgefleet.orchestrator.jobs.worker import keep_temp_files_in

    keep_temp_files_in(Path(work_dir))
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as scratch:
        (Path(scratch) / "source.onnx").write_bytes(b"model")
        (Path(work_dir) / "tmpdir.txt").write_text(os.environ["TMPDIR"])
        ready.set()
        time.sleep(600)


def test_killed_worker_temp_files(tmp_path: Path) -> None:
    work_dir = tmp_path / "job-1"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=stage_and_block, args=(str(work_dir), ready))
    process.start()
    try:
        assert ready.wait(120), "the worker process did not stage its file"
    finally:
        # SIGKILL, as the runner sends to a worker that ignores SIGTERM, skips the TemporaryDirectory cleanup.
        process.kill()
        process.join()

    staged = list((work_dir / "tmp").glob("edgefleet-quant-*/source.onnx"))
    assert len(staged) == 1
    assert (work_dir / "tmpdir.txt").read_text() == str(work_dir / "tmp")
