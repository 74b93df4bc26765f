"""The storage interface of the orchestrator. Every backend passes the same test suite."""

from __future__ import annotations

import abc
from collections.abc import Collection, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from edgefleet.common.hardware import HardwareProfile
from edgefleet.orchestrator.domain import (
    Assignment,
    Device,
    IdentityConflict,
    MetricWindow,
    ModelStatus,
    ModelVersion,
    Variant,
)


@dataclass
class FleetStates:
    """Per-device desired and reported state of the whole fleet, keyed by device id."""

    desired: dict[str, list[Assignment]] = field(default_factory=dict)
    reported: dict[str, list[ModelStatus]] = field(default_factory=dict)
    conflicts: dict[str, list[IdentityConflict]] = field(default_factory=dict)


class StoreError(Exception):
    """Base class of the errors a store raises on invalid requests."""


class NotFoundError(StoreError):
    pass


class AlreadyExistsError(StoreError):
    pass


class IdentityMismatchError(StoreError):
    """A registration presented a known device id with another instance key."""


class DeleteBlockedError(StoreError):
    """A deletion was rejected because devices, rollouts or compression jobs still use what it would delete."""


@dataclass(frozen=True)
class RemovedDevice:
    """A device an operator removed from the fleet, kept so that its agent cannot register again unnoticed."""

    device_id: str
    instance_key_hash: str
    removed_at: datetime
    desired_generation: int = 0


class DeviceRemovedError(StoreError):
    """A registration found its device id removed by a removal that its caller did not readmit."""

    def __init__(self, removed: RemovedDevice) -> None:
        super().__init__(f"device {removed.device_id!r} was removed at {removed.removed_at.isoformat()}")
        self.removed = removed


@dataclass(frozen=True)
class DeviceRemoval:
    """The result of Store.remove_device."""

    removed: RemovedDevice
    # Active rollouts that included the device; only a forced removal leaves any.
    rollout_ids: tuple[str, ...]


@dataclass(frozen=True)
class DeletedModel:
    """The result of Store.delete_model."""

    variant_ids: tuple[str, ...]
    # Digests of the deleted rows that no remaining model version or variant references, so their
    # artifact files can be removed.
    unreferenced_digests: tuple[str, ...]


class Store(abc.ABC):
    """Durable fleet state. Methods are synchronous and thread-safe; each one is one transaction."""

    # Devices

    @abc.abstractmethod
    def register_device(
        self,
        *,
        device_id: str,
        instance_key_hash: str,
        hardware: HardwareProfile,
        labels: Mapping[str, str],
        agent_version: str,
        peer: str,
        now: datetime,
        readmitted_removal: datetime | None = None,
    ) -> Device:
        """Insert or update a device and append its hardware profile to the history when it changed.

        readmitted_removal is the removed_at of the RemovedDevice record that the caller checked and
        readmitted, or None when the caller found the id not removed. The store checks the record again
        in the registering transaction, after it locks the device row, so a removal that commits
        while the registration is in flight cannot be undone by it.

        Raises IdentityMismatchError, after recording an IdentityConflict, when device_id is known
        with another instance_key_hash; the stored device is then left unchanged. Raises
        DeviceRemovedError, storing nothing, when device_id is recorded as removed at another time
        than readmitted_removal.
        """

    @abc.abstractmethod
    def get_device(self, device_id: str) -> Device | None: ...

    @abc.abstractmethod
    def list_devices(self) -> list[Device]: ...

    @abc.abstractmethod
    def hardware_history(self, device_id: str) -> list[tuple[datetime, HardwareProfile]]:
        """Return the recorded hardware profiles of a device, oldest first."""

    @abc.abstractmethod
    def list_identity_conflicts(self, device_id: str | None = None) -> list[IdentityConflict]: ...

    @abc.abstractmethod
    def record_identity_conflict(self, conflict: IdentityConflict) -> None:
        """Store a conflict found after registration; raise NotFoundError for an unknown device."""

    @abc.abstractmethod
    def touch_devices(self, last_seen: Mapping[str, datetime]) -> frozenset[str]:
        """Set last_seen for many devices in one transaction and return the ids that are not registered."""

    @abc.abstractmethod
    def set_connected(self, device_id: str, connected: bool, seen: datetime) -> None:
        """Record whether a control stream is open, and advance last_seen to seen if that is later.

        seen is when the device was last heard from: the open of its stream, or its last message
        when the stream closes. An earlier time leaves last_seen as it is. Raises NotFoundError for an
        unknown device.
        """

    @abc.abstractmethod
    def update_disk_free(self, device_id: str, free_bytes: int) -> None:
        """Replace disk_free_bytes in the device's stored hardware, or raise NotFoundError for an unknown device.

        The hardware history gets no row, because the free space is one of the volatile readings.
        """

    @abc.abstractmethod
    def remove_device(self, device_id: str, now: datetime, *, force: bool = False) -> DeviceRemoval:
        """Delete a device with its labels, hardware history, desired and reported state in one transaction.

        Also deletes its enrollment credential, revocation, unused enrollment tokens and rollback orders,
        and records it as a RemovedDevice. Its metric windows and the rollout history stay. Raises
        NotFoundError for an unknown device, and DeleteBlockedError, deleting nothing, when an active
        rollout includes the device, unless force is set.
        """

    @abc.abstractmethod
    def get_removed_device(self, device_id: str) -> RemovedDevice | None:
        """Return the record of a removed device, or None for an id that was never removed or registered again."""

    @abc.abstractmethod
    def removed_device_ids_with_windows(self) -> list[str]:
        """Return the sorted ids of removed devices that still have metric windows stored."""

    # Models and variants

    @abc.abstractmethod
    def add_model_version(self, model: ModelVersion, source_variant: Variant) -> ModelVersion:
        """Store a model version with its source variant.

        Returns the stored version unchanged when name, version and digest already exist. Raises
        AlreadyExistsError when the name and version exist with another digest.
        """

    @abc.abstractmethod
    def get_model_version(self, name: str, version: str | None = None) -> ModelVersion:
        """Return one version, or the newest by creation time when version is None; raise NotFoundError."""

    @abc.abstractmethod
    def list_model_versions(self, name: str | None = None) -> list[ModelVersion]: ...

    @abc.abstractmethod
    def add_variant(self, variant: Variant) -> Variant:
        """Store a variant.

        Raises NotFoundError for an unknown model version and AlreadyExistsError for a known id.
        """

    @abc.abstractmethod
    def get_variant(self, variant_id: str) -> Variant:
        """Return a variant; raise NotFoundError."""

    @abc.abstractmethod
    def list_variants(self, model_name: str, model_version: str | None = None) -> list[Variant]: ...

    @abc.abstractmethod
    def list_tflite_variants_without_min_runtime_version(self) -> list[Variant]:
        """Return the TFLite variants whose stored metadata has no min_runtime_version entry, oldest first.

        Orchestrators before the release that read min_runtime_version stored TFLite variants without the
        entry. Since then every TFLite variant has it, "" for a file without one.
        """

    @abc.abstractmethod
    def set_min_runtime_version(self, variant_id: str, version: str) -> None:
        """Store version as the min_runtime_version of a variant's metadata; raise NotFoundError."""

    @abc.abstractmethod
    def delete_model(self, name: str, version: str, variant_id: str = "") -> DeletedModel:
        """Delete one variant of a model version, or the version with all its variants when variant_id is empty.

        Deletes the rows in one transaction, and the on-device benchmark results of the variants go with
        them. Metric windows and rollout history hold the ids as strings and stay. Raises
        NotFoundError for an unknown version, or a variant_id that is not a variant of it.

        Raises DeleteBlockedError, deleting nothing, in five cases: variant_id is the source variant; a
        device's desired state contains a deleted variant; a device reports serving or loading a deleted
        variant (with the whole version, any variant of it); an active rollout of the version exists, or
        one that would restore a deleted variant on rollback; a queued or running compression job reads
        a deleted variant or would add variants to the deleted version.
        """

    # Desired and reported state

    @abc.abstractmethod
    def set_assignment(self, assignment: Assignment) -> int:
        """Replace the device's assignment for assignment.model_name and return the new generation.

        Raises NotFoundError for an unknown device or variant.
        """

    @abc.abstractmethod
    def remove_assignment(self, device_id: str, model_name: str) -> int:
        """Remove a model from the device's desired state and return the new generation."""

    @abc.abstractmethod
    def get_desired_state(self, device_id: str) -> tuple[int, list[Assignment]]:
        """Return the desired generation and the assignments of a device; raise NotFoundError."""

    @abc.abstractmethod
    def save_reported_state(
        self,
        device_id: str,
        generation: int,
        statuses: Sequence[ModelStatus],
        now: datetime,
        *,
        trusted_keys: tuple[int, Sequence[str]] | None = None,
    ) -> None:
        """Replace the device's reported model states and remember which generation they answer.

        trusted_keys, the key set version and key ids the agent trusts, replaces the stored ones when given.
        """

    @abc.abstractmethod
    def get_reported_state(self, device_id: str) -> list[ModelStatus]: ...

    # Metrics

    @abc.abstractmethod
    def add_metric_batch(self, device_id: str, batch_id: str, windows: Sequence[MetricWindow]) -> bool:
        """Store a batch of metric windows once; return False, storing nothing, for a known batch_id."""

    def query_metric_windows(
        self,
        *,
        device_id: str = "",
        model_name: str = "",
        variant_id: str = "",
        hardware_class: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        received_start: datetime | None = None,
        received_end: datetime | None = None,
        received_device_ids: Collection[str] = (),
    ) -> list[MetricWindow]:
        """Return windows matching every non-empty filter, with window_start in [start, end), by window_start.

        When received_start or received_end is given, a window with received_at in [received_start,
        received_end) matches as well if its device is in received_device_ids or its window_start is
        at or after end. This lets a caller place by receive time the windows of devices with a wrong
        clock and windows that start later than their receipt allows. Windows that were only
        delivered late do not match by receipt, so a recent range does not read every old window that
        an agent uploaded in it.
        """
        return list(
            self.iter_metric_windows(
                device_id=device_id,
                model_name=model_name,
                variant_id=variant_id,
                hardware_class=hardware_class,
                start=start,
                end=end,
                received_start=received_start,
                received_end=received_end,
                received_device_ids=received_device_ids,
            )
        )

    @abc.abstractmethod
    def iter_metric_windows(
        self,
        *,
        device_id: str = "",
        model_name: str = "",
        variant_id: str = "",
        hardware_class: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        received_start: datetime | None = None,
        received_end: datetime | None = None,
        received_device_ids: Collection[str] = (),
    ) -> Generator[MetricWindow, None, None]:
        """Yield what query_metric_windows returns, reading it in batches, so memory does not grow with the range.

        The read transaction stays open until the iterator is exhausted or closed.
        """

    @abc.abstractmethod
    def downsample_metric_windows(self, *, received_before: datetime, bucket_seconds: int) -> tuple[int, int]:
        """Merge the windows received before received_before into one window per bucket.

        A bucket is one device, model version, variant and hardware class, and a bucket_seconds-long
        span of window_start aligned to the Unix epoch. Buckets with one window are left alone. The
        merged window starts at the bucket start, carries the summed counts and the merged sketch,
        and its window_seconds is the summed window_seconds capped at bucket_seconds, so throughput
        (inferences per window second) is kept. Returns (windows removed, windows written).
        """

    @abc.abstractmethod
    def delete_metric_windows(self, *, received_before: datetime) -> int:
        """Delete windows and batch ids received before received_before; return the windows deleted.

        A batch resent after its id was deleted is stored again.
        """

    @abc.abstractmethod
    def reclaim_space(self) -> None:
        """Return the space of deleted rows to the file system where the backend needs a request for it."""

    def fleet_states(self) -> FleetStates:
        """Return the desired assignments, reported states and identity conflicts of every device.

        One call for the whole fleet, so that listing thousands of devices does not cost three
        queries per device. Backends should override this default, which loops over the devices.
        """
        states = FleetStates()
        for device in self.list_devices():
            states.desired[device.device_id] = self.get_desired_state(device.device_id)[1]
            states.reported[device.device_id] = self.get_reported_state(device.device_id)
        for conflict in self.list_identity_conflicts():
            states.conflicts.setdefault(conflict.device_id, []).append(conflict)
        return states

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def ping(self) -> None:
        """Run a trivial query; raise DatabaseUnavailable when the database server cannot be reached.

        A SQLite store also raises it (as DatabaseDiskFull) while its writes fail on a full disk.
        """
