"""The code that runs one compression job in a worker process: compress, gate, store the variants."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.common.logs import RootInfoFilter
from edgefleet.common.models import ModelMetadata, TensorSpec
from edgefleet.orchestrator.artifacts import FileArtifactStore
from edgefleet.orchestrator.compress.calibration import ArrayCalibrationReader, CalibrationError
from edgefleet.orchestrator.compress.gate import GateError, GateResult, evaluate_variant
from edgefleet.orchestrator.compress.quantize import QuantizationError, quantize_dynamic_int8, quantize_static_qdq
from edgefleet.orchestrator.compress.recipe import RecipeError
from edgefleet.orchestrator.domain import Variant
from edgefleet.orchestrator.jobs import sources
from edgefleet.orchestrator.jobs.plan import JobPlan, PlanError, PlannedVariant, load_recipe_json, plan_job
from edgefleet.orchestrator.jobs.runner import EXIT_ABANDONED, EXIT_DATABASE_UNAVAILABLE, WorkerArgs
from edgefleet.orchestrator.jobs.store import RUNNING, Job, JobStore, open_job_store
from edgefleet.orchestrator.modelinfo import ModelFileError, inspect_model
from edgefleet.orchestrator.store.base import StoreError
from edgefleet.orchestrator.store.engine import DatabaseUnavailable

if TYPE_CHECKING:
    from edgefleet.orchestrator.compress.qat import FineTuneConfig

logger = logging.getLogger(__name__)

# A worker whose orchestrator died exits within this many seconds.
PARENT_CHECK_INTERVAL_S = 1.0
# Progress writes during calibration are at least this far apart.
PROGRESS_INTERVAL_S = 0.5
# Temporary files of the artifact store younger than this are left alone by the worker's store handle.
_ARTIFACT_TEMP_AGE_S = 7 * 86400.0
# Expected failures: their message is the job's error as is.
_JOB_ERRORS = (
    sources.SourceError,
    PlanError,
    RecipeError,
    CalibrationError,
    QuantizationError,
    GateError,
    ModelFileError,
    StoreError,
)


ROOT_INFO_FILTER = RootInfoFilter()


class JobAbandoned(Exception):
    """The job left the running state under this attempt (cancelled or requeued); stop without writing."""


class Progress:
    """Writes a job's progress and stage to the job store; raises JobAbandoned when the job is not ours."""

    def __init__(self, store: JobStore, job_id: str, attempt: int) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self._last = 0.0

    def report(self, progress: float, stage: str, *, throttle: bool = False) -> None:
        now = time.monotonic()
        if throttle and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        logger.info("job %s: %.0f%% %s", self.job_id, progress * 100, stage)
        if not self.store.report_progress(self.job_id, self.attempt, progress, stage, datetime.now(UTC)):
            raise JobAbandoned(self.job_id)


def main(args: WorkerArgs) -> None:
    """Run one job attempt in this process and exit: 0 when it finished (succeeded or failed), 3 when
    it was abandoned, 4 when it lost the database, 1 on an unexpected error that could not be recorded."""
    from edgefleet.common.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    logging.getLogger().addFilter(ROOT_INFO_FILTER)
    keep_temp_files_in(Path(args.work_dir))
    _watch_parent(args.parent_pid)
    try:
        store = open_job_store(args.db_url)
    except DatabaseUnavailable as error:
        logger.warning(
            "job %s attempt %d stopped: %s; the job runs again from the start", args.job_id, args.attempt, error
        )
        sys.exit(EXIT_DATABASE_UNAVAILABLE)
    try:
        code = run_attempt(store, args)
    finally:
        store.close()
    sys.exit(code)


def keep_temp_files_in(work_dir: Path) -> Path:
    """Make WORK_DIR/tmp this process's directory for temporary files, and return it.

    The runner removes the attempt's work directory when the worker exits, also after SIGTERM or
    SIGKILL, and a later runner start removes it after a crash. A temporary directory under /tmp
    would stay behind in those cases, with the copies of the model that quantization stages there
    (56 MB for the demo's EfficientNet-Lite0). TMPDIR carries the setting to child processes.
    """
    scratch = work_dir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(scratch)
    os.environ["TMPDIR"] = str(scratch)
    return scratch


def run_attempt(store: JobStore, args: WorkerArgs) -> int:
    """Run the job's attempt and record its outcome; return the process exit status."""
    progress = Progress(store, args.job_id, args.attempt)
    job: Job | None = None
    try:
        job = store.get_job(args.job_id)
        if job.state != RUNNING or job.attempt != args.attempt:
            raise JobAbandoned(args.job_id)
        variants, source_top1, source_samples = _run(job, args, progress)
        progress.report(0.98, f"storing {len(variants)} variants")
        finished = store.finish(
            job.job_id,
            args.attempt,
            variants,
            datetime.now(UTC),
            source_top1=source_top1,
            source_samples=source_samples,
        )
        if not finished:
            raise JobAbandoned(args.job_id)
        return 0
    except JobAbandoned:
        logger.info("job %s attempt %d was cancelled or requeued; worker exits", args.job_id, args.attempt)
        return EXIT_ABANDONED
    except DatabaseUnavailable as error:
        # Recording a failure needs the database as well, so the runner queues the job again instead.
        logger.warning(
            "job %s attempt %d stopped: %s; the job runs again from the start", args.job_id, args.attempt, error
        )
        return EXIT_DATABASE_UNAVAILABLE
    except _JOB_ERRORS as error:
        message = str(error)
    except Exception as error:  # Recorded on the job, so an operator sees it without the log.
        logger.exception("job %s failed unexpectedly", args.job_id)
        message = f"unexpected {type(error).__name__}: {error}"
    if job is not None:
        message = _name_work_files(message, job, Path(args.work_dir))
    logger.warning("job %s failed: %s", args.job_id, message)
    store.fail(args.job_id, args.attempt, message, datetime.now(UTC))
    return 0


def variant_label(kind: str, format: str) -> str:
    """Name a variant by kind and format for messages: "int8 onnx", but "tflite-int8" alone."""
    return kind if kind.startswith(f"{format}-") else f"{kind} {format}"


def _name_work_files(message: str, job: Job, work: Path) -> str:
    """Replace the paths of files in the work directory, which is removed when the worker exits, with names.

    The source copy becomes "model NAME:VERSION" and a variant file KIND.FORMAT "the KIND FORMAT variant".
    """
    model = f"model {job.model_name}:{job.model_version}"

    def name(match: re.Match[str]) -> str:
        stem, _, suffix = match.group(1).partition(".")
        return model if stem == "source" else f"the {variant_label(stem, suffix)} variant of {model}"

    return re.sub(re.escape(str(work)) + r"/([\w-]+\.\w+)", name, message)


def _run(job: Job, args: WorkerArgs, progress: Progress) -> tuple[list[Variant], float | None, int]:
    """Make and gate the job's variants.

    Returns them, the source's top-1 accuracy when labels measured it (else None) and the number of
    evaluation samples.
    """
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    artifacts = FileArtifactStore(args.artifacts_root, temp_max_age_s=_ARTIFACT_TEMP_AGE_S)

    progress.report(0.02, "fetching the source model")
    source = work / f"source.{job.source_format}"
    _fetch(artifacts, job.source_digest, source)
    metadata = inspect_model(source)
    recipe_data = load_recipe_json(job.recipe_json)
    gated = _gated_variant(recipe_data, progress.store)
    plan = plan_job(recipe_data, metadata, gated)
    spec = _input_spec(plan, metadata)

    calibration: np.ndarray | None = None
    if plan.calibration is not None:
        assert plan.recipe.quantize is not None
        progress.report(0.05, f"loading calibration data from {sources.describe(plan.calibration)}")
        calibration = sources.load_samples(
            plan.calibration, "quantize.calibration", "calibration", spec, plan.recipe.quantize.calibration_size
        ).inputs

    candidates: list[tuple[PlannedVariant, Path]] = []
    share = 0.55 / len(plan.variants)
    for index, planned in enumerate(plan.variants):
        start = 0.1 + index * share
        if gated is not None:
            progress.report(start, f"fetching the uploaded variant {gated.variant_id}")
            candidates.append((planned, _fetch(artifacts, gated.digest, work / f"{planned.kind}.{planned.format}")))
            continue
        candidates.append(
            (planned, _produce(planned, plan, source, metadata, spec, calibration, work, progress, start, share))
        )

    dropped = ROOT_INFO_FILTER.take()
    if dropped:
        logger.info(
            "job %s: left %d INFO lines of onnxruntime's quantizer out of the log (such as raised weight scales)",
            job.job_id,
            dropped,
        )
    progress.report(0.66, f"loading evaluation data from {sources.describe(plan.evaluation)}")
    evaluation = sources.load_samples(plan.evaluation, plan.evaluation_field, "evaluation", spec)
    evaluation_digest = _data_digest(evaluation.inputs, evaluation.labels)
    gate = plan.recipe.gate
    variants: list[Variant] = []
    source_top1: float | None = None
    share = 0.3 / len(candidates)
    for index, (planned, path) in enumerate(candidates):
        threads = ", ".join(str(t) for t in gate.threads)
        progress.report(
            0.67 + index * share,
            f"gating {variant_label(planned.kind, planned.format)}: accuracy on "
            f"{evaluation.inputs.shape[0]} samples, latency at {threads} threads",
        )
        result = evaluate_variant(
            path,
            source,
            evaluation.inputs,
            labels=evaluation.labels,
            runtimes=plan.gate_runtimes(planned),
            max_accuracy_drop=gate.max_accuracy_drop,
            threads=gate.threads,
            input_name=spec.name,
        )
        if result.accuracy_metric == "top1" and result.source_accuracy is not None:
            source_top1 = result.source_accuracy  # The same source on the same samples for every candidate.
        if gated is not None:
            made = _gated_result(job, gated, result)
        else:
            made = _store_variant(job, planned, path, result, artifacts)
        variants.append(replace(made, evaluation_digest=evaluation_digest))
    return variants, source_top1, int(evaluation.inputs.shape[0])


def _data_digest(inputs: np.ndarray, labels: np.ndarray | None) -> str:
    """Return "sha256:<hex>" of the evaluation samples and labels, with their shapes and dtypes."""
    digest = hashlib.sha256()
    for array in (inputs, labels):
        if array is None:
            digest.update(b"none")
            continue
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return "sha256:" + digest.hexdigest()


def _gated_variant(recipe: dict[str, Any], store: JobStore) -> Variant | None:
    """Return the uploaded variant that the recipe's gate.variant names, or None; plan_job checks the rest."""
    gate = recipe.get("gate")
    variant_id = gate.get("variant") if isinstance(gate, dict) else None
    if not isinstance(variant_id, str) or not variant_id:
        return None
    return store.get_variant(variant_id)


def _fetch(artifacts: FileArtifactStore, digest: str, output: Path) -> Path:
    """Copy a stored artifact into the work directory, for the gate to load it there."""
    with artifacts.open(digest) as stored, output.open("wb") as copy:
        shutil.copyfileobj(stored, copy)
    return output


def _gated_result(job: Job, gated: Variant, result: GateResult) -> Variant:
    """Return the variant with the gate's verdict and figures; the file of an uploaded one stays as stored."""
    return replace(
        gated,
        status=result.status,
        rejection_reason="" if result.accepted else result.reason,
        accuracy=result.accuracy,
        accuracy_metric=result.accuracy_metric,
        accuracy_drop=result.accuracy_drop_points,
        evaluation_samples=result.evaluation_samples,
        latency_ms=dict(result.latency_p50_ms),
        source_latency_ms=dict(result.source_latency_p50_ms),
        parent_variant_id=job.source_variant_id,
    )


def _input_spec(plan: JobPlan, metadata: ModelMetadata) -> TensorSpec:
    source = plan.calibration if plan.calibration is not None else plan.evaluation
    return sources.choose_input(metadata.inputs, source, "quantize.calibration")


def _produce(
    planned: PlannedVariant,
    plan: JobPlan,
    source: Path,
    metadata: ModelMetadata,
    spec: TensorSpec,
    calibration: np.ndarray | None,
    work: Path,
    progress: Progress,
    start: float,
    share: float,
) -> Path:
    output = work / f"{planned.kind}.{planned.format}"
    if planned.method == "onnx-dynamic":
        progress.report(start, "quantizing weights to int8 (dynamic)")
        return quantize_dynamic_int8(source, output, metadata=metadata)
    if planned.method == "tflite-fp16":
        from edgefleet.orchestrator.compress.tflite import quantize_tflite

        progress.report(start, "converting weights to fp16")
        return quantize_tflite(source, output, precision="fp16")
    assert calibration is not None and plan.recipe.quantize is not None
    if planned.method == "tflite-int8":
        from edgefleet.orchestrator.compress.tflite import quantize_tflite

        progress.report(start, f"quantizing to int8 with {calibration.shape[0]} calibration samples")
        return quantize_tflite(source, output, precision="int8", calibration=calibration)
    settings = plan.recipe.quantize
    # Fine-tuning takes minutes, so it gets the second half of this variant's share of the progress.
    calibration_share = share / 2 if settings.fine_tune_steps else share

    def on_stage(fraction: float, stage: str) -> None:
        # Batches come every few milliseconds; the steps between them are reported at once.
        progress.report(start + calibration_share * fraction, stage, throttle="batch" in stage)

    def on_step(step: int, steps: int, loss: float) -> None:
        progress.report(
            start + calibration_share + (share - calibration_share) * step / steps,
            f"fine-tuning int8 weights: step {step}/{steps}, loss {loss:.4g}",
            throttle=step < steps,
        )

    return quantize_static_qdq(
        source,
        output,
        ArrayCalibrationReader(spec, calibration),
        per_channel=settings.per_channel,
        activation_type=settings.activation_type,
        calibration_method=settings.calibration_method,
        reduce_range=settings.reduce_range,
        input_name=spec.name,
        bias_correction=settings.bias_correction,
        weight_rounding=settings.weight_rounding,
        fine_tune=_fine_tune_config(settings.fine_tune_steps),
        fine_tune_progress=on_step,
        stage_progress=on_stage,
    )


def _fine_tune_config(steps: int) -> FineTuneConfig | None:
    if steps == 0:
        return None
    # Imported here because torch is only needed for this option.
    from edgefleet.orchestrator.compress.qat import FineTuneConfig

    return FineTuneConfig(steps=steps)


def _store_variant(
    job: Job, planned: PlannedVariant, path: Path, result: GateResult, artifacts: FileArtifactStore
) -> Variant:
    """Put the candidate file in the artifact store and describe it; nothing reaches the catalog yet."""
    metadata = inspect_model(path)
    digest = artifacts.put_file(path)
    made = Variant(
        variant_id=variant_id_for(job, planned.kind),
        model_name=job.model_name,
        model_version=job.model_version,
        kind=planned.kind,
        format=planned.format,
        precision=planned.precision,
        digest=digest,
        size_bytes=path.stat().st_size,
        metadata=metadata,
    )
    return _gated_result(job, made, result)


def variant_id_for(job: Job, kind: str) -> str:
    """Return the id of the variant of this kind that a job makes: NAME:VERSION:KIND-JOBID."""
    return f"{job.model_name}:{job.model_version}:{kind}-{job.job_id}"


def _watch_parent(parent_pid: int) -> None:
    """Exit this process when the orchestrator that started it is gone (killed with SIGKILL, say)."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_INTERVAL_S)
            if os.getppid() != parent_pid:
                logger.warning("orchestrator process %d is gone; worker %d exits", parent_pid, os.getpid())
                os._exit(EXIT_ABANDONED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
