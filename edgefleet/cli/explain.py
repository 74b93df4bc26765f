"""edgefleet explain: which variant of a model a device would run, and why every other one is excluded."""

from __future__ import annotations

import argparse
import math
from typing import Any

from edgefleet.cli import views
from edgefleet.cli.main import EXIT_USAGE, Client, CliError, emit, output_flag_of_command, split_model_ref
from edgefleet.common.units import human_bytes
from edgefleet.v1 import operator_pb2


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def candidate_view(candidate: operator_pb2.Candidate) -> dict[str, Any]:
    """Return one candidate as a JSON-ready dict."""
    variant = views.variant_view(candidate.variant)
    return {
        "variant_id": variant["variant_id"],
        "kind": variant["kind"],
        "format": variant["format"],
        "precision": variant["precision"],
        "accuracy": variant["accuracy"],
        "accuracy_metric": variant["accuracy_metric"],
        "accuracy_drop": variant["accuracy_drop"],
        # What the selection ranks by: 1 - drop / 100, with the drop in points against the source.
        "ranked_accuracy": candidate.ranked_accuracy if candidate.ranked_accuracy >= 0 else None,
        "predicted_p50_ms": _number(candidate.predicted_p50_ms),
        "predicted_p95_ms": _number(candidate.predicted_p95_ms),
        "predicted_memory_bytes": candidate.predicted_memory_bytes,
        "threads": candidate.threads,
        "basis": candidate.basis,
        "chosen": candidate.chosen,
        "reason": candidate.reason,
    }


def explain_view(response: operator_pb2.ExplainSelectionResponse, device_id: str, budget_ms: float) -> dict[str, Any]:
    """Return the explanation as a JSON-ready dict."""
    return {
        "device_id": device_id,
        "hardware_class": response.hardware_class,
        "budget_ms": budget_ms or None,
        "chosen_variant_id": response.chosen_variant_id or None,
        "threads": response.threads,
        "candidates": [candidate_view(c) for c in response.candidates],
    }


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_explain(data: dict[str, Any]) -> str:
    """Render the explanation as a table with one row per candidate and the reason beneath."""
    budget = f"{data['budget_ms']:g} ms" if data["budget_ms"] else "none"
    lines = [f"device {data['device_id']} (hardware class {data['hardware_class']}), latency budget {budget}"]
    if data["chosen_variant_id"]:
        threads = "1 thread" if data["threads"] == 1 else f"{data['threads']} threads"
        lines.append(f"chosen: {data['chosen_variant_id']} with {threads}")
    else:
        lines.append("chosen: none; no variant qualifies")
    # The variant column is as wide as the longest id, so long ids keep the columns aligned.
    width = max([len("VARIANT"), *(len(c["variant_id"]) for c in data["candidates"])])
    header = (
        f"  {'':1} {'VARIANT':{width}} {'FORMAT':6} {'PREC':4} {'DROP PT':>8} {'P50 MS':>8} {'P95 MS':>8} "
        f"{'MEMORY':>10} {'THR':>3} BASIS"
    )
    lines += ["", header]
    for c in data["candidates"]:
        memory = human_bytes(c["predicted_memory_bytes"]) if c["predicted_memory_bytes"] else "-"
        ranked = c["ranked_accuracy"]
        drop = None if ranked is None else (1.0 - ranked) * 100.0
        lines.append(
            f"  {'*' if c['chosen'] else ' ':1} {c['variant_id']:{width}} {c['format']:6} {c['precision']:4} "
            f"{_cell(drop):>8} {_cell(c['predicted_p50_ms']):>8} {_cell(c['predicted_p95_ms']):>8} "
            f"{memory:>10} {c['threads'] or '-':>3} {c['basis'] or '-'}"
        )
        lines.append(f"      {c['reason']}")
    return "\n".join(lines)


def cmd_explain(client: Client, args: argparse.Namespace) -> None:
    name, version = split_model_ref(args.model)
    if args.budget_ms is not None and not (math.isfinite(args.budget_ms) and args.budget_ms > 0):
        raise CliError(f"invalid --budget-ms {args.budget_ms}: use a positive number of milliseconds", EXIT_USAGE)
    budget = args.budget_ms or 0.0
    request = operator_pb2.ExplainSelectionRequest(
        model_name=name, model_version=version, device_id=args.device, budget_ms=budget
    )
    response = client.call("ExplainSelection", request)
    emit(explain_view(response, args.device, budget), args.output, render_explain)


def add_parser(nouns: Any) -> None:
    """Add the explain command to the CLI's subcommands (an argparse _SubParsersAction)."""
    sub = nouns.add_parser(
        "explain", help="show which variant a device would run, with predicted latency and memory, and why"
    )
    sub.add_argument("--model", required=True, help="NAME or NAME:VERSION (default: latest version)")
    sub.add_argument("--device", required=True, help="device id")
    sub.add_argument("--budget-ms", type=float, help="latency budget on the predicted p95, in milliseconds")
    output_flag_of_command(sub)
    sub.set_defaults(handler=cmd_explain)
