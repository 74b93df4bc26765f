"""Bring the models served on the device in line with the desired state from the orchestrator."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from edgefleet.agent.delivery import (
    DeliveryError,
    DiskFullError,
    DownloadCancelledError,
    Downloader,
    DownloadInterruptedError,
    ModelStore,
)
from edgefleet.agent.runtime.base import ModelLoadError
from edgefleet.agent.runtime.host import ModelHost, ServedModel
from edgefleet.agent.verify import ArtifactVerifier, VerificationError, key_set_ids
from edgefleet.common.serde import MODEL_STATE_NAMES, format_from_proto, name_to_enum
from edgefleet.v1 import agent_pb2

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.json"
# The runtime that executes each model format.
FORMAT_RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert"}
# Memory a loaded model needs, estimated as a multiple of its file size plus a fixed runtime cost.
# NOTE: a rough estimate (weights, one copy for optimised kernels, arena); measured peak memory is
# not yet reported per model. EfficientNet-Lite0 (18.7 MB) adds 52 to 65 MiB USS
# (bench/bench_agent_memory.py).
MEMORY_PER_FILE_BYTE = 3
MEMORY_FIXED_BYTES = 16 * 1024 * 1024

ReportCallback = Callable[[agent_pb2.ReportedState], None]
# Called with the variant id, file and format of a model that started serving after a download.
ServingCallback = Callable[[str, Path, str], None]


@dataclass
class Reconciler:
    """Applies DesiredState messages one at a time; reports every state change through report()."""

    host: ModelHost
    store: ModelStore
    downloader: Downloader
    state_dir: Path
    allowed_runtimes: tuple[str, ...]
    default_threads: int
    # Memory the loaded models may use (the profile's memory_mib, "for inference"), or None for no check.
    memory_budget_bytes: int | None
    report: ReportCallback
    # Memory the whole process may use (its cgroup's limit), or None: the agent's own memory counts here.
    memory_limit_bytes: int | None = None
    # Memory the agent takes with no model loaded (its RSS at start), counted against memory_limit_bytes.
    process_bytes: int = 0
    generation: int = 0
    # Queues the on-device benchmark of a newly installed variant; it must return at once, because
    # the benchmark runs off the inference and reconcile paths.
    on_serving: ServingCallback | None = None
    # Maximum intra-op threads a model may run, such as the number of CPUs the agent is pinned to, or None for no
    # cap. An assignment planned for other hardware, from before a restart with a smaller profile, may request more.
    max_threads: int | None = None
    # Checks each assignment's signature and counter before anything is fetched; None installs
    # unsigned assignments (tools and tests without an orchestrator).
    verifier: ArtifactVerifier | None = None
    statuses: dict[str, agent_pb2.ModelStatus] = field(default_factory=dict)
    # The assignment each served model runs, saved with the desired state. When a restart meets a
    # desired variant that fails to load, the agent serves this one again, as it did before the restart.
    serving: dict[str, agent_pb2.ModelAssignment] = field(default_factory=dict)
    # The assignment each model served before the one in serving, whose file the model store keeps as its
    # previous version, saved with the desired state. _serve_again() loads it when neither the desired nor
    # the serving assignment loads, such as when the current file fails its SHA-256 check at start-up.
    previous_serving: dict[str, agent_pb2.ModelAssignment] = field(default_factory=dict)
    # Names of models whose download failed in a way that may succeed later (disk full, orchestrator unreachable).
    # retry_pending() tries them again, which the agent calls after a delay while it stays connected. The
    # agent also claims no generation when it connects, so the orchestrator sends the desired state again.
    retry_later: set[str] = field(default_factory=set)
    # The last desired state applied, which retry_pending() takes the assignments from.
    _desired: agent_pb2.DesiredState | None = None
    # Free bytes of the model store when a model's download failed on a full disk. retry_pending() skips
    # the model until more is free, so a disk that stays full costs no download attempts.
    _free_at_disk_full: dict[str, int] = field(default_factory=dict)
    # Models in retry_later whose last download failed as the ones before it did. The Downloader logs
    # their attempts at debug level, and so does retry_pending() for their retries.
    _failing_again: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_progress: dict[str, float] = field(default_factory=dict)
    # How many desired states supersede() has seen, and which of them apply() works on. A higher count
    # means a newer desired state waits, so applying the older one stops. _guard protects these two, the
    # download in progress as (model name, digest) and the event that stops it.
    _received: int = 0
    _applying: int = 0
    _stopped: bool = False
    _downloading: tuple[str, str] | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def reported_state(self) -> agent_pb2.ReportedState:
        """Return the status of each desired model, then the variant that still serves it when that differs.

        While a new variant downloads or loads, and after it failed, the host keeps serving the previous
        one. Reporting that one too lets the orchestrator reject deleting a version that still serves.
        The desired model's status comes first, so readers that take the first status of a model see it.
        """
        models: list[agent_pb2.ModelStatus] = []
        for name in sorted(self.statuses):
            status = self.statuses[name]
            models.append(status)
            still_served = self._still_served_status(name, status)
            if still_served is not None:
                models.append(still_served)
        report = agent_pb2.ReportedState(desired_generation=self.generation, models=models)
        trusted_keys = self.verifier.trusted_keys_report() if self.verifier is not None else None
        if trusted_keys is not None:
            report.trusted_keys.CopyFrom(trusted_keys)
        return report

    def hello_generation(self) -> int:
        """Return the generation to claim when a control stream opens, which is 0 while a download waits for a retry."""
        return 0 if self.retry_later else self.generation

    def _still_served_status(self, name: str, status: agent_pb2.ModelStatus) -> agent_pb2.ModelStatus | None:
        """Return a serving status for the variant the host serves under name, or None when status describes it."""
        served = self.host.get(name)
        if served is None or served.variant_id == status.variant_id:
            return None
        assignment = self.serving.get(name)
        if assignment is not None and assignment.variant_id == served.variant_id:
            digest, size_bytes = assignment.digest, assignment.size_bytes
        else:
            installed = self.store.current(name)
            digest = installed.digest if installed is not None else ""
            size_bytes = served.path.stat().st_size if served.path.exists() else 0
        still_served = agent_pb2.ModelStatus(
            model_name=name,
            model_version=served.version,
            variant_id=served.variant_id,
            digest=digest,
            state=name_to_enum("serving", MODEL_STATE_NAMES),
            runtime=served.runtime,
            providers=list(served.providers),
            threads=served.threads,
            bytes_downloaded=size_bytes,
            size_bytes=size_bytes,
        )
        still_served.updated_at.CopyFrom(status.updated_at)
        return still_served

    def _set(self, assignment: agent_pb2.ModelAssignment, state: str, **fields: object) -> None:
        status = agent_pb2.ModelStatus(
            model_name=assignment.model_name,
            model_version=assignment.model_version,
            variant_id=assignment.variant_id,
            digest=assignment.digest,
            state=name_to_enum(state, MODEL_STATE_NAMES),
            size_bytes=assignment.size_bytes,
            **fields,  # type: ignore[arg-type]
        )
        status.updated_at.GetCurrentTime()
        self.statuses[assignment.model_name] = status
        self.report(self.reported_state())

    def _set_serving(self, assignment: agent_pb2.ModelAssignment, served: ServedModel) -> None:
        self._set(
            assignment,
            "serving",
            runtime=served.runtime,
            providers=list(served.providers),
            threads=served.threads,
            bytes_downloaded=assignment.size_bytes,
        )

    def restore(self) -> None:
        """Serve the last applied desired state from local files, before any orchestrator is reachable."""
        path = self.state_dir / DESIRED_FILE
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            desired = agent_pb2.DesiredState()
            desired.ParseFromString(bytes.fromhex(data["desired_state"]))
            # Both are absent in files of older agents.
            serving = _decode_assignments(data.get("serving", {}))
            previous_serving = _decode_assignments(data.get("previous_serving", {}))
        except (OSError, ValueError, KeyError, AttributeError, DecodeError) as error:
            log.warning("ignoring unreadable %s (%s); waiting for the orchestrator's desired state", path, error)
            return
        self.serving = serving
        self.previous_serving = previous_serving
        log.info(
            "restoring %d models of desired generation %d from local files",
            len(desired.models),
            desired.generation,
        )
        self.apply(self._verified_for_restore(desired), offline=True)

    def _verified_for_restore(self, desired: agent_pb2.DesiredState) -> agent_pb2.DesiredState:
        """Return desired with each assignment that fails verification replaced by the one served before it.

        A saved desired state may hold an assignment that this device rejected, for example one signed by
        a key it never learned. The model it served instead must serve again after a restart.
        """
        if self.verifier is None:
            return desired
        restored = agent_pb2.DesiredState()
        restored.CopyFrom(desired)
        for assignment in restored.models:
            previous = self.serving.get(assignment.model_name)
            if previous is None or previous == assignment:
                continue
            try:
                self.verifier.check(assignment)
            except VerificationError as error:
                log.warning(
                    "restoring model=%s variant=%s, which served before, because the saved assignment of %s fails "
                    "verification: %s",
                    assignment.model_name,
                    previous.variant_id,
                    assignment.variant_id,
                    error,
                )
                assignment.CopyFrom(previous)
        return restored

    def supersede(self, desired: agent_pb2.DesiredState) -> int:
        """Record that desired arrived, and stop the download in progress; return the ticket for apply().

        The agent calls this as soon as a desired state arrives, while an earlier one may still be
        applied. So a version that a rollback or a new deploy replaced stops downloading, and never
        serves, instead of finishing its download first. A download that desired still has stops too,
        so that the changes the device can make from its own files come first (see _in_apply_order).
        It resumes from its verified part when applying desired reaches it.
        """
        with self._guard:
            self._received += 1
            ticket = self._received
            if self._downloading is None:
                return ticket
            name, digest = self._downloading
            if any(a.model_name == name and a.digest == digest for a in desired.models):
                log.info(
                    "pausing the download of model=%s %s to apply desired generation %d; it resumes after the "
                    "changes that need no download",
                    name,
                    digest,
                    desired.generation,
                )
            else:
                log.info(
                    "stopping the download of model=%s %s: desired generation %d no longer has it",
                    name,
                    digest,
                    desired.generation,
                )
            self._cancel.set()
            return ticket

    def stop(self) -> None:
        """Stop the download in progress and any applying, for the agent's shutdown.

        The verified part of the download stays for a resume after the restart.
        """
        with self._guard:
            self._stopped = True
            self._received += 1
            self._cancel.set()

    def _superseded(self) -> bool:
        """Return whether a newer desired state than the one applied last has arrived."""
        with self._guard:
            return self._received > self._applying

    def apply(self, desired: agent_pb2.DesiredState, *, offline: bool = False, ticket: int | None = None) -> None:
        """Install, swap or remove models until the host serves exactly the desired ones.

        ticket is what supersede() returned for desired. When supersede() has seen a newer desired
        state since, applying stops early and leaves the rest to the newer one.
        """
        with self._lock:
            with self._guard:
                if self._stopped:
                    return
                self._applying = self._received if ticket is None else ticket
                overtaken = self._received > self._applying
            if overtaken:
                # Applying it would only unload models that the newer state may have again.
                log.info("skipped desired generation %d: a newer one arrived before it was applied", desired.generation)
                return
            desired_names = {a.model_name for a in desired.models}
            for name in [m.name for m in self.host.list() if m.name not in desired_names]:
                self.host.remove(name)
                log.info("removed model=%s: no longer in the desired state", name)
                self.statuses.pop(name, None)
            for name in [n for n in self.serving if n not in desired_names]:
                self.serving.pop(name)
            for name in [n for n in self.previous_serving if n not in desired_names]:
                self.previous_serving.pop(name)
            for name in [n for n in self.statuses if n not in desired_names]:
                self.statuses.pop(name)
            self.retry_later &= desired_names
            self._failing_again &= desired_names
            # Reports sent while the models are applied already report on this generation.
            self.generation = desired.generation
            self._desired = desired
            for assignment in self._in_apply_order(desired.models):
                if self._superseded():
                    log.info("left desired generation %d for a newer one", desired.generation)
                    return
                self._apply_one(assignment, offline=offline)
            if offline and any(self._needs_fetch(a) for a in desired.models):
                # A model is missing on disk: claim no generation, so the orchestrator sends the desired
                # state again on connect and the missing model is downloaded.
                self.generation = 0
            if not offline:
                self._save(desired)
                # Parts of downloads that a newer desired state replaced would hold disk space that the
                # orchestrator counts as used when it checks whether the next variant fits.
                self._discard_partials(a.digest for a in desired.models)
            self.report(self.reported_state())

    def _in_apply_order(self, assignments: Iterable[agent_pb2.ModelAssignment]) -> list[agent_pb2.ModelAssignment]:
        """Return the assignments that need no download first, then the downloads from the smallest.

        So a large download of one model delays no change to another model that the device can make
        from its own files, such as a rollback to the version it kept.
        """

        def needs_download(assignment: agent_pb2.ModelAssignment) -> bool:
            served = self.host.get(assignment.model_name)
            if served is not None and served.variant_id == assignment.variant_id:
                return False
            return not self._on_disk(assignment)

        return sorted(assignments, key=lambda a: (needs_download(a), a.size_bytes))

    def _needs_fetch(self, assignment: agent_pb2.ModelAssignment) -> bool:
        """Return whether nothing serves the assignment's model or its file is not on disk."""
        return self.host.get(assignment.model_name) is None or not self._on_disk(assignment)

    def _on_disk(self, assignment: agent_pb2.ModelAssignment) -> bool:
        """Return whether the model store has the assignment's file, without checking its SHA-256."""
        try:
            return self.store.find(assignment.model_name, assignment.digest) is not None
        except ValueError:  # A malformed name or digest, which _apply_one reports as failed.
            return False

    def _discard_partials(self, desired_digests: Iterable[str]) -> None:
        try:
            self.store.discard_partials_except(desired_digests)
        except (OSError, ValueError) as error:
            log.warning("cannot remove partial downloads outside the desired state: %s", error)

    def update_keys(self, desired: agent_pb2.DesiredState) -> None:
        """Adopt the signing key set that desired carries, if it is newer; log a set that fails verification.

        The agent calls this once per desired state, when it arrives; apply() does not adopt keys.
        """
        if self.verifier is None or not desired.HasField("trusted_keys"):
            return
        try:
            self.verifier.update_keys(desired.trusted_keys)
        except VerificationError as error:
            log.error(
                "ignoring the signing key set %s of desired generation %d: %s",
                key_set_ids(desired.trusted_keys),
                desired.generation,
                error,
            )

    def retry_pending(self) -> None:
        """Apply again the assignments of the last desired state whose download may succeed now.

        A download given up while the control stream stayed open, or a disk that had no space, would
        otherwise wait for the next reconnect, which may never come.
        """
        with self._lock:
            if self._desired is None or not self.retry_later or self._superseded():
                return
            free = self._store_free()
            pending = [
                a
                for a in self._desired.models
                if a.model_name in self.retry_later and free > self._free_at_disk_full.get(a.model_name, -1)
            ]
            if not pending:
                return
            repeated = all(a.model_name in self._failing_again for a in pending)
            log.log(
                logging.DEBUG if repeated else logging.INFO,
                "retrying the download of %s",
                ", ".join(f"model={a.model_name}" for a in pending),
            )
            for assignment in pending:
                self._apply_one(assignment, offline=False)
            self.report(self.reported_state())

    def _store_free(self) -> int:
        """Return the free bytes of the model store's file system, or 0 when they cannot be read."""
        try:
            return shutil.disk_usage(self.store.root).free
        except OSError:
            return 0

    def _apply_one(self, assignment: agent_pb2.ModelAssignment, *, offline: bool) -> None:
        name = assignment.model_name
        if not offline:
            self.retry_later.discard(name)
            self._free_at_disk_full.pop(name, None)
            self._failing_again.discard(name)
        served = self.host.get(name)
        if (
            served is not None
            and served.variant_id == assignment.variant_id
            and self._serving_digest(name) == assignment.digest
            and self._requested_threads(self.serving.get(name)) == self._requested_threads(assignment)
        ):
            if self.verifier is not None:
                # Nothing changes on the device, but a valid newer counter raises the rollback floor.
                try:
                    self.verifier.check(assignment)
                    self.verifier.accept(assignment)
                except VerificationError as error:
                    # The model keeps serving, but the report must not claim that this generation
                    # applied: a device that verifies nothing would otherwise pass every deploy --wait.
                    log.error("model=%s keeps serving; the repeated assignment failed verification: %s", name, error)
                    self._set(
                        assignment,
                        "failed",
                        error=f"{error} (the model keeps serving from the assignment verified before)",
                    )
                    return
            self.serving[name] = assignment
            status = self.statuses.get(name)
            serving_state = name_to_enum("serving", MODEL_STATE_NAMES)
            if status is None or status.state != serving_state or status.digest != assignment.digest:
                # The status may still report an earlier assignment that failed while this one kept serving.
                self._set_serving(assignment, served)
            return
        if self.verifier is not None:
            try:
                self.verifier.check(assignment)
            except VerificationError as error:
                log.error("model=%s variant=%s rejected: %s", name, assignment.variant_id, error)
                self._set(assignment, "failed", error=str(error))
                return
        try:
            model_format = format_from_proto(assignment.format)
        except ValueError as error:
            self._set(assignment, "failed", error=str(error))
            return
        runtime = FORMAT_RUNTIMES[model_format]
        if runtime not in self.allowed_runtimes:
            self._set(
                assignment,
                "failed",
                error=f"{model_format} models need {runtime}, which this device does not run "
                f"(runtimes: {', '.join(self.allowed_runtimes) or 'none'})",
            )
            return
        over_budget = self._over_memory_budget(assignment)
        if over_budget:
            self._set(assignment, "failed", error=over_budget)
            return

        previous = self.store.current(name)
        try:
            if offline:
                on_disk = self.store.find(name, assignment.digest) is not None
                installed = self.store.find_verified(name, assignment.digest)
                if installed is None:
                    self._serve_previous_offline(assignment, on_disk=on_disk)
                    return
            else:
                with self._guard:
                    if self._received > self._applying:
                        return  # A newer desired state arrived: apply() stops at the next model.
                    self._downloading = (name, assignment.digest)
                    self._cancel.clear()
                self._set(assignment, "downloading", bytes_downloaded=0)
                try:
                    installed = self.downloader.install(
                        name,
                        assignment.digest,
                        model_format,
                        expected_size=assignment.size_bytes,
                        progress=lambda done, total: self._progress(assignment, done, total),
                        cancel=self._cancel,
                    )
                finally:
                    with self._guard:
                        self._downloading = None
                self._set(assignment, "verifying", bytes_downloaded=assignment.size_bytes)
            self._set(assignment, "loading")
            threads = self._install_threads(assignment)
            served = self.host.install(
                name, assignment.model_version, assignment.variant_id, installed.path, model_format, threads
            )
        except DownloadCancelledError:
            # The verified part stays on disk. The newer desired state sets this model's status next.
            log.info(
                "model=%s variant=%s download stopped: a newer desired state arrived, or the agent stops",
                name,
                assignment.variant_id,
            )
            return
        except (DeliveryError, ModelLoadError, OSError, ValueError) as error:
            repeated = isinstance(error, DownloadInterruptedError) and error.repeated
            level = logging.DEBUG if repeated else logging.ERROR
            log.log(level, "model=%s variant=%s failed: %s", name, assignment.variant_id, error)
            if isinstance(error, DeliveryError) and error.retryable:
                self.retry_later.add(name)
                if repeated:
                    self._failing_again.add(name)
            if isinstance(error, DiskFullError):
                self._free_at_disk_full[name] = self._store_free()
            if previous is not None and previous.digest != assignment.digest:
                # Keep the version on disk that the host still serves.
                self.store.activate(name, previous.digest)
            message = str(error)
            still_served = self.host.get(name) or self._serve_again(name, assignment)
            if still_served is not None:
                message += f"; version {still_served.version} (variant {still_served.variant_id}) keeps serving"
            self._set(assignment, "failed", error=message)
            return
        replaced = self.serving.get(name)
        if replaced is not None and replaced.digest != assignment.digest:
            self.previous_serving[name] = replaced
        self.serving[name] = assignment
        if self.verifier is not None:
            self.verifier.accept(assignment)
        self._set_serving(assignment, served)
        log.info(
            "model=%s variant=%s serving on %s providers=%s threads=%d",
            name,
            assignment.variant_id,
            served.runtime,
            ",".join(served.providers),
            served.threads,
        )
        if not offline and self.on_serving is not None:
            self.on_serving(assignment.variant_id, installed.path, model_format)

    def _over_memory_budget(self, assignment: agent_pb2.ModelAssignment) -> str:
        """Return why loading assignment would exceed the memory budget or limit, or "" when it fits.

        A swap loads and warms up the new version while the old one still serves, so the version
        served under the same name counts until the swap ends, as do the other models. The models
        must fit memory_budget_bytes; with the agent's own memory (process_bytes) they must fit
        memory_limit_bytes, which the kernel enforces with the out-of-memory killer.
        """
        needed = assignment.size_bytes * MEMORY_PER_FILE_BYTE + MEMORY_FIXED_BYTES
        served = {m.name: m for m in self.host.list() if m.path.exists()}
        models = sum(m.path.stat().st_size * MEMORY_PER_FILE_BYTE + MEMORY_FIXED_BYTES for m in served.values())
        replaced = served.get(assignment.model_name)
        swap = ""
        if replaced is not None:
            swap = f", including version {replaced.version}, which stays loaded until the new version replaces it"
        fix = "remove a model from this device or deploy a smaller variant (edgefleet models compress --int8)"
        if self.memory_budget_bytes is not None and models + needed > self.memory_budget_bytes:
            return (
                f"model needs about {needed >> 20} MiB, loaded models use {models >> 20} MiB{swap}, and the "
                f"profile's memory budget for models is {self.memory_budget_bytes >> 20} MiB; {fix}"
            )
        in_use = self.process_bytes + models
        if self.memory_limit_bytes is not None and in_use + needed > self.memory_limit_bytes:
            return (
                f"model needs about {needed >> 20} MiB, {in_use >> 20} MiB are in use (the agent itself "
                f"{self.process_bytes >> 20} MiB, loaded models {models >> 20} MiB{swap}) and the cgroup memory "
                f"limit is {self.memory_limit_bytes >> 20} MiB; {fix}, or raise the limit (MemoryMax)"
            )
        return ""

    def _serve_previous_offline(self, assignment: agent_pb2.ModelAssignment, *, on_disk: bool) -> None:
        """Serve a former version from disk when the desired one's file is missing or corrupt at start-up.

        restore() runs before the agent connects, so the file cannot be downloaded yet. The desired variant
        is reported as failed with the reason. apply() then claims no generation, so the orchestrator sends
        the desired state again on connect and the file is downloaded.
        """
        name = assignment.model_name
        if on_disk:
            reason = "its model file failed its SHA-256 check or cannot be read"
        else:
            reason = "its model file is not on disk"
        log.warning(
            "model=%s variant=%s cannot load from local files: %s; it is downloaded once the orchestrator is reachable",
            name,
            assignment.variant_id,
            reason,
        )
        served = self._serve_again(name, assignment)
        if served is None:
            return
        self._set(
            assignment,
            "failed",
            error=f"{reason}; version {served.version} (variant {served.variant_id}) keeps serving until the file "
            "is downloaded again from the orchestrator",
        )

    def _serve_again(self, name: str, failed: agent_pb2.ModelAssignment) -> ServedModel | None:
        """Serve the assignment that ran before, or else the one that served before it, when failed cannot serve.

        Return the model that serves, or None. After a restart the host serves nothing yet, so without
        this a model whose new variant fails to load, or whose file is corrupt, would stop serving,
        although a former version is still on disk.
        """
        for assignment in (self.serving.get(name), self.previous_serving.get(name)):
            if assignment is None or assignment.digest == failed.digest:
                continue
            served = self._serve_from_disk(assignment, failed)
            if served is not None:
                self.serving[name] = assignment
                return served
        return None

    def _serve_from_disk(
        self, assignment: agent_pb2.ModelAssignment, failed: agent_pb2.ModelAssignment
    ) -> ServedModel | None:
        """Load an installed assignment after its file passes the SHA-256 check; return it, or None on failure."""
        name = assignment.model_name
        if self.store.find(name, assignment.digest) is None:
            log.warning("model=%s: variant %s, which served before, is no longer on disk", name, assignment.variant_id)
            return None
        installed = self.store.find_verified(name, assignment.digest)
        if installed is None:
            log.warning(
                "model=%s: variant %s, which served before, failed its SHA-256 check", name, assignment.variant_id
            )
            return None
        try:
            served = self.host.install(
                name,
                assignment.model_version,
                assignment.variant_id,
                installed.path,
                format_from_proto(assignment.format),
                self._install_threads(assignment),
            )
        except (ModelLoadError, OSError, ValueError) as error:
            log.error(
                "model=%s: variant %s, which served before, failed as well: %s", name, assignment.variant_id, error
            )
            return None
        self.store.activate(name, assignment.digest)
        log.warning(
            "model=%s serves variant %s again from local files, because variant %s failed",
            name,
            assignment.variant_id,
            failed.variant_id,
        )
        return served

    def _install_threads(self, assignment: agent_pb2.ModelAssignment) -> int:
        """Return the threads to load an assignment with: its request, 0 meaning the default, capped at max_threads."""
        threads = assignment.threads or self.default_threads
        if self.max_threads is not None and threads > self.max_threads:
            log.warning(
                "model=%s variant=%s requests %d threads, more than the %d this device allows, so it loads with %d",
                assignment.model_name,
                assignment.variant_id,
                threads,
                self.max_threads,
                self.max_threads,
            )
            return self.max_threads
        return threads

    def _requested_threads(self, assignment: agent_pb2.ModelAssignment | None) -> int:
        """Return the requested thread count of an assignment with 0 resolved to the default, or -1 for None."""
        if assignment is None:
            return -1
        return assignment.threads or self.default_threads

    def _serving_digest(self, name: str) -> str:
        current = self.store.current(name)
        return current.digest if current is not None else ""

    def _progress(self, assignment: agent_pb2.ModelAssignment, done: int, total: int) -> None:
        # Report at most twice a second so a fast download does not flood the control stream.
        now = time.monotonic()
        if now - self._last_progress.get(assignment.model_name, 0.0) < 0.5 and done < total:
            return
        self._last_progress[assignment.model_name] = now
        self._set(assignment, "downloading", bytes_downloaded=done)

    def _save(self, desired: agent_pb2.DesiredState) -> None:
        """Write the desired state for restore(); log a failure, such as a full disk, instead of raising.

        The models already serve, so a failed write must not stop the agent. The previous file stays
        in place, and after a restart the orchestrator sends the current desired state again.
        """
        path = self.state_dir / DESIRED_FILE
        temp = path.with_suffix(".tmp")
        try:
            with temp.open("w") as handle:
                json.dump(
                    {
                        "generation": desired.generation,
                        "desired_state": desired.SerializeToString().hex(),
                        "serving": _encode_assignments(self.serving),
                        "previous_serving": _encode_assignments(self.previous_serving),
                    },
                    handle,
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            log.error(
                "cannot save desired generation %d to %s: %s; the models keep serving, but a restart before the "
                "next successful save restores the generation saved before; free space in %s",
                desired.generation,
                path,
                error,
                self.state_dir,
            )


def _encode_assignments(assignments: dict[str, agent_pb2.ModelAssignment]) -> dict[str, str]:
    """Return the assignments by model name as hex-encoded protobuf, for the desired-state file."""
    return {name: assignment.SerializeToString().hex() for name, assignment in sorted(assignments.items())}


def _decode_assignments(encoded: dict[str, str]) -> dict[str, agent_pb2.ModelAssignment]:
    """Return the assignments that _encode_assignments wrote; raises ValueError or DecodeError on bad data."""
    return {name: agent_pb2.ModelAssignment.FromString(bytes.fromhex(text)) for name, text in encoded.items()}
