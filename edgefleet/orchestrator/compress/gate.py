"""The variant gate: accept a compressed model only if it loads, keeps accuracy and is measured for speed."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "litert")
_FORMAT_OF_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
_RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}
# Evaluation batches for models with a dynamic batch axis; fixed-batch models run one sample at a time.
_EVAL_BATCH = 32


class GateError(ValueError):
    """Invalid gate arguments (not a verdict on the candidate, which GateResult carries)."""


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on one candidate variant, with every figure it measured."""

    status: str  # "accepted" or "rejected".
    reason: str
    accuracy: float | None = None  # Fraction in [0, 1] of the accuracy_metric.
    accuracy_metric: str = ""  # "top1" against labels, or "top1_agreement" with the source's top-1.
    source_accuracy: float | None = None
    accuracy_drop_points: float | None = None  # (source_accuracy - accuracy) * 100.
    evaluation_samples: int = 0  # Number of samples that accuracy was measured on.
    latency_p50_ms: dict[str, float] = field(default_factory=dict)  # By "threads=N".
    source_latency_p50_ms: dict[str, float] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)  # source p50 / candidate p50, by "threads=N".
    slower_than_source: bool = False  # True when the candidate's p50 is higher at any thread count.
    size_bytes: int = 0
    source_size_bytes: int = 0
    macs: int | None = None  # From the model inspector; None when it cannot read the candidate.
    peak_activation_bytes: int | None = None
    runtime: str = ""  # The runtime that measured accuracy and latency.

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-serializable dict."""
        return asdict(self)


class _Runner:
    """One loaded model on one runtime with a fixed thread count."""

    def __init__(self, path: Path, runtime: str, threads: int, input_name: str | None) -> None:
        self.path = path
        self.runtime = runtime
        self.fixed_batch = 0
        # Sizes of the input axes after the batch axis (None for a dynamic axis), or None for an unknown rank.
        self.input_axes: tuple[int | None, ...] | None = None
        self._run: Callable[[np.ndarray], np.ndarray]
        if runtime == "onnxruntime":
            self._load_onnxruntime(threads, input_name)
        elif runtime == "litert":
            self._load_litert(threads)
        else:
            raise GateError(f"unknown runtime {runtime!r}: expected one of {RUNTIMES}")

    def _load_onnxruntime(self, threads: int, input_name: str | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        if input_name is None:
            if len(inputs) != 1:
                raise GateError(f"{self.path} has inputs {[i.name for i in inputs]}: pass input_name")
            name = inputs[0].name
        else:
            name = input_name
        batch = [i.shape for i in inputs if i.name == name]
        if not batch:
            raise GateError(f"input {name!r} not found in {self.path}: inputs are {[i.name for i in inputs]}")
        if batch[0] and isinstance(batch[0][0], int):
            self.fixed_batch = batch[0][0]
        if batch[0]:
            self.input_axes = tuple(axis if isinstance(axis, int) else None for axis in batch[0][1:])
        output = session.get_outputs()[0].name
        self._run = lambda x: session.run([output], {name: x})[0]

    def _load_litert(self, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        interpreter.allocate_tensors()
        input_detail = interpreter.get_input_details()[0]
        output_detail = interpreter.get_output_details()[0]
        self.fixed_batch = 1
        signature = input_detail.get("shape_signature", input_detail["shape"])
        self.input_axes = tuple(int(axis) if axis >= 0 else None for axis in signature[1:])
        allocated_shape = [tuple(input_detail["shape"])]

        def run(batch: np.ndarray) -> np.ndarray:
            if tuple(batch.shape) != allocated_shape[0]:
                interpreter.resize_tensor_input(input_detail["index"], list(batch.shape))
                interpreter.allocate_tensors()
                allocated_shape[0] = tuple(batch.shape)
            interpreter.set_tensor(input_detail["index"], _quantize_input(batch, input_detail))
            interpreter.invoke()
            return _dequantize_output(interpreter.get_tensor(output_detail["index"]), output_detail)

        self._run = run

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(batch))

    def in_layout(self, batch: np.ndarray) -> np.ndarray:
        """Return batch transposed between NCHW and NHWC when only the other layout fits the model input.

        The evaluation samples have the source's layout, and a TFLite variant of an ONNX source usually
        takes channels last. A batch that fits as it is, or in neither layout, is returned unchanged.
        """
        if self.input_axes is None or batch.ndim != 4 or self._fits(batch.shape[1:]):
            return batch
        for order in ((0, 2, 3, 1), (0, 3, 1, 2)):
            if self._fits(tuple(batch.shape[axis] for axis in order[1:])):
                return np.ascontiguousarray(batch.transpose(order))
        return batch

    def _fits(self, shape: tuple[int, ...]) -> bool:
        assert self.input_axes is not None
        return len(shape) == len(self.input_axes) and all(
            expected is None or expected == size for expected, size in zip(self.input_axes, shape, strict=True)
        )

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Run all inputs (batch axis first) and return the outputs concatenated."""
        step = self.fixed_batch if self.fixed_batch > 0 else _EVAL_BATCH
        inputs = self.in_layout(inputs)
        return np.concatenate([self(inputs[i:i + step]) for i in range(0, inputs.shape[0], step)])


def _quantize_input(batch: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return batch.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(batch / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize_output(output: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return output
    scale, zero_point = detail["quantization"]
    return (output.astype(np.float32) - zero_point) * scale


def model_format(path: Path) -> str:
    """Return "onnx" or "tflite" from the file suffix; raise GateError for any other suffix."""
    found = _FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise GateError(f"cannot tell the format of {path}: expected a .onnx or .tflite file")
    return found


def _check_label_range(labels: np.ndarray, classes: int) -> None:
    """Raise GateError when a label is no class index of an output with `classes` scores per sample.

    An out-of-range label matches neither model's top-1, so it lowers both scores alike and hides a drop:
    with every label out of range, both score 0 and any candidate passes.
    """
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if outside.size:
        index = int(outside[0])
        raise GateError(
            f"labels contain class {labels[index]} at sample {index} ({outside.size} of {labels.shape[0]} out of "
            f"range), but the source model outputs {classes} scores per sample: labels must be class indices "
            f"from 0 to {classes - 1}"
        )


def evaluate_variant(
    candidate: Path,
    source: Path,
    eval_inputs: np.ndarray,
    *,
    labels: np.ndarray | None,
    runtimes: Sequence[str] = ("onnxruntime",),
    max_accuracy_drop: float,
    threads: Sequence[int] = (1, 2),
    input_name: str | None = None,
    warmup: int = 5,
    repeats: int = 30,
    latency_samples: int = 1,
) -> GateResult:
    """Load, score and time a candidate variant against its source, and accept or reject it.

    The candidate must load on every runtime in runtimes. An ONNX file loads only on "onnxruntime" and
    a TFLite file only on "litert". A load or run failure rejects the candidate with the runtime's error.
    Accuracy is top-1 against labels when given, else top-1 agreement with the source on eval_inputs.
    A model whose 4-D input fits eval_inputs only with NCHW and NHWC swapped gets them transposed.
    A drop of more than max_accuracy_drop percentage points rejects the candidate. So does a positive
    max_accuracy_drop smaller than one sample's worth (100 / samples points), because with so few samples
    any changed top-1 already exceeds it and the limit that applies is 0, not the one requested. A limit
    of 0 allows no changed sample, which any number of samples can check. Latency is the p50
    of `repeats` runs per thread count after `warmup` runs, with source and candidate interleaved in
    one loop so both see the same machine load. A slower candidate is flagged, never rejected for speed.

    Returns a GateResult. Raises GateError for invalid arguments and when the source itself does not load.
    """
    if max_accuracy_drop < 0:
        raise GateError(f"invalid max_accuracy_drop {max_accuracy_drop}: must be >= 0 points")
    if not threads or any(t <= 0 for t in threads):
        raise GateError(f"invalid threads {tuple(threads)}: give one or more positive thread counts")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise GateError(f"invalid runtimes {tuple(runtimes)}: expected a non-empty subset of {RUNTIMES}")
    if eval_inputs.shape[0] == 0:
        raise GateError("eval_inputs is empty: give at least one sample with the batch axis first")
    if labels is not None and labels.shape[0] != eval_inputs.shape[0]:
        raise GateError(
            f"labels has {labels.shape[0]} entries but eval_inputs has {eval_inputs.shape[0]} samples"
        )

    sizes: dict[str, Any] = {"size_bytes": candidate.stat().st_size if candidate.exists() else 0,
             "source_size_bytes": source.stat().st_size, "evaluation_samples": int(eval_inputs.shape[0])}
    cost: dict[str, Any] = _model_cost(candidate)

    def reject(reason: str, **figures: Any) -> GateResult:
        logger.info("gate rejected %s: %s", candidate, reason)
        return GateResult(status="rejected", reason=reason, **sizes, **cost, **figures)

    candidate_format = model_format(candidate)
    source_runtime = _RUNTIME_OF_FORMAT[model_format(source)]
    try:
        source_runner = _Runner(source, source_runtime, threads[0], input_name)
    except GateError:
        raise
    except Exception as error:  # Runtimes raise private exception types on load.
        raise GateError(f"source {source} does not load on {source_runtime}: {error}") from error

    for runtime in runtimes:
        if _RUNTIME_OF_FORMAT[candidate_format] != runtime:
            loader = _RUNTIME_OF_FORMAT[candidate_format]
            return reject(f"{candidate_format} models load on {loader}, not on {runtime}")
        try:
            _Runner(candidate, runtime, threads[0], input_name)
        except Exception as error:  # Runtimes raise private exception types on load.
            return reject(f"failed to load on {runtime}: {error}")
    runtime = _RUNTIME_OF_FORMAT[candidate_format]

    # Accuracy.
    try:
        candidate_runner = _Runner(candidate, runtime, threads[0], input_name)
        candidate_out = candidate_runner.predict(eval_inputs)
    except Exception as error:  # An inference error is a verdict on the candidate.
        return reject(f"inference failed on {runtime}: {error}", runtime=runtime)
    source_out = source_runner.predict(eval_inputs)
    if candidate_out.shape != source_out.shape:
        return reject(
            f"output shape {candidate_out.shape} differs from the source's {source_out.shape}",
            runtime=runtime,
        )
    candidate_top1 = candidate_out.reshape(candidate_out.shape[0], -1).argmax(axis=1)
    source_top1 = source_out.reshape(source_out.shape[0], -1).argmax(axis=1)
    if labels is not None:
        _check_label_range(labels, source_out.reshape(source_out.shape[0], -1).shape[1])
    if labels is not None:
        metric = "top1"
        accuracy = float(np.mean(candidate_top1 == labels))
        source_accuracy = float(np.mean(source_top1 == labels))
    else:
        metric = "top1_agreement"
        accuracy = float(np.mean(candidate_top1 == source_top1))
        source_accuracy = 1.0
    drop = (source_accuracy - accuracy) * 100.0
    accuracy_figures: dict[str, Any] = {
        "accuracy": accuracy,
        "accuracy_metric": metric,
        "source_accuracy": source_accuracy,
        "accuracy_drop_points": drop,
        "runtime": runtime,
    }

    # Latency, interleaved.
    sample = eval_inputs[:max(1, latency_samples)]
    if candidate_runner.fixed_batch > 0 or source_runner.fixed_batch > 0:
        sample = eval_inputs[:1]
    candidate_p50: dict[str, float] = {}
    source_p50: dict[str, float] = {}
    for count in threads:
        key = f"threads={count}"
        try:
            cand = _Runner(candidate, runtime, count, input_name)
        except Exception as error:  # Runtimes raise private exception types on load.
            return reject(f"failed to load on {runtime} with {count} threads: {error}", **accuracy_figures)
        src = _Runner(source, source_runtime, count, input_name)
        source_p50[key], candidate_p50[key] = _interleaved_p50(src, cand, sample, warmup, repeats)
    speedup = {k: source_p50[k] / candidate_p50[k] for k in candidate_p50 if candidate_p50[k] > 0}
    slower = any(candidate_p50[k] > source_p50[k] for k in candidate_p50)
    latency_figures: dict[str, Any] = {
        "latency_p50_ms": candidate_p50,
        "source_latency_p50_ms": source_p50,
        "speedup": speedup,
        "slower_than_source": slower,
    }

    if drop > max_accuracy_drop:
        return reject(
            f"{metric} {accuracy:.4f} vs source {source_accuracy:.4f}: a drop of {drop:.2f} points exceeds "
            f"max_accuracy_drop {max_accuracy_drop:g}",
            **accuracy_figures, **latency_figures,
        )
    sample_points = 100.0 / eval_inputs.shape[0]
    if 0 < max_accuracy_drop < sample_points:
        return reject(
            f"too few evaluation samples: on {eval_inputs.shape[0]} samples one sample is worth "
            f"{sample_points:.2f} points, more than max_accuracy_drop {max_accuracy_drop:g}, so the gate cannot "
            f"measure a drop that small; give at least {samples_for(max_accuracy_drop)} evaluation samples or "
            f"raise max_accuracy_drop to {smallest_measurable_drop(eval_inputs.shape[0]):g}",
            **accuracy_figures, **latency_figures,
        )
    speed_note = "; slower than the source" if slower else ""
    reason = f"{metric} {accuracy:.4f} (drop {drop:.2f} <= {max_accuracy_drop:g} points){speed_note}"
    logger.info("gate accepted %s: %s", candidate, reason)
    return GateResult(
        status="accepted", reason=reason, **sizes, **cost, **accuracy_figures, **latency_figures
    )


def samples_for(max_accuracy_drop: float) -> int:
    """Return the fewest samples on which one sample is worth at most max_accuracy_drop points."""
    count = math.ceil(100.0 / max_accuracy_drop)
    # ceil can land one above the exact count when 100 / max_accuracy_drop rounds up in floating point.
    return count - 1 if count > 1 and 100.0 / (count - 1) <= max_accuracy_drop else count


def smallest_measurable_drop(samples: int) -> float:
    """Return the points one of samples is worth, rounded up to hundredths: the smallest limit the gate measures."""
    return math.ceil(100.0 / samples * 100) / 100


def _interleaved_p50(
    source: _Runner, candidate: _Runner, sample: np.ndarray, warmup: int, repeats: int
) -> tuple[float, float]:
    # Transposed before timing, so that a change of layout does not count as the candidate's latency.
    source_sample = source.in_layout(sample)
    candidate_sample = candidate.in_layout(sample)
    for _ in range(warmup):
        source(source_sample)
        candidate(candidate_sample)
    source_ms: list[float] = []
    candidate_ms: list[float] = []
    for i in range(repeats):
        # Alternate which model runs first so neither always inherits the other's cache state.
        order = ((source, source_sample, source_ms), (candidate, candidate_sample, candidate_ms))
        for runner, runner_sample, times in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runner(runner_sample)
            times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(source_ms)), float(np.median(candidate_ms))


def _model_cost(path: Path) -> dict[str, int | None]:
    """Read MACs and peak activation memory with the model inspector, when it can read the file."""
    try:
        from edgefleet.orchestrator.modelinfo import inspect_model
    except ImportError:
        return {"macs": None, "peak_activation_bytes": None}
    try:
        metadata = inspect_model(path)
    except Exception as error:  # The inspector rejects unreadable or unsupported files in several ways.
        logger.debug("cannot inspect %s: %s", path, error)
        return {"macs": None, "peak_activation_bytes": None}
    return {"macs": metadata.macs, "peak_activation_bytes": metadata.peak_activation_bytes}
