"""The in-process model host: serves models by name and swaps versions without failing calls."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from edgefleet.agent.runtime.base import (
    LoadedModel,
    ModelLoadError,
    Runner,
    check_feeds,
    release_freed_memory,
    zeros_for,
)
from edgefleet.common.models import FORMATS, TensorSpec

logger = logging.getLogger(__name__)

# Called after every call of an installed model: model name, variant id, latency in milliseconds
# and whether the call succeeded. The latency is None for inputs rejected before the runtime ran:
# such calls count as failed, but their few microseconds of checking are no inference latency.
LatencyCallback = Callable[[str, str, float | None, bool], None]


class ModelNotFoundError(LookupError):
    """Raised when no model of the requested name is installed."""


@dataclass(frozen=True)
class InferenceResult:
    outputs: dict[str, np.ndarray]
    latency_ms: float  # Runtime call only, without input checking.
    model_name: str
    model_version: str
    variant_id: str


@dataclass(frozen=True)
class ServedModel:
    """A model version installed in the host, as list() reports it."""

    name: str
    version: str
    variant_id: str
    format: str
    path: Path
    runtime: str
    providers: tuple[str, ...]  # Execution providers or delegates in effect.
    requested_providers: tuple[str, ...]
    fallback_reason: str
    threads: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class _Entry:
    """A loaded model with the count of calls running on it.

    The host's lock guards in_flight and retired. A retired entry is closed by the caller that brings
    in_flight to 0: the swap when no call is running, else the last call to finish.
    """

    def __init__(self, model: LoadedModel, info: ServedModel) -> None:
        self.model = model
        self.info = info
        self.in_flight = 0
        self.retired = False


@dataclass(frozen=True)
class PreparedInference:
    """Feeds checked once against one served model version, from ModelHost.prepare."""

    name: str
    entry: _Entry
    feeds: dict[str, np.ndarray]


def _close(model: LoadedModel) -> None:
    """Close a model that no call uses any more and return the memory it freed to the operating system."""
    model.close()
    release_freed_memory()


def _default_runners() -> dict[str, Runner]:
    from edgefleet.agent.runtime.litert import LiteRTRunner
    from edgefleet.agent.runtime.onnx import OnnxRunner

    return {"onnx": OnnxRunner(), "tflite": LiteRTRunner()}


class ModelHost:
    """Holds the served models by name and runs inferences on them; safe to call from many threads.

    runners maps a model format ("onnx", "tflite") to its Runner (by default onnxruntime and LiteRT
    with default settings). on_latency, when given, is called after each runtime call; it runs on
    the calling thread, so it must be cheap.
    """

    def __init__(
        self,
        *,
        runners: Mapping[str, Runner] | None = None,
        default_threads: int = 1,
        on_latency: LatencyCallback | None = None,
    ) -> None:
        self._runners = dict(runners) if runners is not None else _default_runners()
        self._default_threads = default_threads
        self._on_latency = on_latency
        self._callback_failures = 0
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def install(
        self,
        name: str,
        version: str,
        variant_id: str,
        path: Path | str,
        format: str,
        threads: int = 0,
        *,
        allowed_providers: Sequence[str] | None = None,
    ) -> ServedModel:
        """Load, warm up and serve a model version under name, replacing the one served before.

        The new version runs once on zeros of its declared input shapes (dynamic axes set to 1)
        before it replaces the old one in a single step. Calls already running on the old version
        finish on it, and the old version is closed when the last of them returns. threads=0 uses
        the host's default_threads. Returns the installed model's description. Raises
        ModelLoadError, with the runtime's message, when loading or warming up fails, and the old
        version keeps serving. Raises ValueError for an unknown format.
        """
        runner = self._runners.get(format)
        if runner is None:
            raise ValueError(f"unknown model format {format!r}; use one of {sorted(self._runners) or FORMATS}")
        path = Path(path)
        model = runner.load(path, threads=threads or self._default_threads, allowed_providers=allowed_providers)
        try:
            model.run_checked({spec.name: zeros_for(spec) for spec in model.inputs})
        except Exception as error:  # Any runtime failure during warm-up rejects the new version.
            _close(model)
            raise ModelLoadError(f"warm-up of {name} version {version} from {path} failed: {error}") from error

        info = ServedModel(
            name=name,
            version=version,
            variant_id=variant_id,
            format=format,
            path=path,
            runtime=model.runtime,
            providers=model.providers,
            requested_providers=model.requested_providers,
            fallback_reason=model.fallback_reason,
            threads=model.threads,
            inputs=model.inputs,
            outputs=model.outputs,
        )
        entry = _Entry(model, info)
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = entry
            close_old = old is not None and self._retire(old)
        if old is not None:
            logger.info(
                "model %s: version %s (variant %s) replaced version %s",
                name,
                version,
                variant_id,
                old.info.version,
            )
            if close_old:
                old.model.close()
        else:
            logger.info("model %s: serving version %s (variant %s) on %s", name, version, variant_id, model.providers)
        # Loading frees large temporary buffers too (the parsed file, graph optimisation), so trim after every install.
        release_freed_memory()
        return info

    @staticmethod
    def _retire(entry: _Entry) -> bool:
        """Mark entry retired under the host's lock; return whether the caller must close it now."""
        entry.retired = True
        return entry.in_flight == 0

    def remove(self, name: str) -> ServedModel:
        """Stop serving name; running calls finish first. Returns the removed model's description.

        Raises ModelNotFoundError when name is not installed.
        """
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise ModelNotFoundError(f"model {name!r} is not installed; installed: {sorted(self._entries)}")
            close_now = self._retire(entry)
        if close_now:
            _close(entry.model)
        logger.info("model %s: removed version %s", name, entry.info.version)
        return entry.info

    def get(self, name: str) -> ServedModel | None:
        """Return the description of the model served under name, or None."""
        with self._lock:
            entry = self._entries.get(name)
        return entry.info if entry is not None else None

    def list(self) -> tuple[ServedModel, ...]:
        """Return the served models, sorted by name."""
        with self._lock:
            return tuple(self._entries[name].info for name in sorted(self._entries))

    def infer(self, name: str, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
        """Run the model served under name on feeds and return its outputs with the latency.

        Raises ModelNotFoundError for an unknown name, InvalidInputError for feeds that do not
        match the model's inputs, and the runtime's exception when the run fails. on_latency gets
        every call of an installed model, with ok False for rejected inputs and failed runs, and
        a latency of None for rejected inputs. Raises
        TypeError when feeds is not a mapping, such as a bare array.
        """
        if not isinstance(feeds, Mapping):
            raise TypeError(
                f"feeds must map each input name to an array, got {type(feeds).__name__}; "
                "pass {name: array}, with the names in ModelHost.get(name).inputs"
            )
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFoundError(f"model {name!r} is not installed; installed: {sorted(self._entries)}")
            entry.in_flight += 1
        return self._run(name, entry, feeds, checked=False)

    def prepare(self, name: str, feeds: Mapping[str, np.ndarray]) -> PreparedInference | None:
        """Check feeds once for the model served under name, for repeated calls on the same arrays.

        Returns None when the feeds need a conversion (a copy would not see later writes to the
        arrays). Raises ModelNotFoundError and InvalidInputError as infer does, without counting a call.
        """
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} is not installed; installed: {sorted(self._entries)}")
        checked = check_feeds(entry.model.inputs, feeds)
        if any(checked[key] is not value for key, value in feeds.items()):
            return None
        return PreparedInference(name, entry, checked)

    def infer_prepared(self, prepared: PreparedInference) -> InferenceResult | None:
        """Run a prepared call on the current contents of its arrays, as infer would.

        Returns None, running nothing, when another version replaced the model since prepare.
        """
        with self._lock:
            entry = self._entries.get(prepared.name)
            if entry is not prepared.entry:
                return None
            entry.in_flight += 1
        return self._run(prepared.name, entry, prepared.feeds, checked=True)

    def _run(self, name: str, entry: _Entry, feeds: Mapping[str, np.ndarray], *, checked: bool) -> InferenceResult:
        """Run entry's model for a call that already counts in entry.in_flight, and release it."""
        ok = False
        ran = False
        latency_ms = 0.0
        try:
            start = time.perf_counter_ns()
            try:
                if checked:
                    run_feeds = cast(dict[str, np.ndarray], feeds)
                else:
                    # Inputs the model rejects count as failed calls: after a rollout moves a device to a variant
                    # with other input names or shapes, its error rate is what shows that applications broke.
                    run_feeds = check_feeds(entry.model.inputs, feeds)
                    start = time.perf_counter_ns()
                ran = True
                outputs = entry.model.run_checked(run_feeds)
                ok = True
            finally:
                latency_ms = (time.perf_counter_ns() - start) / 1e6
                if self._on_latency is not None:
                    self._report(name, entry.info.variant_id, latency_ms if ran else None, ok)
        finally:
            with self._lock:
                entry.in_flight -= 1
                close_now = entry.retired and entry.in_flight == 0
            if close_now:
                _close(entry.model)
        return InferenceResult(
            outputs=outputs,
            latency_ms=latency_ms,
            model_name=name,
            model_version=entry.info.version,
            variant_id=entry.info.variant_id,
        )

    def _report(self, name: str, variant_id: str, latency_ms: float | None, ok: bool) -> None:
        assert self._on_latency is not None
        try:
            self._on_latency(name, variant_id, latency_ms, ok)
        except Exception:  # A metrics failure must not fail the inference.
            self._callback_failures += 1
            # Log the first failure and then every 1000th, to keep a broken callback from flooding the log.
            if self._callback_failures % 1000 == 1:
                logger.exception("on_latency callback failed for model %s (%d failures)", name, self._callback_failures)

    def close(self) -> None:
        """Remove every model; each is closed once its running calls finish."""
        with self._lock:
            names = sorted(self._entries)
        for name in names:
            try:
                self.remove(name)
            except ModelNotFoundError:
                continue

    def __enter__(self) -> ModelHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries
