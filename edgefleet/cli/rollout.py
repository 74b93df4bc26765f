"""edgefleet rollout: create gated rollouts in waves, follow their progress and pause, resume, abort or roll back."""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import textwrap
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet.cli import views
from edgefleet.common import argtypes
from edgefleet.common.labels import label_problem
from edgefleet.v1 import operator_pb2

if TYPE_CHECKING:
    from edgefleet.cli.main import Client

# Enum values are the list position + 1; 0 is UNSPECIFIED.
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
FINAL_STATES = frozenset({"succeeded", "rolled_back", "aborted", "superseded"})
WAVE_DECISIONS = ("waiting", "proceed", "pause", "rollback")
ACTIONS = ("pause", "resume", "abort", "rollback")
MODEL_STATES = ("pending", "downloading", "verifying", "loading", "serving", "failed", "removed")
# The selector key that matches the hardware class; every other key is a label.
HARDWARE_CLASS_KEY = "hardware_class"
PROGRESS_WIDTH = 20
# Long reasons and notes (a list of skipped devices, say) are cut in tables and wrapped in `rollout
# status`; JSON output keeps them whole.
REASON_WIDTH = 80
NOTE_WIDTH = 100
WRAP_WIDTH = 110
# The orchestrator's upper limits for rollout create (edgefleet/orchestrator/handlers/rollouts.py), so that
# the CLI can name the allowed range. The request sends 0 for an omitted flag, which the orchestrator
# reads as its default, so the CLI rejects an explicit 0 instead of sending it.
MAX_MIN_SAMPLES = 10_000_000
MAX_ROLLBACKS = 100
MAX_SAMPLE_TIMEOUT_S = 7 * 24 * 3600.0
MAX_BUDGET_MS = 3_600_000.0
MAX_WAVE_PERCENT = 100
# While watching a rollout, an unreachable orchestrator (a restart) is retried this long before exit 69.
# The rollout engine continues after a restart, so a short outage should not end the watch.
UNAVAILABLE_RETRY_S = 60.0
MAX_RETRY_INTERVAL_S = 5.0
# The CreateRolloutRequest fields that `rollout create` sets from its flags, as the orchestrator names them in errors.
CREATE_FLAGS = {
    "model_name": "--model",
    "model_version": "--model",
    "target_labels": "--target",
    "target_hardware_class": "--hardware-class",
    "wave_percents": "--waves",
    "budget_ms": "--budget-ms",
    "max_p95_regression_pct": "--max-p95-regression",
    "max_error_rate_pct": "--max-error-rate",
    "min_samples": "--min-samples",
    "max_rollbacks": "--max-rollbacks",
    "sample_timeout_seconds": "--sample-timeout",
}


class UsageError(ValueError):
    """A flag value is malformed; the commands turn it into the CLI's usage error (exit code 2)."""


Command = Callable[["Client", argparse.Namespace], None]


def _usage_errors(command: Command) -> Command:
    """Wrap a command so that a UsageError leaves the CLI with exit code 2 and the message."""

    def run(client: Client, args: argparse.Namespace) -> None:
        # Imported here because edgefleet.cli.main imports this module.
        from edgefleet.cli.main import EXIT_USAGE, CliError

        try:
            command(client, args)
        except UsageError as error:
            raise CliError(str(error), EXIT_USAGE) from None

    return run


def _name(value: int, names: tuple[str, ...]) -> str:
    return names[value - 1] if 1 <= value <= len(names) else "unknown"


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


# Views


def wave_device_view(device: operator_pb2.WaveDevice) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "hardware_class": device.hardware_class,
        "variant_id": device.variant_id,
        "threads": device.threads,
        "previous_variant_id": device.previous_variant_id,
        "state": _name(device.state, MODEL_STATES) if device.state else "",
        "samples": device.samples,
        "errors": device.errors,
        "error_rate": round(device.error_rate, 5),
        "p95_ms": _number(device.p95_ms),
        "baseline_p95_ms": _number(device.baseline_p95_ms),
        "verdict": device.verdict,
        "note": device.note,
        "late": device.late,
        "restored": device.restored,
    }


def list_device_statuses(client: Client) -> dict[str, tuple[str, str | None]]:
    """Return each device's status (online, stale, offline) and last-seen time, from ListDevices."""
    statuses: dict[str, tuple[str, str | None]] = {}
    request = operator_pb2.ListDevicesRequest()
    while True:
        response = client.call("ListDevices", request)
        for device in response.devices:
            view = views.device_view(device)
            statuses[view["device_id"]] = (view["status"], view["last_seen"])
        if not response.next_page_token:
            return statuses
        request.page_token = response.next_page_token


def add_device_status(view: dict[str, Any], statuses: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    """Return a copy of a rollout view whose wave devices carry their device's status now.

    Each wave device gets "device_status", "last_seen" and "current". "current" is false unless the device
    is online, because "state" is the model state recorded when the engine last judged the wave. A device
    missing from statuses (removed since) gets None in all three.
    """
    waves = []
    for wave in view["waves"]:
        devices = []
        for device in wave["devices"]:
            status, last_seen = statuses.get(device["device_id"], (None, None))
            current = None if status is None else status == "online"
            devices.append({**device, "device_status": status, "last_seen": last_seen, "current": current})
        waves.append({**wave, "devices": devices})
    return {**view, "waves": waves}


def with_device_status(client: Client, rollout_views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rollout views with each wave device's status now, calling ListDevices only if a wave has devices."""
    if not any(wave["devices"] for view in rollout_views for wave in view["waves"]):
        return [add_device_status(view, {}) for view in rollout_views]
    statuses = list_device_statuses(client)
    return [add_device_status(view, statuses) for view in rollout_views]


def wave_device_state(device: dict[str, Any]) -> str:
    """Return the STATE cell: the recorded model state, marked unless the device is online now.

    A device that is offline or stale gets its last-seen age, one that never reported a state its
    status, and one removed from the fleet since (device_status None after add_device_status) "removed".
    """
    state = str(device["state"] or "-")
    if "device_status" not in device:
        return state
    status = device["device_status"]
    if status is None:
        return f"{state} (removed)"
    if status == "online":
        return state
    if not device["state"]:
        return f"- ({status})"
    return state + views.last_report_note({"status": status, "last_seen": device["last_seen"]})


def wave_view(wave: operator_pb2.Wave) -> dict[str, Any]:
    return {
        "index": wave.index,
        "percent": wave.percent,
        "attempt": wave.attempt,
        "decision": _name(wave.decision, WAVE_DECISIONS),
        "reason": wave.reason,
        "started_at": views.iso_time(wave.started_at),
        "decided_at": views.iso_time(wave.decided_at),
        "devices": [wave_device_view(d) for d in wave.devices],
    }


def target_text(labels: dict[str, str], hardware_class: str) -> str:
    terms = [f"{key}={value}" for key, value in sorted(labels.items())]
    if hardware_class:
        terms.append(f"{HARDWARE_CLASS_KEY}={hardware_class}")
    return ",".join(terms) or "all"


def rollout_view(rollout: operator_pb2.Rollout) -> dict[str, Any]:
    return {
        "rollout_id": rollout.rollout_id,
        "model": rollout.model_name,
        "version": rollout.model_version,
        "state": _name(rollout.state, ROLLOUT_STATES),
        "reason": rollout.reason,
        "stuck": rollout.stuck,
        "target": target_text(dict(rollout.target_labels), rollout.target_hardware_class),
        "target_labels": dict(rollout.target_labels),
        "target_hardware_class": rollout.target_hardware_class,
        "wave_percents": list(rollout.wave_percents),
        "current_wave": rollout.current_wave,
        "budget_ms": rollout.budget_ms,
        "max_p95_regression_pct": rollout.max_p95_regression_pct,
        "max_error_rate_pct": rollout.max_error_rate_pct,
        "min_samples": rollout.min_samples,
        "max_rollbacks": rollout.max_rollbacks,
        "rollbacks": rollout.rollbacks,
        "sample_timeout_s": rollout.sample_timeout_seconds,
        "superseded_by": rollout.superseded_by,
        "created_at": views.iso_time(rollout.created_at),
        "started_at": views.iso_time(rollout.started_at),
        "updated_at": views.iso_time(rollout.updated_at),
        "waves": [wave_view(w) for w in rollout.waves],
    }


def drift_view(device: operator_pb2.Device) -> list[dict[str, str]]:
    """Return a device's drift entries as plain dicts."""
    return [
        {
            "kind": d.kind,
            "model": d.model_name,
            "desired_variant_id": d.desired_variant_id,
            "reported_variant_id": d.reported_variant_id,
            "detail": d.detail,
        }
        for d in device.drift
    ]


def render_drift(drift: list[dict[str, str]]) -> str:
    """Render drift entries as lines for `edgefleet devices show`; "" when there is none."""
    lines = []
    for entry in drift:
        model = f" {entry['model']}" if entry["model"] else ""
        lines.append(f"DRIFT: {entry['kind']}{model}: {entry['detail']}")
    return "\n".join(lines)


# Rendering


def progress_bar(done: float, total: float, width: int = PROGRESS_WIDTH) -> str:
    share = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
    filled = round(share * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _wave_progress(wave: dict[str, Any], min_samples: int) -> tuple[str, str]:
    # The gates skip a device that got a variant and was then removed from the fleet (devices remove
    # --force) or reassigned (deploy) before it reported min_samples, so the wave no longer waits for its samples.
    measured = [
        d
        for d in wave["devices"]
        if d["variant_id"] and not d["late"] and d["verdict"] not in ("skipped", "reassigned")
    ]
    if wave["decision"] != "waiting":
        devices = "1 device" if len(measured) == 1 else f"{len(measured)} devices"
        return progress_bar(1, 1), devices
    samples = sum(min(d["samples"], min_samples) for d in measured)
    total = len(measured) * min_samples
    return progress_bar(samples, total), f"{samples}/{total} samples"


def _ended_state(cell: str, state: str) -> str:
    """Mark a recorded model state that was still changing when the rollout ended, before any note on the cell."""
    if state in ("pending", "downloading", "verifying", "loading") and cell.startswith(state):
        return f"{state} when the rollout ended{cell[len(state) :]}"
    return cell


def _wrapped(lead: str, text: str) -> str:
    """Return lead and text wrapped at WRAP_WIDTH, with the continuation lines indented under the text."""
    return textwrap.fill(
        " ".join(text.split()),
        width=max(WRAP_WIDTH, len(lead) + 40),
        initial_indent=lead,
        subsequent_indent=" " * min(len(lead), 9),
        break_on_hyphens=False,
        break_long_words=False,
    )


def render_rollout(r: dict[str, Any]) -> str:
    """Render one rollout with a progress line per wave and a row per device."""
    waves_total = len(r["wave_percents"])
    state = r["state"].upper() + (" (STUCK)" if r["stuck"] else "")
    position = f"wave {r['current_wave'] + 1} of {waves_total}" if r["state"] in ("running", "paused") else ""
    lines = [
        f"rollout {r['rollout_id']}  {r['model']}:{r['version']}  {state}  {position}".rstrip(),
        f"target:  {r['target']}   waves: {', '.join(f'{p}%' for p in r['wave_percents'])}",
        f"gates:   p95 <= {r['budget_ms']:g} ms, regression <= {r['max_p95_regression_pct']:g}%, "
        f"errors <= {r['max_error_rate_pct']:g}%, {r['min_samples']} samples per device, "
        f"rollbacks {r['rollbacks']} of at most {r['max_rollbacks']}",
        _wrapped("reason:  ", r["reason"]),
    ]
    if r["superseded_by"]:
        lines.append(f"superseded by {r['superseded_by']}")
    ended = r["state"] in FINAL_STATES
    for wave in r["waves"]:
        bar, count = _wave_progress(wave, r["min_samples"])
        attempt = f" attempt {wave['attempt'] + 1}" if wave["attempt"] else ""
        decision = f"{wave['decision'].upper()}: {wave['reason']}"
        if ended and wave["decision"] == "waiting":
            # The rollout ended (rolled back or aborted by the operator, say) before this wave's gates decided.
            decision = f"UNDECIDED: the rollout ended {r['state']} first; it was waiting: {wave['reason']}"
        lines.append("")
        lines.append(_wrapped(f"wave {wave['index'] + 1} ({wave['percent']}%){attempt}  {bar} {count}  ", decision))
        if wave["devices"]:
            rows = [
                (
                    "  " + d["device_id"] + (" (late)" if d["late"] else ""),
                    d["variant_id"] or "-",
                    _ended_state(wave_device_state(d), d["state"]) if ended else wave_device_state(d),
                    d["samples"],
                    d["p95_ms"],
                    d["baseline_p95_ms"],
                    f"{100 * d['error_rate']:.2f}%",
                    (d["verdict"] or "waiting") + (", restored" if d["restored"] else ""),
                    views.shorten(d["note"], NOTE_WIDTH),
                )
                for d in wave["devices"]
            ]
            lines.append(
                views.table(
                    ("  DEVICE", "VARIANT", "STATE", "SAMPLES", "P95 MS", "BASE P95", "ERRORS", "VERDICT", "NOTE"),
                    rows,
                )
            )
    return "\n".join(lines)


def render_rollouts(rollouts: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["rollout_id"],
            f"{r['model']}:{r['version']}",
            r["state"] + (" (stuck)" if r["stuck"] else ""),
            f"{r['current_wave'] + 1}/{len(r['wave_percents'])}" if r["waves"] else "-",
            r["target"],
            f"{r['budget_ms']:g}",
            r["created_at"],
            views.shorten(r["reason"], REASON_WIDTH),
        )
        for r in rollouts
    ]
    return views.table(("ROLLOUT", "MODEL", "STATE", "WAVE", "TARGET", "BUDGET MS", "CREATED", "REASON"), rows)


# Commands


def parse_target(text: str) -> tuple[dict[str, str], str]:
    """Parse "kind=camera,site=a,hardware_class=car-ecu-*" into labels and a hardware class pattern.

    "" and "all" select every device. Raises UsageError for a term without "=", a key given twice and
    labels that the orchestrator would reject.
    """
    text = text.strip()
    if text in ("", "all", "*"):
        return {}, ""
    labels: dict[str, str] = {}
    hardware_class = ""
    for term in text.split(","):
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"invalid --target term {term!r}: expected KEY=VALUE, for example kind=camera")
        if key == HARDWARE_CLASS_KEY:
            if hardware_class:
                raise UsageError(f"--target {text!r} names {HARDWARE_CLASS_KEY} twice; give one pattern")
            hardware_class = value
        elif key in labels:
            raise UsageError(f"--target {text!r} names label {key!r} twice")
        else:
            labels[key] = value
    problem = label_problem(labels)
    if problem:
        raise UsageError(f"invalid --target {text!r}: {problem}")
    return labels, hardware_class


def parse_waves(text: str) -> list[int]:
    """Parse "1,10,50,100" into cumulative wave percents; raise UsageError for anything else."""
    try:
        percents = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"invalid --waves {text!r}: expected rising percents such as 1,10,50,100") from None
    if not percents:
        raise UsageError("--waves is empty; give rising percents such as 1,10,50,100")
    for percent in percents:
        if not 1 <= percent <= MAX_WAVE_PERCENT:
            raise UsageError(
                f"invalid --waves {text!r}: wave percent {percent} is out of range; each wave covers 1 to "
                f"{MAX_WAVE_PERCENT} percent of the target, as in 1,10,50,100"
            )
    return percents


@_usage_errors
def cmd_create(client: Client, args: argparse.Namespace) -> None:
    name, _, version = args.model.partition(":")
    labels, hardware_class = parse_target(args.target)
    if args.hardware_class:
        if hardware_class:
            raise UsageError("give the hardware class either in --target or with --hardware-class, not both")
        hardware_class = args.hardware_class
    request = operator_pb2.CreateRolloutRequest(
        model_name=name,
        model_version=version,
        target_labels=labels,
        target_hardware_class=hardware_class,
        wave_percents=parse_waves(args.waves),
        budget_ms=args.budget_ms,
        max_p95_regression_pct=args.max_p95_regression,
        max_error_rate_pct=args.max_error_rate,
        # An omitted flag is None and goes out as 0, which the orchestrator replaces with its default.
        min_samples=args.min_samples or 0,
        max_rollbacks=args.max_rollbacks or 0,
        sample_timeout_seconds=args.sample_timeout or 0.0,
    )
    rollout = client.call("CreateRollout", request, flags=CREATE_FLAGS)
    if not _any_device_matches(client, labels, hardware_class):
        target = target_text(labels, hardware_class)
        print(
            f"edgefleet: warning: no registered device matches the target {target}; rollout {rollout.rollout_id} "
            "stays pending until one does and supersedes no rollout before that. If the target is a typo, "
            f"abort it with `edgefleet rollout abort {rollout.rollout_id}`",
            file=sys.stderr,
        )
    _show(client, rollout, args)


def _any_device_matches(client: Client, labels: dict[str, str], hardware_class: str) -> bool:
    """Return whether a registered, unrevoked device has every label and a hardware class matching the pattern."""
    request = operator_pb2.ListDevicesRequest()
    while True:
        response = client.call("ListDevices", request)
        for device in response.devices:
            # Rollouts leave revoked devices out.
            if device.revoked or any(device.labels.get(key) != value for key, value in labels.items()):
                continue
            if not hardware_class or fnmatch.fnmatchcase(device.hardware.hardware_class, hardware_class):
                return True
        if not response.next_page_token:
            return False
        request.page_token = response.next_page_token


def waves_waiting_on(client: Client, model_name: str, device_id: str) -> list[str]:
    """Return "wave N of rollout ID" for each running or paused rollout of the model whose undecided wave
    contains the device."""
    running: list[Any] = [ROLLOUT_STATES.index(s) + 1 for s in ("running", "paused")]
    response = client.call("ListRollouts", operator_pb2.ListRolloutsRequest(model_name=model_name, states=running))
    held = []
    for rollout in response.rollouts:
        attempts = [w for w in rollout.waves if w.index == rollout.current_wave]
        if not attempts:
            continue
        wave = max(attempts, key=lambda w: w.attempt)
        if _name(wave.decision, WAVE_DECISIONS) != "waiting":
            continue
        if any(d.device_id == device_id and d.variant_id and not d.late for d in wave.devices):
            held.append(f"wave {wave.index + 1} of rollout {rollout.rollout_id}")
    return held


def cmd_status(client: Client, args: argparse.Namespace) -> None:
    rollout = client.call("GetRollout", operator_pb2.GetRolloutRequest(rollout_id=args.rollout_id))
    _show(client, rollout, args)


def cmd_list(client: Client, args: argparse.Namespace) -> None:
    # Plain ints: the enum values of RolloutState are the list position + 1.
    states: list[Any] = [ROLLOUT_STATES.index(s) + 1 for s in args.state]
    response = client.call("ListRollouts", operator_pb2.ListRolloutsRequest(model_name=args.model or "", states=states))
    data = with_device_status(client, [rollout_view(r) for r in response.rollouts])
    if args.output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(render_rollouts(data))


def cmd_action(client: Client, args: argparse.Namespace) -> None:
    action: Any = ACTIONS.index(args.verb) + 1
    rollout = client.call(
        "UpdateRollout",
        operator_pb2.UpdateRolloutRequest(rollout_id=args.rollout_id, action=action),
    )
    _show(client, rollout, args)


def _show(client: Client, rollout: operator_pb2.Rollout, args: argparse.Namespace) -> None:
    """Print the rollout. With --watch, print it again on every change until it reaches a final state.

    With --watch, raises CliError with exit code 1 when that state is not succeeded, so that a script
    waiting on the rollout learns that the version did not reach its target.
    """
    view = rollout_view(rollout)
    emit_one(with_device_status(client, [view])[0], args.output)
    if not getattr(args, "watch", False):
        return
    from edgefleet.cli.retry import call_retrying  # Imported here because it imports edgefleet.cli.main.

    interval = max(args.interval, 0.1)
    rollout_id = view["rollout_id"]
    while view["state"] not in FINAL_STATES:
        time.sleep(interval)
        polled = call_retrying(
            client,
            "GetRollout",
            operator_pb2.GetRolloutRequest(rollout_id=rollout_id),
            retry_s=UNAVAILABLE_RETRY_S,
            base_s=interval,
            cap_s=MAX_RETRY_INTERVAL_S,
            goes_on=f"rollout {rollout_id} goes on if the orchestrator restarts",
        )
        latest = rollout_view(polled)
        # Compared without the device status, whose last-seen time moves with every heartbeat.
        if latest != view:
            view = latest
            if args.output != "json":
                print()
            emit_one(with_device_status(client, [view])[0], args.output)
    if view["state"] != "succeeded":
        from edgefleet.cli.main import EXIT_FAILED, CliError

        raise CliError(f"rollout {view['rollout_id']} ended {view['state']}: {view['reason']}", EXIT_FAILED)


def emit_one(view: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(view, indent=2), flush=True)
    else:
        print(render_rollout(view), flush=True)


def add_commands(nouns: Any, output_flag: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `edgefleet rollout ...` on the CLI's subparsers; output_flag adds --output to a command."""
    rollout = nouns.add_parser("rollout", help="roll a model version out in gated waves")
    verbs = rollout.add_subparsers(dest="verb", required=True)

    sub = verbs.add_parser("create", help="start a rollout of a model version to a target in waves")
    sub.add_argument("--model", required=True, help="NAME:VERSION (NAME alone takes the newest version)")
    sub.add_argument(
        "--target",
        default="all",
        help="devices: KEY=VALUE labels and hardware_class=PATTERN, comma-separated (default all)",
    )
    sub.add_argument("--hardware-class", help="only devices of this hardware class (an fnmatch pattern)")
    sub.add_argument(
        "--waves",
        default="1,10,50,100",
        help="cumulative percent of the target after each wave: up to 20 comma-separated percents that rise "
        "from 1 to 100 and end at 100 (default 1,10,50,100)",
    )
    sub.add_argument(
        "--budget-ms",
        type=float,
        required=True,
        help=f"p95 latency budget per device, in ms, above 0 and at most {MAX_BUDGET_MS:.0f}",
    )
    sub.add_argument(
        "--max-p95-regression",
        type=float,
        default=20.0,
        metavar="PCT",
        help="largest p95 increase over the previous version on the same hardware class, in percent; "
        "a larger increase pauses the rollout (default 20)",
    )
    sub.add_argument(
        "--max-error-rate",
        type=float,
        default=1.0,
        metavar="PCT",
        help="largest share of failed inferences, in percent; more rolls the wave back (default 1)",
    )
    sub.add_argument(
        "--min-samples",
        type=argtypes.whole_number(1, MAX_MIN_SAMPLES),
        help=f"latency samples each device reports before a wave is judged, 1 to {MAX_MIN_SAMPLES} (default 100)",
    )
    sub.add_argument(
        "--max-rollbacks",
        type=argtypes.whole_number(1, MAX_ROLLBACKS),
        help="wave rollbacks at which the whole rollout is rolled back; 1 rolls it back at the first, "
        f"up to {MAX_ROLLBACKS} (default 1)",
    )
    sub.add_argument(
        "--sample-timeout",
        type=argtypes.seconds(MAX_SAMPLE_TIMEOUT_S),
        metavar="SECONDS",
        help="seconds a wave may wait for samples before it is reported stuck, above 0 and at most "
        f"{MAX_SAMPLE_TIMEOUT_S:g} (default 600)",
    )
    _watch_flags(sub)
    output_flag(sub)
    sub.set_defaults(handler=cmd_create)

    sub = verbs.add_parser("status", help="show a rollout with the progress of each wave")
    sub.add_argument("rollout_id")
    _watch_flags(sub)
    output_flag(sub)
    sub.set_defaults(handler=cmd_status)

    sub = verbs.add_parser("list", help="list rollouts, newest first")
    sub.add_argument("--model", help="only rollouts of this model")
    sub.add_argument("--state", action="append", default=[], choices=ROLLOUT_STATES, help="only these states")
    output_flag(sub)
    sub.set_defaults(handler=cmd_list)

    helps = {
        "pause": "stop advancing a rollout",
        "resume": "continue a paused rollout; a wave paused on a p95 regression counts as passed",
        "abort": "stop a rollout where it is, keeping the assignments it made (also a stuck one)",
        "rollback": "give every device of the rollout its previous assignment back",
    }
    for verb in ACTIONS:
        sub = verbs.add_parser(verb, help=helps[verb])
        sub.add_argument("rollout_id")
        output_flag(sub)
        sub.set_defaults(handler=cmd_action)


def _watch_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--watch", action="store_true", help="print the rollout again on each change until it ends")
    sub.add_argument(
        "--interval", type=argtypes.seconds(), default=1.0, help="seconds between polls with --watch, above 0"
    )
