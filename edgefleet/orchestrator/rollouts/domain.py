"""Records of rollouts, their waves and per-device outcomes; no protobuf and no SQL below this line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

# Rollout states, matching edgefleet.v1.RolloutState without the prefix.
ROLLOUT_STATES = (
    "pending",
    "running",
    "paused",
    "succeeded",
    "rolling_back",
    "rolled_back",
    "aborted",
    "superseded",
)
# States in which the engine still changes assignments: it starts, advances or undoes waves.
ACTIVE_STATES = frozenset({"pending", "running", "paused", "rolling_back"})
# States in which nothing changes any more. A succeeded rollout still gives late-joining devices its version.
FINAL_STATES = frozenset({"rolled_back", "aborted", "superseded"})
# States that a newer rollout of the same model supersedes.
SUPERSEDABLE_STATES = frozenset({"pending", "running", "paused", "succeeded"})

# Wave decisions, matching edgefleet.v1.WaveDecision without the prefix.
WAVE_DECISIONS = ("waiting", "proceed", "pause", "rollback")

# Operator actions, matching edgefleet.v1.RolloutAction without the prefix.
ROLLOUT_ACTIONS = ("pause", "resume", "abort", "rollback")

# Verdicts on one device of a wave.
VERDICT_PENDING = ""  # Not enough samples yet.
VERDICT_OK = "ok"
VERDICT_FAILED = "failed"  # The device reported FAILED for the wave's variant.
VERDICT_OVER_BUDGET = "over_budget"
VERDICT_ERROR_RATE = "error_rate"
VERDICT_REGRESSION = "regression"
# No variant was assigned (none fits, or every candidate was excluded), or the device was removed before it
# reported enough samples.
VERDICT_SKIPPED = "skipped"
# An operator changed the device's assignment of the model (deploy) before it reported enough samples, so
# the wave no longer waits for it.
VERDICT_REASSIGNED = "reassigned"
# Start of the note that RolloutStore.restore writes on a wave device it left as it was, because the device
# was reassigned since or removed. The device still gets restored_generation, so no restore is tried again.
LEFT_AS_IS_NOTE = "left as it is by the rollback"

DEFAULT_MIN_SAMPLES = 100
DEFAULT_MAX_ROLLBACKS = 1
DEFAULT_SAMPLE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Target:
    """The devices a rollout covers: every label must match, and the hardware class pattern if set."""

    labels: Mapping[str, str] = field(default_factory=dict)
    hardware_class: str = ""  # An exact class or an fnmatch pattern such as "car-ecu-*"; "" matches all.


@dataclass(frozen=True)
class RolloutSpec:
    """An operator's request: a model version, a target, the wave sizes and the gates."""

    model_name: str
    model_version: str
    target: Target
    wave_percents: tuple[int, ...]  # Cumulative share of the target after each wave, ending at 100.
    budget_ms: float  # Largest acceptable p95 latency on every device.
    max_p95_regression_pct: float  # Largest p95 increase over the previous version on the same hardware class.
    max_error_rate_pct: float
    min_samples: int = DEFAULT_MIN_SAMPLES  # Latency samples each device of a wave must report.
    max_rollbacks: int = DEFAULT_MAX_ROLLBACKS  # Wave rollbacks after which the whole rollout is rolled back.
    sample_timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S  # A wave without enough samples after this is stuck.


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    spec: RolloutSpec
    state: str  # One of ROLLOUT_STATES.
    reason: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    current_wave: int = 0  # Index into spec.wave_percents of the wave in progress.
    rollbacks: int = 0  # Waves rolled back so far.
    stuck: bool = False  # The current wave has waited longer than spec.sample_timeout_s for samples.
    plan: tuple[str, ...] = ()  # Target devices in wave order, fixed when the rollout starts.
    superseded_by: str = ""
    revision: int = 0  # Advanced by every write; a write based on an older revision is rejected.


@dataclass(frozen=True)
class PreviousAssignment:
    """The assignment of the rollout's model that a device had before the rollout; rollback restores it."""

    variant_id: str
    model_version: str
    threads: int
    rollout_id: str


@dataclass(frozen=True)
class WaveDevice:
    device_id: str
    hardware_class: str
    variant_id: str  # "" when nothing was assigned (verdict skipped).
    threads: int = 0
    previous: PreviousAssignment | None = None
    assigned_generation: int = 0  # Desired generation the assignment produced; 0 until it is written.
    restored_generation: int = 0  # Desired generation of the rollback; 0 until the device is restored.
    state: str = ""  # The device's reported state of the variant (domain.MODEL_STATES), "" if not reported.
    samples: int = 0
    errors: int = 0
    p95_ms: float | None = None
    baseline_p95_ms: float | None = None  # p95 of the previous version on the same hardware class.
    verdict: str = VERDICT_PENDING
    note: str = ""
    late: bool = False  # Joined the target after the wave had completed; its figures do not gate.

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0

    @property
    def restored(self) -> bool:
        """Whether a rollback gave the device its previous assignment back (not one that left it as it was)."""
        return self.restored_generation > 0 and not self.note.startswith(LEFT_AS_IS_NOTE)


@dataclass(frozen=True)
class Wave:
    rollout_id: str
    index: int  # Position in spec.wave_percents.
    attempt: int  # 0 for the first try; a wave rolled back and tried again gets the next attempt.
    percent: int
    decision: str  # One of WAVE_DECISIONS.
    reason: str
    started_at: datetime
    decided_at: datetime | None = None
    devices: tuple[WaveDevice, ...] = ()
