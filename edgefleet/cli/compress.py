"""edgefleet models compress and edgefleet jobs: start compression jobs, follow, list and cancel them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.cli import views
from edgefleet.cli.main import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Client,
    CliError,
    emit,
    render_variants,
    split_model_ref,
)
from edgefleet.cli.retry import call_retrying
from edgefleet.common import argtypes
from edgefleet.v1 import operator_pb2

BUILTIN_SOURCES = ("demo-photos", "digits")
JOB_STATES = ("unspecified", "queued", "running", "succeeded", "failed", "cancelled")
POLL_INTERVAL_S = 0.5
# While following a job, an unreachable orchestrator (a restart) is retried this long before exit 69.
# Jobs resume after an orchestrator restart, so a short outage should not end the wait.
UNAVAILABLE_RETRY_S = 60.0
MAX_RETRY_INTERVAL_S = 5.0
BAR_WIDTH = 30
EXIT_INTERRUPTED = 130


def job_view(job: operator_pb2.CompressionJob) -> dict[str, Any]:
    """Return a job as a JSON-ready dict."""
    try:
        recipe: Any = json.loads(job.recipe_json) if job.recipe_json else {}
    except json.JSONDecodeError:
        recipe = job.recipe_json
    return {
        "job_id": job.job_id,
        "model": job.model_name,
        "version": job.model_version,
        "state": JOB_STATES[job.state] if 0 <= job.state < len(JOB_STATES) else str(job.state),
        "progress": round(job.progress, 4),
        "stage": job.stage,
        "error": job.error,
        "variant_ids": list(job.variant_ids),
        # The same form as every other time the CLI prints: UTC to the second, with +00:00.
        "created_at": views.iso_time(job.created_at),
        "updated_at": views.iso_time(job.updated_at),
        "recipe": recipe,
    }


def source_section(value: str) -> dict[str, str]:
    """Turn a --calibration/--evaluation value into a recipe data source section.

    demo-photos and digits name the built-in sources; a value ending in .npz is an .npz file and anything
    else a folder of images. Relative paths become absolute: they are read on the orchestrator host.
    """
    if value in BUILTIN_SOURCES:
        return {"images": f"builtin:{value}"}
    path = os.path.abspath(os.path.expanduser(value))
    return {"npz": path} if value.lower().endswith(".npz") else {"images": path}


def resolve_recipe_paths(recipe: dict[str, Any], folder: Path) -> None:
    """Make the relative data paths of a recipe file absolute, relative to folder (the file's folder).

    The orchestrator reads images, npz and labels only by absolute path. Built-in sources and values
    of the wrong type stay as they are, for the orchestrator to check.
    """
    for section_name, source_name in (("quantize", "calibration"), ("gate", "evaluation")):
        section = recipe.get(section_name)
        source = section.get(source_name) if isinstance(section, dict) else None
        if not isinstance(source, dict):
            continue
        for key in ("images", "npz", "labels"):
            value = source.get(key)
            if isinstance(value, str) and value and not value.startswith("builtin:"):
                source[key] = os.path.abspath(folder / os.path.expanduser(value))


def build_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Read --recipe (TOML or JSON) and apply the shortcut flags on top; return the recipe dict.

    Raises CliError for a missing or unreadable recipe file, for int8 flags (--calibration,
    --calibration-size, --fine-tune-steps) given without --int8 or a quantize section in the recipe, and
    for --gate together with --int8, an int8 flag or a quantize section.
    """
    recipe: dict[str, Any] = {}
    if args.recipe is not None:
        path: Path = args.recipe
        if path.is_dir():
            raise CliError(f"recipe file {path} is a directory; give a .toml or .json recipe file", EXIT_USAGE)
        if not path.is_file():
            raise CliError(f"recipe file {path} not found", EXIT_USAGE)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CliError(
                f"invalid recipe file {path}: it is not UTF-8 text ({error.reason} at byte {error.start}); "
                "give a TOML or JSON recipe",
                EXIT_USAGE,
            ) from None
        except OSError as error:
            raise CliError(f"cannot read recipe file {path}: {error.strerror or error}", EXIT_USAGE) from None
        try:
            if path.suffix.lower() == ".toml":
                recipe = tomllib.loads(text)
            elif path.suffix.lower() == ".json":
                recipe = json.loads(text)
            else:
                raise CliError(f"recipe file {path} must end in .toml or .json", EXIT_USAGE)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
            raise CliError(f"invalid recipe file {path}: {error}", EXIT_USAGE) from None
        if not isinstance(recipe, dict):
            raise CliError(f"recipe file {path} must hold a table of sections", EXIT_USAGE)
        resolve_recipe_paths(recipe, path.parent)
    int8_flags = [
        flag
        for flag, value in (
            ("--calibration", args.calibration),
            ("--calibration-size", args.calibration_size),
            ("--fine-tune-steps", args.fine_tune_steps),
        )
        if value is not None
    ]
    if int8_flags and not args.int8 and "quantize" not in recipe:
        raise CliError(
            f"{', '.join(int8_flags)} given without --int8: the int8 flags apply only to int8 quantization; "
            "add --int8 (or a [quantize] section to the --recipe file)",
            EXIT_USAGE,
        )
    if args.gate is not None and (args.int8 or int8_flags or "quantize" in recipe):
        made_by = [flag for flag in ("--int8", *int8_flags) if flag != "--int8" or args.int8]
        if not made_by:
            made_by = [f"the [quantize] section of {args.recipe}"]
        raise CliError(
            f"--gate gates an uploaded variant and makes none, but {', '.join(made_by)} would make an int8 "
            "variant: leave out --gate, or run a separate job for each",
            EXIT_USAGE,
        )
    if args.int8 or int8_flags:
        quantize = recipe.setdefault("quantize", {})
        if not isinstance(quantize, dict):
            raise CliError("the recipe's quantize entry must be a table", EXIT_USAGE)
        if args.calibration is not None:
            quantize["calibration"] = source_section(args.calibration)
        if args.calibration_size is not None:
            quantize["calibration_size"] = args.calibration_size
        if args.fine_tune_steps is not None:
            quantize["fine_tune_steps"] = args.fine_tune_steps
    if args.evaluation is not None or args.max_accuracy_drop is not None or args.gate is not None:
        gate = recipe.setdefault("gate", {})
        if not isinstance(gate, dict):
            raise CliError("the recipe's gate entry must be a table", EXIT_USAGE)
        if args.evaluation is not None:
            gate["evaluation"] = source_section(args.evaluation)
        if args.max_accuracy_drop is not None:
            gate["max_accuracy_drop"] = args.max_accuracy_drop
        if args.gate is not None:
            gate["variant"] = args.gate
    if not recipe:
        raise CliError(
            "nothing to do: pass --recipe FILE, --int8 --calibration SOURCE, or --gate VARIANT_ID --evaluation SOURCE",
            EXIT_USAGE,
        )
    return recipe


def gate_recipe(variant_id: str, evaluation: str, max_accuracy_drop: float | None) -> dict[str, Any]:
    """Return the recipe of a job that gates the uploaded variant variant_id on the evaluation source."""
    gate: dict[str, Any] = {"variant": variant_id, "evaluation": source_section(evaluation)}
    if max_accuracy_drop is not None:
        gate["max_accuracy_drop"] = max_accuracy_drop
    return {"gate": gate}


def render_job(job: dict[str, Any]) -> str:
    lines = [
        f"job:       {job['job_id']} ({job['state']}, {job['progress']:.0%})",
        f"model:     {job['model']}:{job['version']}",
        f"stage:     {job['stage'] or '-'}",
        f"created:   {job['created_at']}   updated: {job['updated_at']}",
        f"variants:  {', '.join(job['variant_ids']) or '-'}",
    ]
    if job["error"]:
        lines.append(f"error:     {job['error']}")
    lines.append("recipe:    " + json.dumps(job["recipe"], sort_keys=True))
    return "\n".join(lines)


def render_jobs(jobs: list[dict[str, Any]]) -> str:
    rows = [
        (
            j["job_id"],
            f"{j['model']}:{j['version']}",
            j["state"],
            f"{j['progress']:.0%}",
            views.shorten(j["error"] or j["stage"], 60),
            len(j["variant_ids"]),
            j["created_at"],
        )
        for j in jobs
    ]
    return views.table(("JOB", "MODEL", "STATE", "PROGRESS", "STAGE", "VARIANTS", "CREATED"), rows)


def _outcome(job: dict[str, Any]) -> str:
    """Return "job ID STATE: DETAIL", leaving out a detail that only repeats the state ("cancelled")."""
    detail = job["error"] or job["stage"]
    return f"job {job['job_id']} {job['state']}" + (f": {detail}" if detail and detail != job["state"] else "")


def render_result(result: dict[str, Any]) -> str:
    job = result["job"]
    lines = [_outcome(job)]
    if result["variants"]:
        lines.append(render_variants(result["variants"]))
    return "\n".join(lines)


def _progress_line(job: operator_pb2.CompressionJob) -> str:
    filled = int(job.progress * BAR_WIDTH)
    return f"{job.job_id} [{'#' * filled:<{BAR_WIDTH}}] {job.progress:4.0%} {JOB_STATES[job.state]}: {job.stage}"


def follow(
    client: Client, job_id: str, *, timeout_s: float, show: bool, announce: str = ""
) -> operator_pb2.CompressionJob:
    """Poll the job until it finishes and return it; draw a progress bar on stderr when show is set.

    On a terminal the bar redraws in place; otherwise each new stage is printed on its own line.
    announce, when given, is printed on stderr first. An unreachable orchestrator is retried with
    backoff for up to UNAVAILABLE_RETRY_S. Raises CliError after timeout_s (0 waits forever), when
    the orchestrator stays unreachable (exit 69), and on Ctrl-C, which leaves the job running.
    """
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    tty = sys.stderr.isatty()
    last_stage = ""
    drawn = 0  # Width of the bar line drawn last on a terminal.
    try:
        if announce:
            print(announce, file=sys.stderr, flush=True)
        while True:
            job = _get_job_retrying(client, job_id)
            if show:
                line = _progress_line(job)[:160]
                if tty:
                    print("\r" + line.ljust(drawn), end="", file=sys.stderr, flush=True)
                    drawn = len(line)
                elif job.stage != last_stage:
                    print(line, file=sys.stderr, flush=True)
                last_stage = job.stage
            if job.state in (
                operator_pb2.JOB_STATE_SUCCEEDED,
                operator_pb2.JOB_STATE_FAILED,
                operator_pb2.JOB_STATE_CANCELLED,
            ):
                if show and tty:
                    print(file=sys.stderr)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(
                    f"timed out after {timeout_s:g} s waiting for job {job_id}; it keeps running", EXIT_TIMEOUT
                )
            time.sleep(POLL_INTERVAL_S)
    except KeyboardInterrupt:
        if show and tty:
            print(file=sys.stderr)
        raise CliError(
            f"detached from job {job_id}; it keeps running on the orchestrator. Follow it with "
            f"edgefleet jobs wait {job_id} or stop it with edgefleet jobs cancel {job_id}",
            EXIT_INTERRUPTED,
        ) from None


def _get_job_retrying(client: Client, job_id: str) -> operator_pb2.CompressionJob:
    """Get the job; retry while the orchestrator is unreachable, for up to UNAVAILABLE_RETRY_S."""
    job: operator_pb2.CompressionJob = call_retrying(
        client,
        "GetCompressionJob",
        operator_pb2.GetCompressionJobRequest(job_id=job_id),
        retry_s=UNAVAILABLE_RETRY_S,
        base_s=POLL_INTERVAL_S,
        cap_s=MAX_RETRY_INTERVAL_S,
        goes_on=f"job {job_id} keeps running if the orchestrator restarts",
    )
    return job


def _job_variants(client: Client, job: operator_pb2.CompressionJob) -> list[dict[str, Any]]:
    """Return the views of the variants the job stored that still exist, with the figures its gate measured."""
    if not job.variant_ids:
        return []
    response = client.call(
        "ListVariants", operator_pb2.ListVariantsRequest(model_name=job.model_name, model_version=job.model_version)
    )
    stored = set(job.variant_ids)
    return [views.variant_view(v) for v in response.variants if v.variant_id in stored]


def finish(client: Client, job: operator_pb2.CompressionJob, output: str) -> None:
    """Print the finished job with its variants; raise CliError when it did not produce an accepted one."""
    variants = _job_variants(client, job)
    view = job_view(job)
    emit({"job": view, "variants": variants}, output, render_result)
    if job.state != operator_pb2.JOB_STATE_SUCCEEDED:
        # The table on stdout shows the error already; JSON output leaves stderr as the place to read it.
        message = _outcome(view) if output == "json" else f"job {job.job_id} {JOB_STATES[job.state]}"
        raise CliError(message, EXIT_FAILED)
    if not any(v["status"] == "accepted" for v in variants):
        raise CliError(f"job {job.job_id} produced no accepted variant; see the reasons above", EXIT_FAILED)


def cmd_models_compress(client: Client, args: argparse.Namespace) -> None:
    name, version = split_model_ref(args.model)
    recipe = build_recipe(args)
    run_job(
        client,
        name,
        version,
        recipe,
        no_wait=args.no_wait,
        wait_timeout=args.wait_timeout,
        output=args.output,
        quiet=args.quiet,
    )


def run_job(
    client: Client,
    name: str,
    version: str,
    recipe: dict[str, Any],
    *,
    no_wait: bool,
    wait_timeout: float,
    output: str,
    quiet: bool = False,
    pending_variant: str = "",
) -> None:
    """Start a compression job with recipe and, unless no_wait, follow it and print its variants.

    While it follows the job, stderr gets the job id and a progress bar (a line per stage when stderr is
    not a terminal), unless quiet is set or the output is JSON. pending_variant is the variant that
    `models add` stored for this job to gate. When the orchestrator rejects the job, the error says that
    the variant stays pending and how to gate it later.
    """
    request = operator_pb2.CreateCompressionJobRequest(
        model_name=name, model_version=version, recipe_json=json.dumps(recipe, sort_keys=True)
    )
    try:
        job = client.call("CreateCompressionJob", request)
    except CliError as error:
        if not pending_variant:
            raise
        raise CliError(
            f"{error}. {pending_variant} stays stored as pending; gate it with `edgefleet models compress "
            f"{name}:{version} --gate {pending_variant} --evaluation SOURCE`",
            error.code,
        ) from None
    if no_wait:
        emit(job_view(job), output, render_job)
        return
    announce = "" if quiet else f"started compression job {job.job_id} for {job.model_name}:{job.model_version}"
    show = output != "json" and not quiet
    followed = follow(client, job.job_id, timeout_s=wait_timeout, show=show, announce=announce)
    finish(client, followed, output)


def cmd_jobs_list(client: Client, args: argparse.Namespace) -> None:
    response = client.call("ListCompressionJobs", operator_pb2.ListCompressionJobsRequest(model_name=args.model or ""))
    emit([job_view(j) for j in response.jobs], args.output, render_jobs)


def cmd_jobs_show(client: Client, args: argparse.Namespace) -> None:
    job = client.call("GetCompressionJob", operator_pb2.GetCompressionJobRequest(job_id=args.job_id))
    view = {**job_view(job), "variants": _job_variants(client, job)}
    emit(view, args.output, _render_job_with_variants)


def _render_job_with_variants(job: dict[str, Any]) -> str:
    text = render_job(job)
    return text + "\n" + render_variants(job["variants"]) if job["variants"] else text


def cmd_jobs_cancel(client: Client, args: argparse.Namespace) -> None:
    before = client.call("GetCompressionJob", operator_pb2.GetCompressionJobRequest(job_id=args.job_id))
    if before.state == operator_pb2.JOB_STATE_CANCELLED:
        # A retried cancel succeeds, so a script may repeat it.
        print(f"job {before.job_id} already cancelled", file=sys.stderr)
        emit(job_view(before), args.output, render_job)
        return
    # Ending a running worker may take the orchestrator's grace period.
    job = client.call(
        "CancelCompressionJob", operator_pb2.CancelCompressionJobRequest(job_id=args.job_id), timeout_s=60.0
    )
    emit(job_view(job), args.output, render_job)


def cmd_jobs_wait(client: Client, args: argparse.Namespace) -> None:
    finish(client, follow(client, args.job_id, timeout_s=args.wait_timeout, show=args.output != "json"), args.output)


def add_commands(
    models: argparse._SubParsersAction[argparse.ArgumentParser],
    nouns: argparse._SubParsersAction[argparse.ArgumentParser],
    output_flag: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register `models compress` under models and the `jobs` noun under nouns."""
    sub = models.add_parser(
        "compress",
        help="compress a model version on the orchestrator (int8) and gate the result",
        description="Start a compression job and follow it until it finishes. Exit status 0 when it produced "
        "an accepted variant, 1 otherwise, 130 when Ctrl-C detached (the job keeps running).",
    )
    sub.add_argument("model", help="NAME or NAME:VERSION (default: latest version)")
    sub.add_argument("--recipe", type=Path, help="recipe file (.toml or .json); the flags below override it")
    sub.add_argument("--int8", action="store_true", help="add static int8 quantization (a [quantize] section)")
    sub.add_argument(
        "--calibration",
        metavar="SOURCE",
        help="calibration data: demo-photos, digits, an image folder or an .npz file on the orchestrator host "
        "(needs --int8)",
    )
    sub.add_argument(
        "--calibration-size",
        type=argtypes.whole_number(1),
        metavar="N",
        help="at most N calibration samples, at least 1 (needs --int8)",
    )
    sub.add_argument(
        "--fine-tune-steps",
        type=argtypes.whole_number(0),
        metavar="N",
        help="after quantizing, train the int8 weights for N steps to match the fp32 outputs "
        "(0: off; minutes; needs --int8)",
    )
    sub.add_argument(
        "--evaluation", metavar="SOURCE", help="gate evaluation data (default: the built-in source's held-out half)"
    )
    sub.add_argument(
        "--max-accuracy-drop",
        type=argtypes.finite_number(0, 100, "percentage points"),
        metavar="POINTS",
        help="reject variants that lose more accuracy than this, in percentage points from 0 to 100 (default 1)",
    )
    sub.add_argument(
        "--gate",
        metavar="VARIANT_ID",
        help="gate this uploaded variant (status pending) instead of making one (needs --evaluation)",
    )
    sub.add_argument("--no-wait", action="store_true", help="print the queued job and return at once")
    sub.add_argument(
        "--wait-timeout",
        type=argtypes.wait_seconds(),
        default=0.0,
        help="seconds to follow the job; 0 waits until done",
    )
    sub.add_argument(
        "--quiet", action="store_true", help="no progress bar or job line on stderr; the result still goes to stdout"
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_models_compress)

    jobs = nouns.add_parser("jobs", help="list, follow and cancel compression jobs").add_subparsers(
        dest="verb", required=True
    )
    sub = jobs.add_parser("list", help="list compression jobs, newest first")
    sub.add_argument("--model", help="only jobs of this model name")
    output_flag(sub)
    sub.set_defaults(handler=cmd_jobs_list)
    sub = jobs.add_parser("show", help="show one job")
    sub.add_argument("job_id")
    output_flag(sub)
    sub.set_defaults(handler=cmd_jobs_show)
    sub = jobs.add_parser("cancel", help="cancel a queued or running job; nothing it made is stored")
    sub.add_argument("job_id")
    output_flag(sub)
    sub.set_defaults(handler=cmd_jobs_cancel)
    sub = jobs.add_parser("wait", help="follow a job until it finishes and show its variants")
    sub.add_argument("job_id")
    sub.add_argument(
        "--wait-timeout", type=argtypes.wait_seconds(), default=0.0, help="seconds to wait; 0 waits until done"
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_jobs_wait)
