"""The rollout state machine: waves that assign variants, wait for samples, then proceed, pause or roll back."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from edgefleet.orchestrator.domain import Assignment, Device, Variant
from edgefleet.orchestrator.rollouts import targets
from edgefleet.orchestrator.rollouts.domain import (
    ACTIVE_STATES,
    SUPERSEDABLE_STATES,
    VERDICT_ERROR_RATE,
    VERDICT_FAILED,
    VERDICT_OVER_BUDGET,
    VERDICT_PENDING,
    VERDICT_REASSIGNED,
    VERDICT_SKIPPED,
    Rollout,
    RolloutSpec,
    Target,
    Wave,
    WaveDevice,
)
from edgefleet.orchestrator.rollouts.gates import WaveGates, count_devices, waiting_reason
from edgefleet.orchestrator.rollouts.store import RevisionConflictError, RolloutStore, WaveKey
from edgefleet.orchestrator.selection import Predictor, fits_disk, select_variant
from edgefleet.orchestrator.store.base import NotFoundError, Store

log = logging.getLogger(__name__)

# Seconds between engine ticks in the orchestrator. A tick reads a few rows per active rollout.
TICK_S = 1.0
# The engine of one process at a time advances rollouts; a crashed holder's lease expires after this.
LEASE_NAME = "rollout-engine"
LEASE_TTL_S = 10.0
# A rollback waits this long for connected devices to report the restored generation before it ends.
ROLLBACK_CONFIRM_TIMEOUT = timedelta(seconds=120)
# Skipped devices named in the reason of a rollout that no device runs. `rollout status` lists them all.
MAX_LISTED_SKIPS = 5

# Returns the predictor for the variants of one model version on devices of the given hardware
# classes; called each time a wave chooses variants.
PredictorFactory = Callable[[Sequence[Variant], Sequence[str]], Predictor]
# Sends a device its current desired state; returns whether its control stream is open in this process.
Notify = Callable[[str], bool]


class RolloutActionError(ValueError):
    """An operator action does not apply to the rollout's state; the message names both."""


def new_rollout_id() -> str:
    return f"ro-{secrets.token_hex(5)}"


def analytic_predictor_factory(variants: Sequence[Variant], hardware_classes: Sequence[str]) -> Predictor:
    """Return the cost model's analytic predictor, which needs no measurement."""
    from edgefleet.orchestrator.costmodel.predictor import AnalyticPredictor

    return AnalyticPredictor()


@dataclass(frozen=True)
class Exclusions:
    """Variants a rollout no longer assigns: per device after a FAILED report, per class after a broken gate."""

    by_device: frozenset[tuple[str, str]]
    by_class: frozenset[tuple[str, str]]

    def allows(self, device: Device, variant: Variant) -> bool:
        return (device.device_id, variant.variant_id) not in self.by_device and (
            device.hardware.hardware_class,
            variant.variant_id,
        ) not in self.by_class


def exclusions_of(waves: Sequence[Wave]) -> Exclusions:
    """Collect the variants that failed on a device or broke a gate on a hardware class in earlier waves."""
    by_device: set[tuple[str, str]] = set()
    by_class: set[tuple[str, str]] = set()
    for wave in waves:
        for device in wave.devices:
            if device.verdict == VERDICT_FAILED:
                by_device.add((device.device_id, device.variant_id))
            elif device.verdict in (VERDICT_OVER_BUDGET, VERDICT_ERROR_RATE):
                by_class.add((device.hardware_class, device.variant_id))
    return Exclusions(frozenset(by_device), frozenset(by_class))


def _skipped_devices(waves: Sequence[Wave]) -> list[WaveDevice]:
    """Return the devices that the last attempt of each wave assigned nothing, in wave order."""
    latest: dict[int, Wave] = {}
    for wave in waves:
        if wave.index not in latest or wave.attempt > latest[wave.index].attempt:
            latest[wave.index] = wave
    return [
        device
        for index in sorted(latest)
        for device in latest[index].devices
        if not device.variant_id and not device.late and device.verdict == VERDICT_SKIPPED
    ]


def create_rollout(
    rollouts: RolloutStore,
    spec: RolloutSpec,
    now: datetime | None = None,
    devices: Sequence[Device] | None = None,
) -> tuple[Rollout, list[Rollout]]:
    """Store a new pending rollout; return it and the older rollouts it supersedes once it assigns a device.

    Given the registered devices, a rollout whose target matches none of them starts with the reason
    that the engine would give it (which term matches nothing). Nothing is superseded here: the older
    rollouts go on until the new one assigns its first device.
    """
    now = now or datetime.now(UTC)
    older = _supersedable(rollouts, spec.model_name, before=now)
    reason = "waiting for the engine to start the first wave"
    if devices is not None and not targets.select(spec.target, devices):
        reason = waiting_for_device_reason(spec.target, devices)
    rollout = Rollout(
        rollout_id=new_rollout_id(),
        spec=spec,
        state="pending",
        reason=reason + supersede_note(older),
        created_at=now,
        updated_at=now,
    )
    rollouts.create_rollout(rollout)
    log.info(
        "created rollout_id=%s of model=%s:%s waves=%s budget=%gms%s",
        rollout.rollout_id,
        spec.model_name,
        spec.model_version,
        ",".join(str(p) for p in spec.wave_percents),
        spec.budget_ms,
        f"; it supersedes {', '.join(r.rollout_id for r in older)} once it assigns a device" if older else "",
    )
    return rollout, older


def waiting_for_device_reason(target: Target, devices: Sequence[Device]) -> str:
    """Return the reason of a rollout that waits for a device to match its target, naming the term that matches none."""
    reason = f"waiting for a device that matches the target {targets.format_selector(target)}"
    unmatched = targets.unmatched_reason(target, devices)
    return f"{reason} ({unmatched})" if unmatched else reason


def supersede_note(older: Sequence[Rollout]) -> str:
    """Return the clause that a pending rollout's reason ends with while older rollouts of its model go on."""
    if not older:
        return ""
    named = ", ".join(f"{r.rollout_id} ({r.state})" for r in older)
    verb = "goes" if len(older) == 1 else "go"
    return f"; {named} {verb} on until this rollout assigns its first device, which supersedes it"


def _supersedable(rollouts: RolloutStore, model_name: str, *, before: datetime, exclude: str = "") -> list[Rollout]:
    """Return the rollouts of a model, oldest first, that a rollout created at before supersedes when it assigns."""
    found = rollouts.list_rollouts(model_name=model_name, states=SUPERSEDABLE_STATES)
    return [r for r in reversed(found) if r.created_at <= before and r.rollout_id != exclude]


def apply_action(rollouts: RolloutStore, rollout_id: str, action: str, now: datetime | None = None) -> Rollout:
    """Pause, resume, abort or roll back a rollout and return it as stored.

    pause: a pending or running rollout stops advancing. resume: a paused rollout continues; a wave
    that paused on a p95 regression counts as passed. abort: a pending, running or paused rollout
    stops where it is and keeps every assignment it made. rollback: every device the rollout
    assigned gets its previous assignment back (also after success or abort). Raises
    RolloutActionError when the action does not apply to the current state, NotFoundError for an
    unknown rollout and ValueError for an unknown action.
    """
    allowed = {
        "pause": {"pending", "running"},
        "resume": {"paused"},
        "abort": {"pending", "running", "paused"},
        "rollback": {"pending", "running", "paused", "succeeded", "aborted"},
    }
    if action not in allowed:
        raise ValueError(f"unknown rollout action {action!r}; use one of {', '.join(allowed)}")
    while True:
        now = now or datetime.now(UTC)
        rollout = rollouts.get_rollout(rollout_id)
        if rollout.state == "superseded" and rollout.superseded_by:
            raise RolloutActionError(_superseded_message(rollout, action))
        if rollout.state not in allowed[action]:
            raise RolloutActionError(
                f"cannot {action} rollout {rollout_id}: it is {rollout.state}; {action} applies to "
                f"{', '.join(sorted(allowed[action]))} rollouts"
            )
        if action == "pause":
            changed = replace(rollout, state="paused", reason="paused by the operator")
        elif action == "resume":
            _accept_paused_wave(rollouts, rollout, now)
            changed = replace(rollout, state="running", reason="resumed by the operator")
        elif action == "abort":
            # The reason keeps why the wave was stuck, and the flag marks only a rollout that still waits for samples.
            stuck = f" while stuck ({rollout.reason})" if rollout.stuck else ""
            changed = replace(rollout, state="aborted", stuck=False, reason=f"aborted by the operator{stuck}")
        else:
            changed = replace(rollout, state="rolling_back", stuck=False, reason="rollback requested by the operator")
        try:
            saved = rollouts.save_rollout(changed, now)
        except RevisionConflictError:
            # The engine wrote in between; decide again on the fresh state.
            continue
        log.info("rollout_id=%s %s by the operator: now %s", rollout_id, action, saved.state)
        return saved


def _superseded_message(rollout: Rollout, action: str) -> str:
    """Return why an action does not apply to a superseded rollout, naming the rollout that superseded it."""
    newer = rollout.superseded_by
    message = f"cannot {action} rollout {rollout.rollout_id}: it is superseded by rollout {newer}"
    if action != "rollback":
        return f"{message}; {action} rollout {newer} instead (`edgefleet rollout {action} {newer}`)"
    return (
        f"{message}. Roll back {newer} instead (`edgefleet rollout rollback {newer}`): each device it assigned "
        f"gets back the assignment it had before, which is {rollout.rollout_id}'s on devices that "
        f"{rollout.rollout_id} had reached. Devices that only {rollout.rollout_id} assigned keep its version; "
        "move them with `edgefleet deploy`"
    )


def _accept_paused_wave(rollouts: RolloutStore, rollout: Rollout, now: datetime) -> None:
    waves = [w for w in rollouts.list_waves(rollout.rollout_id) if w.index == rollout.current_wave]
    if waves and waves[-1].decision == "pause":
        wave = waves[-1]
        rollouts.save_wave(replace(wave, decision="proceed", reason=f"accepted by the operator: {wave.reason}"))


class RolloutEngine:
    """Advances every rollout by one step per tick; all state is in the stores, so any process can resume it."""

    def __init__(
        self,
        store: Store,
        rollouts: RolloutStore,
        *,
        notify: Notify | None = None,
        predictor_factory: PredictorFactory = analytic_predictor_factory,
        holder: str = "",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        excluded_devices: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """excluded_devices returns the ids of devices no rollout may assign to (the revoked ones)."""
        self.store = store
        self.rollouts = rollouts
        self.notify: Notify = notify or (lambda device_id: False)
        self.predictor_factory = predictor_factory
        self.holder = holder or f"engine-{secrets.token_hex(4)}"
        self.clock = clock
        self.excluded_devices = excluded_devices

    def tick(self) -> int:
        """Advance every rollout that needs work by one step; return how many were looked at.

        Does nothing while the engine of another process holds the lease.
        """
        if not self.rollouts.acquire_lease(LEASE_NAME, self.holder, LEASE_TTL_S, self.clock()):
            return 0
        work = self.rollouts.list_rollouts(states=(*ACTIVE_STATES, "succeeded"))
        for rollout in reversed(work):
            try:
                self.step(rollout.rollout_id)
            except RevisionConflictError as conflict:
                log.info(
                    "rollout_id=%s changed during the step (%s); it is retried next tick", rollout.rollout_id, conflict
                )
        return len(work)

    def step(self, rollout_id: str) -> Rollout:
        """Advance one rollout by one step and return it as stored afterwards."""
        rollout = self.rollouts.get_rollout(rollout_id)
        waves = self.rollouts.list_waves(rollout_id)
        if rollout.state == "pending":
            self._start(rollout, waves)
        elif rollout.state == "running":
            rollout = self._admit_late_devices(rollout, waves)
            self._advance(rollout, self.rollouts.list_waves(rollout_id))
        elif rollout.state == "paused":
            self._refresh(rollout, waves)
        elif rollout.state == "rolling_back":
            self._roll_back(rollout, waves)
        elif rollout.state == "succeeded":
            self._admit_late_devices(rollout, waves)
        return self.rollouts.get_rollout(rollout_id)

    # Steps

    def _start(self, rollout: Rollout, waves: Sequence[Wave]) -> None:
        if waves:
            # Started before a crash that happened before the state was written; continue it.
            self.rollouts.save_rollout(replace(rollout, state="running"), self.clock())
            return
        devices = self._targeted(rollout)
        if not devices:
            older = _supersedable(
                self.rollouts, rollout.spec.model_name, before=rollout.created_at, exclude=rollout.rollout_id
            )
            reason = waiting_for_device_reason(rollout.spec.target, self.store.list_devices()) + supersede_note(older)
            if rollout.reason != reason:
                self.rollouts.save_rollout(replace(rollout, reason=reason), self.clock())
            return
        # Devices that no variant of the version suits would be skipped in their wave. Planned first,
        # they would fill the canary and let the next wave go out with nothing measured, so they go last.
        runnable = {d.device_id for d in self._choose(rollout, devices, exclusions_of(())) if d.variant_id}
        plan = (
            *targets.plan_order([d for d in devices if d.device_id in runnable]),
            *targets.plan_order([d for d in devices if d.device_id not in runnable]),
        )
        started = replace(rollout, plan=plan, started_at=self.clock())
        log.info(
            "rollout_id=%s starting on %d devices in %d waves",
            rollout.rollout_id,
            len(plan),
            len(rollout.spec.wave_percents),
        )
        self._start_wave(started, 0, 0)

    def _targeted(self, rollout: Rollout) -> list[Device]:
        """Return the devices that match the rollout's target and are not excluded, sorted by id."""
        excluded = self.excluded_devices()
        devices = targets.select(rollout.spec.target, self.store.list_devices())
        return [d for d in devices if d.device_id not in excluded]

    def _wave_members(self, rollout: Rollout, index: int) -> list[str]:
        percents = rollout.spec.wave_percents
        total = len(rollout.plan)
        start = targets.cumulative_count(percents[index - 1], total) if index > 0 else 0
        end = targets.cumulative_count(percents[index], total)
        return list(rollout.plan[start:end])

    def _start_wave(self, rollout: Rollout, index: int, attempt: int) -> None:
        """Write a new wave and the rollout's move to it in one transaction, then assign its devices."""
        spec = rollout.spec
        now = self.clock()
        # Read again: the verdicts of the wave just decided exclude variants from this one.
        waves = self.rollouts.list_waves(rollout.rollout_id)
        if attempt > 0:
            previous_try = [w for w in waves if w.index == index and w.attempt == attempt - 1]
            members = [d.device_id for d in previous_try[0].devices if not d.late] if previous_try else []
        else:
            members = self._wave_members(rollout, index)
        devices = {d.device_id: d for d in self.store.list_devices()}
        excluded = self.excluded_devices()
        current = [
            devices[m]
            for m in members
            if m in devices and m not in excluded and targets.matches(spec.target, devices[m])
        ]
        wave_devices = self._choose(rollout, current, exclusions_of(waves))
        assigned = sum(1 for d in wave_devices if d.variant_id)
        wave = Wave(
            rollout_id=rollout.rollout_id,
            index=index,
            attempt=attempt,
            percent=spec.wave_percents[index],
            decision="waiting" if assigned else "proceed",
            reason=f"waiting for {spec.min_samples} samples from each of {assigned} devices"
            if assigned
            else "no device to assign in this wave",
            started_at=now,
            decided_at=None if assigned else now,
            devices=tuple(wave_devices),
        )
        try_text = f" (attempt {attempt + 1})" if attempt else ""
        moved = replace(
            rollout,
            state="running",
            current_wave=index,
            stuck=False,
            reason=f"wave {index + 1} of {len(spec.wave_percents)} ({spec.wave_percents[index]}%){try_text} started",
        )
        saved = self.rollouts.start_wave(moved, wave, now)
        log.info(
            "rollout_id=%s wave %d%s started: %s",
            rollout.rollout_id,
            index + 1,
            try_text,
            ", ".join(f"{d.device_id}={d.variant_id or 'skipped'}" for d in wave_devices) or "no devices",
        )
        self._assign(saved, wave)

    def _choose(self, rollout: Rollout, devices: Sequence[Device], exclusions: Exclusions) -> list[WaveDevice]:
        """Choose each device's variant with the cost model, leaving out excluded variants."""
        spec = rollout.spec
        variants = [v for v in self.store.list_variants(spec.model_name, spec.model_version) if v.status == "accepted"]
        predictor = self.predictor_factory(variants, sorted({d.hardware.hardware_class for d in devices}))
        chosen: list[WaveDevice] = []
        for device in devices:
            allowed = [v for v in variants if exclusions.allows(device, v)]
            # The reported state only matters for a variant whose file does not fit the free space, so a
            # fleet with room reads no extra row per device.
            disk_free = device.hardware.disk_free_bytes
            short_of_space = any(not fits_disk(v, disk_free) for v in allowed)
            reported = self.store.get_reported_state(device.device_id) if short_of_space else []
            selection = select_variant(
                device, allowed, budget_ms=spec.budget_ms, predictor=predictor, reported=reported
            )
            hardware_class = device.hardware.hardware_class
            if selection.chosen is None:
                excluded = len(variants) - len(allowed)
                note = (
                    selection.reason
                    if not excluded
                    else f"{excluded} variants excluded by earlier waves; {selection.reason}"
                )
                chosen.append(
                    WaveDevice(
                        device_id=device.device_id,
                        hardware_class=hardware_class,
                        variant_id="",
                        verdict=VERDICT_SKIPPED,
                        note=note,
                    )
                )
                continue
            chosen.append(
                WaveDevice(
                    device_id=device.device_id,
                    hardware_class=hardware_class,
                    variant_id=selection.chosen.variant_id,
                    threads=selection.threads,
                    note=selection.reason,
                )
            )
        return chosen

    def _assign(self, rollout: Rollout, wave: Wave) -> None:
        """Write the assignment of every device of the wave that has none yet and tell connected devices."""
        key = WaveKey(rollout.rollout_id, wave.index, wave.attempt)
        for device in wave.devices:
            if not device.variant_id or device.assigned_generation:
                continue
            try:
                variant = self.store.get_variant(device.variant_id)
                generation = self.rollouts.assign(
                    key,
                    Assignment(
                        device_id=device.device_id,
                        model_name=variant.model_name,
                        model_version=variant.model_version,
                        variant_id=variant.variant_id,
                        digest=variant.digest,
                        size_bytes=variant.size_bytes,
                        format=variant.format,
                        threads=device.threads,
                        rollout_id=rollout.rollout_id,
                    ),
                    self.clock(),
                )
            except NotFoundError as error:
                log.warning("rollout_id=%s cannot assign device_id=%s: %s", rollout.rollout_id, device.device_id, error)
                continue
            log.info(
                "rollout_id=%s assigned variant=%s threads=%d to device_id=%s generation=%d",
                rollout.rollout_id,
                variant.variant_id,
                device.threads,
                device.device_id,
                generation,
            )
            self.notify(device.device_id)

    def _advance(self, rollout: Rollout, waves: Sequence[Wave]) -> None:
        attempts = [w for w in waves if w.index == rollout.current_wave]
        if not attempts:
            self._start_wave(rollout, rollout.current_wave, 0)
            return
        wave = attempts[-1]
        self._assign(rollout, wave)
        if wave.decision == "waiting":
            judged = self._evaluate(rollout, wave)
            # _proceed counts the devices that run the version from the waves' verdicts, this one's included.
            waves = [judged if w is wave else w for w in waves]
            wave = judged
        if wave.decision == "waiting":
            self._check_stuck(rollout, wave)
        elif wave.decision == "proceed":
            self._proceed(rollout, waves)
        elif wave.decision == "pause":
            self.rollouts.save_rollout(
                replace(rollout, state="paused", reason=f"wave {wave.index + 1} paused: {wave.reason}"), self.clock()
            )
            log.warning("rollout_id=%s paused at wave %d: %s", rollout.rollout_id, wave.index + 1, wave.reason)
        elif wave.decision == "rollback":
            self._roll_back_wave(rollout, wave, waves)

    def _evaluate(self, rollout: Rollout, wave: Wave) -> Wave:
        judged = WaveGates(self.store, self.clock).evaluate(rollout, wave)
        if judged != wave:
            self.rollouts.save_wave(judged)
        if judged.decision != "waiting":
            log.info(
                "rollout_id=%s wave %d decision %s: %s",
                rollout.rollout_id,
                wave.index + 1,
                judged.decision,
                judged.reason,
            )
        return judged

    def _refresh(self, rollout: Rollout, waves: Sequence[Wave]) -> None:
        """Keep the figures of a paused rollout's waiting wave current, without deciding anything."""
        attempts = [w for w in waves if w.index == rollout.current_wave]
        if attempts and attempts[-1].decision == "waiting":
            gates = WaveGates(self.store, self.clock)
            wave = attempts[-1]
            devices = tuple(gates.judge(rollout, wave, d) for d in wave.devices)
            refreshed = replace(wave, devices=devices)
            waiting = [d for d in devices if d.variant_id and not d.late and d.verdict == VERDICT_PENDING]
            if waiting:
                # The reason heads the wave in `rollout status`, so it shows the same counts as the rows.
                refreshed = replace(refreshed, reason=waiting_reason(rollout.spec.min_samples, waiting))
            if refreshed != wave:
                self.rollouts.save_wave(refreshed)

    def _check_stuck(self, rollout: Rollout, wave: Wave) -> None:
        waited = (self.clock() - wave.started_at).total_seconds()
        if rollout.stuck or waited < rollout.spec.sample_timeout_s:
            return
        missing = [d for d in wave.devices if d.variant_id and not d.late and d.verdict == VERDICT_PENDING]
        detail = ", ".join(f"{d.device_id} has {d.samples}" for d in missing)
        reason = (
            f"stuck: wave {wave.index + 1} has waited {waited:.0f} s (timeout {rollout.spec.sample_timeout_s:g} s) "
            f"for {rollout.spec.min_samples} samples per device ({detail}); abort or roll it back"
        )
        self.rollouts.save_rollout(replace(rollout, stuck=True, reason=reason), self.clock())
        log.warning("rollout_id=%s %s", rollout.rollout_id, reason)

    def _proceed(self, rollout: Rollout, waves: Sequence[Wave]) -> None:
        last = len(rollout.spec.wave_percents) - 1
        if rollout.current_wave < last:
            self._start_wave(rollout, rollout.current_wave + 1, 0)
            return
        assigned = {
            d.device_id
            for w in waves
            for d in w.devices
            if d.assigned_generation and not d.restored_generation and d.verdict != VERDICT_REASSIGNED
        }
        # Devices removed with --force during the rollout got the version but no longer run it.
        running = sum(1 for device_id in assigned if self.store.get_device(device_id) is not None)
        removed = len(assigned) - running
        model = f"{rollout.spec.model_name}:{rollout.spec.model_version}"
        if not assigned:
            self._end_with_no_device(rollout, waves)
            return
        if not running:
            # As with no device assigned: succeeded would tell scripts that the version runs somewhere.
            verb = "was" if removed == 1 else "were"
            reason = (
                f"no device runs {model}: all {last + 1} waves passed, but the {count_devices(removed)} that got it "
                f"{verb} removed from the fleet during the rollout; create a new rollout for the devices that remain"
            )
            self.rollouts.save_rollout(replace(rollout, state="aborted", stuck=False, reason=reason), self.clock())
            log.warning("rollout_id=%s aborted: %s", rollout.rollout_id, reason)
            return
        verb = "runs" if running == 1 else "run"
        reason = f"all {last + 1} waves passed; {count_devices(running)} {verb} {model}"
        if removed:
            reason += f"; {count_devices(removed)} removed from the fleet during the rollout"
        self.rollouts.save_rollout(replace(rollout, state="succeeded", stuck=False, reason=reason), self.clock())
        log.info("rollout_id=%s succeeded: %s", rollout.rollout_id, reason)

    def _end_with_no_device(self, rollout: Rollout, waves: Sequence[Wave]) -> None:
        """End a rollout whose waves all passed without assigning the version to any device, as aborted.

        Succeeded would tell the operator that the version runs. Aborted stops the rollout and keeps
        the assignments made (here there are none), so a fixed version needs a new rollout.
        """
        model = f"{rollout.spec.model_name}:{rollout.spec.model_version}"
        skipped = _skipped_devices(waves)
        if skipped:
            listed = "; ".join(f"{d.device_id}: {d.note}" for d in skipped[:MAX_LISTED_SKIPS])
            more = len(skipped) - MAX_LISTED_SKIPS
            if more > 0:
                listed += f"; and {count_devices(more)} more (see `edgefleet rollout status {rollout.rollout_id}`)"
            detail = f"{count_devices(len(skipped))} skipped ({listed})"
        else:
            detail = "no targeted device was assigned the version"
        example = f" --device {skipped[0].device_id}" if skipped else " --device DEVICE_ID"
        reason = (
            f"no device runs {model}: {detail}. Check why with `edgefleet explain --model {model}{example}`, "
            "add a variant those devices can run (`edgefleet models compress` or `edgefleet models add "
            "--variant-kind`) or raise --budget-ms, then create a new rollout"
        )
        self.rollouts.save_rollout(replace(rollout, state="aborted", stuck=False, reason=reason), self.clock())
        log.warning("rollout_id=%s aborted: %s", rollout.rollout_id, reason)

    def _roll_back_wave(self, rollout: Rollout, wave: Wave, waves: Sequence[Wave]) -> None:
        """Restore the wave's devices, then try the wave again or, at the rollback limit, roll back everything."""
        self._restore(rollout, [wave])
        rollbacks = rollout.rollbacks + 1
        if rollbacks >= rollout.spec.max_rollbacks:
            reason = (
                f"wave {wave.index + 1} rolled back ({rollbacks} of at most {rollout.spec.max_rollbacks} "
                f"rollbacks): {wave.reason}"
            )
            self.rollouts.save_rollout(
                replace(rollout, state="rolling_back", rollbacks=rollbacks, stuck=False, reason=reason), self.clock()
            )
            log.warning("rollout_id=%s rolling back: %s", rollout.rollout_id, reason)
            return
        log.warning(
            "rollout_id=%s wave %d rolled back (%d of at most %d rollbacks); trying it again without "
            "the variants that failed: %s",
            rollout.rollout_id,
            wave.index + 1,
            rollbacks,
            rollout.spec.max_rollbacks,
            wave.reason,
        )
        self._start_wave(replace(rollout, rollbacks=rollbacks), wave.index, wave.attempt + 1)

    def _restore(self, rollout: Rollout, waves: Sequence[Wave]) -> None:
        """Give every assigned device of the waves, newest first, its previous assignment back."""
        for wave in sorted(waves, key=lambda w: (w.index, w.attempt), reverse=True):
            key = WaveKey(rollout.rollout_id, wave.index, wave.attempt)
            for device in wave.devices:
                if not device.assigned_generation or device.restored_generation:
                    continue
                generation, changed = self.rollouts.restore(key, device.device_id, rollout.spec.model_name)
                if changed:
                    previous = device.previous.variant_id if device.previous else "nothing"
                    log.info(
                        "rollout_id=%s restored device_id=%s to %s generation=%d",
                        rollout.rollout_id,
                        device.device_id,
                        previous,
                        generation,
                    )
                    self.notify(device.device_id)
                else:
                    log.info(
                        "rollout_id=%s left device_id=%s as it is: it was reassigned outside this wave",
                        rollout.rollout_id,
                        device.device_id,
                    )

    def _roll_back(self, rollout: Rollout, waves: Sequence[Wave]) -> None:
        self._restore(rollout, waves)
        restored = [d for w in self.rollouts.list_waves(rollout.rollout_id) for d in w.devices if d.restored_generation]
        waiting = []
        for device in restored:
            current = self.store.get_device(device.device_id)
            if current is not None and current.connected and current.reported_generation < device.restored_generation:
                waiting.append(device.device_id)
        if waiting and self.clock() - rollout.updated_at < ROLLBACK_CONFIRM_TIMEOUT:
            log.debug("rollout_id=%s waiting for %s to apply the rollback", rollout.rollout_id, ", ".join(waiting))
            return
        reason = rollout.reason
        if waiting:
            unconfirmed = ", ".join(sorted(set(waiting)))
            timeout_s = ROLLBACK_CONFIRM_TIMEOUT.total_seconds()
            reason += f"; {unconfirmed} did not report the restored state within {timeout_s:.0f} s"
        self.rollouts.save_rollout(replace(rollout, state="rolled_back", reason=reason), self.clock())
        log.info("rollout_id=%s rolled back", rollout.rollout_id)

    # Devices that join the target

    def _admit_late_devices(self, rollout: Rollout, waves: Sequence[Wave]) -> Rollout:
        """Handle devices that joined the target after the rollout started.

        Once a wave has passed (or the rollout succeeded), such a device gets the new version at
        once and is recorded on the latest passed wave. Before that, it joins the plan and so a
        later wave. Returns the rollout as stored afterwards.
        """
        in_waves = {d.device_id for w in waves for d in w.devices}
        known = in_waves if rollout.state == "succeeded" else in_waves | set(rollout.plan)
        joined = [d for d in self._targeted(rollout) if d.device_id not in known]
        if not joined:
            return rollout
        passed = [w for w in waves if w.decision == "proceed"]
        if not passed:
            plan = (*rollout.plan, *targets.plan_order(joined))
            log.info(
                "rollout_id=%s added devices that joined the target to later waves: %s",
                rollout.rollout_id,
                ", ".join(d.device_id for d in joined),
            )
            return self.rollouts.save_rollout(replace(rollout, plan=plan), self.clock())
        latest = max(passed, key=lambda w: (w.index, w.attempt))
        key = WaveKey(rollout.rollout_id, latest.index, latest.attempt)
        for device in self._choose(rollout, joined, exclusions_of(waves)):
            late = replace(
                device, late=True, note=f"joined the target after wave {latest.index + 1} passed; {device.note}"
            )
            self.rollouts.add_wave_device(key, late)
            log.info(
                "rollout_id=%s device_id=%s joined the target; assigning %s",
                rollout.rollout_id,
                device.device_id,
                device.variant_id or "nothing (no variant qualifies)",
            )
        refreshed = [
            w
            for w in self.rollouts.list_waves(rollout.rollout_id)
            if (w.index, w.attempt) == (latest.index, latest.attempt)
        ]
        self._assign(rollout, refreshed[0])
        return rollout
