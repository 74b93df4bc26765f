"""The storage interface of the orchestrator. Every backend passes the same test suite."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
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


class StoreError(Exception):
    """Base class of the errors a store raises on invalid requests."""


class NotFoundError(StoreError):
    pass


class AlreadyExistsError(StoreError):
    pass


class IdentityMismatchError(StoreError):
    """A registration presented a known device id with another instance key."""


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
    ) -> Device:
        """Insert or update a device and append its hardware profile to the history when it changed.

        Raises IdentityMismatchError, after recording an IdentityConflict, when device_id is known
        with another instance_key_hash; the stored device is then left unchanged.
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
    def touch_devices(self, last_seen: Mapping[str, datetime]) -> None:
        """Set last_seen for many devices in one transaction; unknown ids are ignored."""

    @abc.abstractmethod
    def set_connected(self, device_id: str, connected: bool, now: datetime) -> None: ...

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
        self, device_id: str, generation: int, statuses: Sequence[ModelStatus], now: datetime
    ) -> None:
        """Replace the device's reported model states and remember which generation they answer."""

    @abc.abstractmethod
    def get_reported_state(self, device_id: str) -> list[ModelStatus]: ...

    # Metrics

    @abc.abstractmethod
    def add_metric_batch(self, device_id: str, batch_id: str, windows: Sequence[MetricWindow]) -> bool:
        """Store a batch of metric windows once; return False, storing nothing, for a known batch_id."""

    @abc.abstractmethod
    def query_metric_windows(
        self,
        *,
        device_id: str = "",
        model_name: str = "",
        variant_id: str = "",
        hardware_class: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[MetricWindow]:
        """Return windows matching every non-empty filter, with window_start in [start, end)."""

    @abc.abstractmethod
    def close(self) -> None: ...
