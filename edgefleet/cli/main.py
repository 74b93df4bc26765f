"""edgefleet: the operator CLI for devices, models, deployments and metrics.

Exit codes: 0 success, 1 the request failed, 2 invalid usage, arguments, API token, role or TLS
settings (a CA or host name that does not match the orchestrator's certificate), 3 not found,
4 conflict (already exists or a failed precondition), 69 the orchestrator is unreachable or not
serving, 75 a --wait or --wait-timeout ran out before the device or job finished, 130 interrupted
(Ctrl-C), 141 stdout closed early (a pipe into head).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from edgefleet.cli import rollout, views
from edgefleet.cli.argparser import CliArgumentParser
from edgefleet.common import argtypes
from edgefleet.common.config import dial_address_problem
from edgefleet.common.errors import DATABASE_UNAVAILABLE_TEXT, EXIT_UNAVAILABLE
from edgefleet.common.labels import label_problem
from edgefleet.common.models import is_tflite
from edgefleet.common.serde import MAX_QUERY_TIME, MIN_QUERY_TIME
from edgefleet.common.tls import CredentialsError, load_certificate, operator_channel
from edgefleet.common.units import human_bytes
from edgefleet.v1 import agent_pb2, common_pb2, operator_pb2, operator_pb2_grpc

# The orchestrator's operator port (TLS with API tokens); with --insecure one plaintext port serves all.
DEFAULT_ORCHESTRATOR = "127.0.0.1:50052"
DEFAULT_INSECURE_ORCHESTRATOR = "127.0.0.1:50051"
# The orchestrator's limit on deploy threads (edgefleet.orchestrator.handlers.deploy.MAX_THREADS), checked
# here too so that a huge --threads is a usage error and not a protobuf overflow.
MAX_DEPLOY_THREADS = 256
UPLOAD_CHUNK_BYTES = 1024 * 1024
# gRPC's status details when the server certificate does not name the host dialled (grpcio 1.85).
HOSTNAME_MISMATCH_TEXT = "Hostname Verification Check failed"
# OpenSSL's reason when the certificate chain does not verify against the trusted CA.
VERIFY_FAILED_TEXT = "CERTIFICATE_VERIFY_FAILED"
CERTIFICATE_FETCH_TIMEOUT_S = 5.0
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT = 1, 2, 3, 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command killed by SIGPIPE.
EXIT_TIMEOUT = 75  # EX_TEMPFAIL in sysexits.h: the work goes on, and waiting again may succeed.
STATUS_EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_CONFLICT,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_CONFLICT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_USAGE,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_USAGE,
}


# How long the CLI waits for the health check that distinguishes a slow call from an unreachable orchestrator:
# as long as --timeout, within these bounds. The lower bound lets a tiny --timeout still get a usable check,
# and the upper one keeps a silent or stopped server from doubling a long --timeout.
RESPONDS_MIN_TIMEOUT_S = 1.0
RESPONDS_TIMEOUT_S = 5.0


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """An OperatorService stub whose errors become CliError with the address in the message."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 30.0,
        *,
        token: str = "",
        ca_cert: Path | None = None,
        insecure: bool = False,
    ) -> None:
        """Open a TLS channel that trusts ca_cert and sends token with each call; plaintext with insecure.

        Raises CliError when ca_cert is missing or unreadable.
        """
        self.address = address
        self.timeout_s = timeout_s
        self.insecure = insecure
        try:
            self.channel = operator_channel(address, token=token, ca_cert=ca_cert, insecure=insecure)
        except CredentialsError as error:
            raise CliError(f"{error} (the CLI also reads EDGEFLEET_CA_CERT)", EXIT_USAGE) from None
        self.stub = operator_pb2_grpc.OperatorServiceStub(self.channel)

    def call(
        self, method: str, request: Any, *, timeout_s: float | None = None, flags: dict[str, str] | None = None
    ) -> Any:
        """Call method and return its response. Raises CliError, which names flags[field] for a request field."""
        timeout_s = timeout_s or self.timeout_s
        try:
            return getattr(self.stub, method)(request, timeout=timeout_s)
        except grpc.RpcError as error:
            raise with_flag_names(self.error(error, timeout_s), flags or {}) from None

    def error(self, error: grpc.RpcError, timeout_s: float | None = None) -> CliError:
        """Turn a failed call's status into a CliError; timeout_s is the deadline the call had."""
        code = error.code()
        details = error.details()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.responds(timeout_s or self.timeout_s):
            timeout_s = timeout_s or self.timeout_s
            return CliError(
                f"the orchestrator at {self.address} did not finish the call within --timeout {timeout_s:g} s; "
                "it may still be working on it (a query over a long range or a large fleet takes longer), "
                "so retry with a larger --timeout",
                EXIT_UNAVAILABLE,
            )
        if code == grpc.StatusCode.UNAVAILABLE and HOSTNAME_MISMATCH_TEXT in details:
            return CliError(self.hostname_mismatch_message(), EXIT_USAGE)
        if code == grpc.StatusCode.UNAVAILABLE and VERIFY_FAILED_TEXT in details:
            reason = details.rpartition(VERIFY_FAILED_TEXT + ":")[2].removesuffix(": OK").strip() or "failed"
            return CliError(
                f"the TLS certificate of the orchestrator at {self.address} did not verify ({reason}); "
                "pass the fleet CA that issued it with --ca-cert or EDGEFLEET_CA_CERT, "
                "and check that the certificate has not expired",
                EXIT_USAGE,
            )
        if code == grpc.StatusCode.UNAVAILABLE and details.startswith(DATABASE_UNAVAILABLE_TEXT):
            return CliError(f"the orchestrator at {self.address} responded, but {details}", EXIT_UNAVAILABLE)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            # The agents' port requires a client certificate, which the CLI does not have, so the server
            # ends the handshake and gRPC reports a closed socket.
            agents_port = ""
            if "Socket closed" in details and not self.insecure:
                agents_port = (
                    " If that is the agents' port (mutual TLS), use the operator port "
                    "(--operator-listen, 50052 by default)."
                )
            return CliError(
                f"cannot reach the orchestrator at {self.address} ({code.name.lower()}: {details}); "
                f"is it running? Set --orchestrator or EDGEFLEET_ORCHESTRATOR.{agents_port}",
                EXIT_UNAVAILABLE,
            )
        return CliError(f"{code.name.lower().replace('_', ' ')}: {details}", STATUS_EXIT_CODES.get(code, EXIT_FAILED))

    def responds(self, timeout_s: float) -> bool:
        """Return whether the orchestrator responds to a health check within timeout_s, bounded as above."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        check_timeout_s = min(max(timeout_s, RESPONDS_MIN_TIMEOUT_S), RESPONDS_TIMEOUT_S)
        try:
            health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=check_timeout_s)
        except grpc.RpcError:
            return False
        return True

    def hostname_mismatch_message(self) -> str:
        """Return the error for a server certificate that does not name the host in the address."""
        host, port = split_host_port(self.address)
        names = certificate_names(host, port, min(self.timeout_s, CERTIFICATE_FETCH_TIMEOUT_S))
        named = f"; it names {', '.join(names)}" if names else ""
        example = f" such as {join_host_port(names[0], port)}" if names else ""
        return (
            f"the orchestrator's TLS certificate does not name {host}, the host in {self.address}{named}. "
            f"Connect with --orchestrator to an address the certificate names{example}, or create a certificate "
            f"for this host with `edgefleet pki init --dir NEW_DIR --host {host}` (a new fleet CA)"
        )


def orchestrator_address(value: str) -> str:
    """Return value if it is an orchestrator's HOST:PORT. This is the argparse type of --orchestrator.

    argparse applies it to the EDGEFLEET_ORCHESTRATOR default as well. Raises ArgumentTypeError naming the
    value and the fix, so a mistyped port does not send the API token to another service.
    """
    problem = dial_address_problem(value, "the orchestrator's operator port (--operator-listen, default 50052)")
    if problem:
        raise argparse.ArgumentTypeError(
            f"invalid value {value!r}: {problem}; set --orchestrator or EDGEFLEET_ORCHESTRATOR"
        )
    return value


def environment_orchestrator() -> str:
    """Return EDGEFLEET_ORCHESTRATOR, or "" when unset. Raise CliError naming it when it is not HOST:PORT.

    It is read only by commands that connect, so a stale value does not stop pki or completion.
    """
    value = os.environ.get("EDGEFLEET_ORCHESTRATOR", "")
    if not value:
        return ""
    try:
        return orchestrator_address(value)
    except argparse.ArgumentTypeError as error:
        raise CliError(f"environment variable EDGEFLEET_ORCHESTRATOR: {error}", EXIT_USAGE) from None


def split_host_port(address: str) -> tuple[str, int | None]:
    """Split HOST:PORT or [IPV6]:PORT; the port is None when it is missing or not a number."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:
        return address.strip("[]"), None
    return host.strip("[]"), int(port) if port.isdigit() else None


def join_host_port(host: str, port: int | None) -> str:
    """Return HOST:PORT, with brackets around an IPv6 host."""
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


def certificate_names(host: str, port: int | None, timeout_s: float) -> list[str]:
    """Return the DNS names and IP addresses in the server certificate at host:port; [] when it cannot be read.

    The certificate is fetched without verification: the names only go into an error message.
    """
    if port is None:
        return []
    from cryptography import x509

    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout_s)
        certificate = load_certificate(pem.encode())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def emit(data: Any, output: str, render: Callable[[Any], str]) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, sort_keys=False))
    else:
        print(render(data))


def split_model_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition(":")
    return name, version


TIME_FORMS = (
    "use ISO 8601 (2026-12-04T10:00:00Z) or a duration back from now (30s, 15m, 2h, 1d), "
    f"for a time from {MIN_QUERY_TIME:%Y-%m-%d} to {MAX_QUERY_TIME:%Y-%m-%d}"
)
# How far --since may lie after this machine's clock before it is rejected as a time in the future.
# The orchestrator's clock may run ahead of this one, and it places a window at the start the device
# sent unless that start is more than its --max-clock-skew-s (default 60 s) after the window arrived.
MAX_SINCE_AHEAD_S = 60.0
DEFAULT_GROUP_BY = "device,model,variant"
DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_time(value: str) -> datetime:
    """Parse an ISO 8601 time or a duration back from now such as 15m, 2h, 30s, 1d into an aware datetime in UTC.

    A time without a zone is in the local time zone of this machine (the TZ environment variable, else
    /etc/localtime), as date and journalctl read it. A time with Z or an offset is taken as given.
    Raises CliError (usage) for other text and for a time outside MIN_QUERY_TIME to MAX_QUERY_TIME.
    """
    invalid = CliError(f"invalid time {value!r}: {TIME_FORMS}", EXIT_USAGE)
    match = DURATION_PATTERN.fullmatch(value)
    try:
        if match:
            seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
            parsed = datetime.now(UTC) - timedelta(seconds=seconds)
        else:
            parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError):
        # OverflowError: a duration reaching back before year 1 (99999999d).
        raise invalid from None
    try:
        # astimezone() reads a naive datetime as local time.
        parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        # A local time at either end of the datetime range can leave it when converted to UTC.
        raise invalid from None
    if not MIN_QUERY_TIME <= parsed <= MAX_QUERY_TIME:
        raise invalid
    return parsed


def parse_since(value: str) -> datetime:
    """Parse --since with parse_time, and reject a time more than MAX_SINCE_AHEAD_S after now (exit 2).

    Such a start matches no window, so the query would print an empty table and hide the mistake,
    which is most often a time without a zone that was meant in another zone.
    """
    since = parse_time(value)
    now = datetime.now(UTC)
    if since <= now + timedelta(seconds=MAX_SINCE_AHEAD_S):
        return since
    zone_note = ""
    if not DURATION_PATTERN.fullmatch(value) and datetime.fromisoformat(value).tzinfo is None:
        local = datetime.fromisoformat(value).astimezone()
        zone_note = (
            f"; a time without a zone is local time on this machine ({local.tzname()}, UTC{local:%z}), "
            "so add Z for UTC or an offset such as +01:00"
        )
    raise CliError(
        f"invalid --since {value!r}: it is {since:%Y-%m-%dT%H:%M:%SZ}, after the current time "
        f"{now:%Y-%m-%dT%H:%M:%SZ}{zone_note}; give a time in the past or a duration back from now such as 15m",
        EXIT_USAGE,
    )


# The QueryMetricsRequest fields that the metrics commands set from their flags, as the orchestrator names
# them in errors.
METRIC_FLAGS = {
    "device_id": "--device",
    "model_name": "--model",
    "variant_id": "--variant",
    "hardware_class": "--hardware-class",
    "group_by": "--group-by",
    "bucket_seconds": "--bucket",
    "start": "--since",
    "end": "--until",
}
# The longest --bucket of `metrics plot`, the orchestrator's limit on QueryMetricsRequest.bucket_seconds
# (24 times MAX_WINDOW_SECONDS in edgefleet.orchestrator.handlers.metrics).
MAX_PLOT_BUCKET_S = 86_400


def metric_filters(args: argparse.Namespace) -> dict[str, str]:
    """Return the QueryMetricsRequest filter fields from --device, --model, --variant and --hardware-class.

    Raises CliError (usage) for --model NAME:VERSION, because the query filters by model name only.
    """
    model = args.model or ""
    if ":" in model:
        name, _, version = model.partition(":")
        raise CliError(
            f"invalid --model {model!r}: metrics filter by model name only, so pass --model {name} and "
            f"filter one version with --variant {name}:{version}:KIND (`edgefleet models variants {model}` "
            "lists the variant ids), or group rows by version with --group-by variant",
            EXIT_USAGE,
        )
    return {
        "device_id": args.device or "",
        "model_name": model,
        "variant_id": args.variant or "",
        "hardware_class": args.hardware_class or "",
    }


# Devices


def render_devices(devices: list[dict[str, Any]]) -> str:
    rows = [
        (
            d["device_id"],
            status_column(d),
            d["profile"] or "-",
            f"{d['usable_cores']:g}",
            human_bytes(d["memory_bytes"]),
            ",".join(r["name"] for r in d["runtimes"]) or "-",
            models_column(d),
            views.age(d["last_seen"]),
            ",".join(sorted({entry["kind"] for entry in d["drift"]})) or "-",
        )
        for d in devices
    ]
    return views.table(
        ("DEVICE", "STATUS", "PROFILE", "CORES", "MEMORY", "RUNTIMES", "MODELS", "LAST SEEN", "DRIFT"), rows
    )


def status_column(d: dict[str, Any]) -> str:
    """Return the device's status, or revoked, with ", clock skewed" when its clock is flagged."""
    status = "revoked" if d["revoked"] else d["status"]
    if d["clock_skewed"]:
        status += ", clock skewed"
    return status


def models_column(d: dict[str, Any]) -> str:
    """Return MODEL:STATE pairs, marked as the last report with its age unless the device is online."""
    if not d["models"]:
        return "-"
    return ",".join(f"{m['model']}:{m['state']}" for m in d["models"]) + views.last_report_note(d)


def render_device(d: dict[str, Any]) -> str:
    lines = [
        f"device:        {d['device_id']} ({d['status']}{', revoked' if d['revoked'] else ''}, "
        f"last seen {views.age(d['last_seen'])})",
        f"profile:       {d['profile'] or '-'}   class: {d['hardware_class']}",
        f"cpu:           {d['cpu_model']} ({d['architecture']}), "
        f"{d['usable_cores']:g} usable of {d['logical_cores']} cores",
        f"cpu features:  {', '.join(d['cpu_features']) or '-'}",
        f"memory:        {human_bytes(d['memory_bytes'])} ({human_bytes(d['memory_available_bytes'])} available)",
        f"disk free:     {human_bytes(d['disk_free_bytes'])}",
        "accelerators:  " + (", ".join(f"{a['kind']} {a['vendor']} {a['name']}" for a in d["accelerators"]) or "none"),
        "runtimes:      "
        + ("; ".join(f"{r['name']} {r['version']} [{', '.join(r['providers'])}]" for r in d["runtimes"]) or "none"),
        f"os:            {d['os']} (kernel {d['kernel']})",
        f"labels:        {', '.join(f'{k}={v}' for k, v in sorted(d['labels'].items())) or '-'}",
        f"generations:   desired {d['desired_generation']}, reported {d['reported_generation']}",
        "signing keys:  "
        + (
            f"{', '.join(d['trusted_keys']['key_ids'])} (key set version {d['trusted_keys']['version']})"
            if d["trusted_keys"]
            else "not reported"
        ),
    ]
    if d["models"]:
        lines.append("models:")
        lines.append(
            views.table(
                ("  MODEL", "VARIANT", "STATE", "RUNTIME", "PROVIDERS", "THREADS", "ERROR"),
                [
                    (
                        "  " + m["model"],
                        m["variant_id"],
                        m["state"] + views.last_report_note(d),
                        m["runtime"] or "-",
                        ",".join(m["providers"]) or "-",
                        m["threads"] or "-",
                        m["error"] or "",
                    )
                    for m in d["models"]
                ],
            )
        )
    if d["clock_skewed"]:
        lines.append(
            f"WARNING: the device clock is {views.clock_skew_text(d)}, past the orchestrator's "
            "--max-clock-skew-s, so its metric windows are placed at their receive time in queries; "
            "fix the device's time synchronization (NTP)"
        )
    for conflict in d["identity_conflicts"]:
        lines.append(
            f"WARNING: another agent claimed this id from {conflict['peer']} at {conflict['seen_at']} "
            f"(key {conflict['instance_key_fingerprint']})"
        )
    if d["drift"]:
        lines.append(rollout.render_drift(d["drift"]))
    return "\n".join(lines)


def cmd_devices_list(client: Client, args: argparse.Namespace) -> None:
    labels = dict(pair.split("=", 1) for pair in args.label)
    status: Any = {"online": 1, "stale": 2, "offline": 3}.get(args.status or "", 0)
    request = operator_pb2.ListDevicesRequest(status=status, label_selector=labels, drift_only=args.drift)
    devices: list[dict[str, Any]] = []
    while True:
        response = client.call("ListDevices", request)
        devices.extend(device_view(d) for d in response.devices)
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    emit(devices, args.output, render_devices)


def cmd_devices_show(client: Client, args: argparse.Namespace) -> None:
    device = client.call("GetDevice", operator_pb2.GetDeviceRequest(device_id=args.device_id))
    emit(device_view(device), args.output, render_device)


def device_view(device: operator_pb2.Device) -> dict[str, Any]:
    """Return the device's view with its drift between desired and reported state."""
    return {**views.device_view(device), "drift": rollout.drift_view(device)}


# Models


def upload_requests(
    path: Path, header: operator_pb2.UploadModelHeader, progress: bool
) -> Iterator[operator_pb2.UploadModelRequest]:
    yield operator_pb2.UploadModelRequest(header=header)
    sent = 0
    started = time.monotonic()
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK_BYTES):
            sent += len(chunk)
            if progress:
                done = sent / max(header.size_bytes, 1)
                bar = "#" * int(done * 30)
                rate = sent / max(time.monotonic() - started, 1e-6) / 1e6
                print(
                    f"\rupload {path.name} [{bar:<30}] {done:6.1%} {rate:7.1f} MB/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            yield operator_pb2.UploadModelRequest(chunk=chunk)
    if progress:
        print(file=sys.stderr)


# The upload kinds that the orchestrator stores as pending until a gate job measures them; the same as
# edgefleet.orchestrator.handlers.catalog.GATED_UPLOAD_KINDS, which a test keeps equal.
GATED_UPLOAD_KINDS = ("fp16", "int8", "pruned", "distilled", "tflite-fp16", "tflite-int8")


def declared_format(path: Path, head: bytes) -> Any:
    """Return the format an upload header declares for a file that starts with head, or 0 (unspecified).

    A declared format lets the orchestrator reject a --variant-kind of the other format before the file
    is sent. TFLite is detected from the content with the orchestrator's rule; ONNX has no such marker,
    so only an .onnx name declares it, and other files are left to the orchestrator's detection.
    """
    if is_tflite(head):
        return common_pb2.MODEL_FORMAT_TFLITE
    if path.suffix.lower() == ".onnx":
        return common_pb2.MODEL_FORMAT_ONNX
    return common_pb2.MODEL_FORMAT_UNSPECIFIED


def cmd_models_add(client: Client, args: argparse.Namespace) -> None:
    import hashlib

    check_gate_flags(args)
    path: Path = args.path
    if path.is_dir():
        raise CliError(f"{path} is a directory; give the path of an .onnx or .tflite model file", EXIT_USAGE)
    if not path.exists():
        raise CliError(f"model file {path} not found", EXIT_USAGE)
    if not path.is_file():
        raise CliError(f"{path} is not a regular file; give the path of an .onnx or .tflite model file", EXIT_USAGE)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            digest.update(head)
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as error:
        raise CliError(f"cannot read model file {path}: {error.strerror or error}", EXIT_USAGE) from None
    if not head:
        raise CliError(f"model file {path} is empty (0 bytes); give an .onnx or .tflite model file", EXIT_USAGE)
    header = operator_pb2.UploadModelHeader(
        name=args.name,
        version=args.version,
        format=declared_format(path, head),
        size_bytes=path.stat().st_size,
        sha256=digest.hexdigest(),
        filename=path.name,
        variant_kind=args.variant_kind or "",
    )
    show_progress = sys.stderr.isatty() and not args.quiet
    try:
        model = client.stub.UploadModel(upload_requests(path, header, show_progress), timeout=600)
    except grpc.RpcError as error:
        raise with_flag_names(client.error(error), UPLOAD_HEADER_FLAGS) from None
    if args.evaluation is None:
        emit(views.model_view(model), args.output, render_model)
        return
    from edgefleet.cli import compress

    variant_id = f"{args.name}:{args.version}:{args.variant_kind}"
    if not args.quiet:
        print(f"stored {variant_id} as pending; the gate measures it next", file=sys.stderr)
    recipe = compress.gate_recipe(variant_id, args.evaluation, args.max_accuracy_drop)
    wait_timeout = args.wait_timeout or 0.0
    compress.run_job(
        client,
        args.name,
        args.version,
        recipe,
        no_wait=args.no_wait,
        wait_timeout=wait_timeout,
        output=args.output,
        quiet=args.quiet,
        pending_variant=variant_id,
    )


# The fields of UploadModelHeader that `models add` fills from its flags, as the orchestrator names them in errors.
UPLOAD_HEADER_FLAGS = {"header.name": "--name", "header.version": "--version", "header.variant_kind": "--variant-kind"}


def with_flag_names(error: CliError, flags: dict[str, str]) -> CliError:
    """Return error with each request field of flags in its message ("invalid budget_ms:") replaced by its flag."""
    message = str(error)
    for field, flag in flags.items():
        message = message.replace(f"invalid {field}:", f"invalid {flag}:")
    return CliError(message, error.code)


def check_gate_flags(args: argparse.Namespace) -> None:
    """Raise CliError when the gate flags of `models add` are given for a kind that the gate does not measure."""
    gate_flags = [
        flag
        for flag, given in (
            ("--max-accuracy-drop", args.max_accuracy_drop is not None),
            ("--no-wait", args.no_wait),
            ("--wait-timeout", args.wait_timeout is not None),
        )
        if given
    ]
    if args.evaluation is None:
        if gate_flags:
            raise CliError(f"{', '.join(gate_flags)} given without --evaluation; they apply to the gate", EXIT_USAGE)
        return
    if args.variant_kind not in GATED_UPLOAD_KINDS:
        raise CliError(
            f"--evaluation applies to uploaded variants that the gate measures (--variant-kind "
            f"{', '.join(GATED_UPLOAD_KINDS)}), not to {args.variant_kind or 'a new version'}",
            EXIT_USAGE,
        )


def render_models(models: list[dict[str, Any]]) -> str:
    rows = [
        (
            m["name"],
            m["version"],
            m["format"],
            m["precision"],
            human_bytes(m["size_bytes"]),
            views.human_count(m["macs"]),
            views.human_count(m["parameters"], millions_digits=2),
            len(m["variants"]),
            m["created_at"],
        )
        for m in models
    ]
    return views.table(
        ("NAME", "VERSION", "FORMAT", "PRECISION", "SIZE", "MACS", "PARAMS", "VARIANTS", "CREATED"), rows
    )


def render_model(m: dict[str, Any]) -> str:
    lines = [
        f"model:      {m['name']}:{m['version']} ({m['format']}, opset {m['opset']}, {m['precision']})",
        f"digest:     {m['digest']}",
        f"size:       {human_bytes(m['size_bytes'])}   parameters: {m['parameters']:,}   layers: {m['layers']}",
        f"cost:       {m['macs']:,} MACs per inference; "
        f"peak activations about {human_bytes(m['peak_activation_bytes'])}",
        "inputs:     " + "; ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in m["inputs"]),
        "outputs:    " + "; ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in m["outputs"]),
        "variants:",
        render_variants(m["variants"]),
    ]
    return "\n".join(lines)


VARIANT_COLUMNS = (
    "VARIANT",
    "FORMAT",
    "PRECISION",
    "STATUS",
    "SIZE",
    "MACS",
    "ACCURACY",
    "DROP PT",
    "SAMPLES",
    "LATENCY P50",
    "SPEEDUP",
    "REASON",
)


def render_variants(variants: list[dict[str, Any]]) -> str:
    rows = [
        (
            v["variant_id"],
            v["format"],
            v["precision"],
            v["status"],
            human_bytes(v["size_bytes"]),
            views.human_count(v["macs"]),
            _render_accuracy(v),
            "-" if v["accuracy_drop"] is None else f"{v['accuracy_drop']:.2f}",
            v["evaluation_samples"] or "-",
            " ".join(f"{k}:{val:.3g}ms" for k, val in sorted(v["latency_ms"].items())) or "-",
            _render_speedup(v),
            v["rejection_reason"],
        )
        for v in variants
    ]
    return views.table(VARIANT_COLUMNS, rows)


# Short names of Variant.accuracy_metric for the ACCURACY column.
ACCURACY_METRIC_NAMES = {"top1": "top1", "top1_agreement": "agree"}


def _render_accuracy(variant: dict[str, Any]) -> str:
    """Render the accuracy with its metric: "top1 0.8125" against labels, "agree 0.9062" with the source."""
    if variant["accuracy"] is None:
        return "-"
    metric = ACCURACY_METRIC_NAMES.get(variant["accuracy_metric"], variant["accuracy_metric"])
    return f"{metric} {variant['accuracy']:.4f}".strip()


def _render_speedup(variant: dict[str, Any]) -> str:
    """Render the gate's speed-up over the source by thread count, with SLOWER when it is below 1 at any."""
    speedups = variant["speedup"]
    if not speedups:
        return "-"
    text = " ".join(f"{key}:{value:.2f}x" for key, value in sorted(speedups.items()))
    return f"{text} SLOWER" if variant["slower_than_source"] else text


def cmd_models_list(client: Client, args: argparse.Namespace) -> None:
    response = client.call("ListModels", operator_pb2.ListModelsRequest(name=args.name or ""))
    emit([views.model_view(m) for m in response.models], args.output, render_models)
    if args.name and not response.models:
        # A filter that matches nothing is not an error, but a mistyped name should not pass unnoticed.
        print(f"no model named {args.name!r}; `edgefleet models list` shows every name", file=sys.stderr)


def cmd_models_show(client: Client, args: argparse.Namespace) -> None:
    name, version = split_model_ref(args.model)
    model = client.call("GetModel", operator_pb2.GetModelRequest(name=name, version=version))
    emit(views.model_view(model), args.output, render_model)


def cmd_models_variants(client: Client, args: argparse.Namespace) -> None:
    name, version = split_model_ref(args.model)
    response = client.call("ListVariants", operator_pb2.ListVariantsRequest(model_name=name, model_version=version))
    emit([views.variant_view(v) for v in response.variants], args.output, render_variants)


def cmd_models_delete(client: Client, args: argparse.Namespace) -> None:
    name, version = split_model_ref(args.model)
    if not version:
        raise CliError(
            f"invalid model {args.model!r}: name the version to delete as NAME:VERSION; "
            f"`edgefleet models list --name {name}` lists them",
            EXIT_USAGE,
        )
    request = operator_pb2.DeleteModelRequest(name=name, version=version, variant_id=args.variant or "")
    response = client.call("DeleteModel", request)
    result = {
        "model": f"{name}:{version}",
        "deleted_variant_ids": list(response.deleted_variant_ids),
        "removed_digests": list(response.removed_digests),
    }
    emit(result, args.output, render_deleted)


def render_deleted(result: dict[str, Any]) -> str:
    rows = [("variant", variant_id) for variant_id in result["deleted_variant_ids"]]
    rows += [("artifact", digest) for digest in result["removed_digests"]]
    return f"deleted from {result['model']}:\n" + views.table(("TYPE", "ID"), rows)


# Deployments


def cmd_deploy(client: Client, args: argparse.Namespace) -> None:
    name, version = split_model_ref(args.model)
    # Read before the deploy, which the next engine tick records on the wave.
    held_by = rollout.waves_waiting_on(client, name, args.device)
    response = client.call(
        "Deploy",
        operator_pb2.DeployRequest(
            model_name=name,
            model_version=version,
            device_id=args.device,
            variant_id=args.variant or "",
            threads=args.threads,
            rollback=args.rollback,
        ),
    )
    assignment = response.assignment
    for wave in held_by:
        print(
            f"edgefleet: warning: device {args.device} was in {wave}, which waited for its samples; the wave "
            "no longer gates it, and a rollback of that rollout leaves it on this assignment",
            file=sys.stderr,
        )
    device = views.device_view(response.device)
    if args.wait > 0:
        generation = response.device.desired_generation
        device = wait_for_state(client, args.device, assignment, generation, args.wait)
    result = {
        "device_id": args.device,
        "model": assignment.model_name,
        "version": assignment.model_version,
        "variant_id": assignment.variant_id,
        "digest": assignment.digest,
        "threads": assignment.threads,
        "requested_threads": args.threads,
        "notice": threads_notice(args.threads, assignment.threads, device),
        "desired_generation": device["desired_generation"],
        "reported_generation": device["reported_generation"],
        "device_status": device["status"],
        "last_seen": device["last_seen"],
        # Only the assigned variant's status counts; an older variant may still be serving until the device applies it.
        "state": next(
            (
                m
                for m in device["models"]
                if m["model"] == assignment.model_name and m["variant_id"] == assignment.variant_id
            ),
            None,
        ),
    }
    emit(result, args.output, render_deploy)
    state = result["state"]
    # A failure reported for an earlier desired state is not a result of this deploy.
    if state is not None and state["state"] == "failed" and not reported_before(result):
        raise CliError(f"device {args.device} failed to run {assignment.variant_id}: {state['error']}")


def reported_before(result: dict[str, Any]) -> bool:
    """Return whether the device's model states in a deploy result predate the deploy's desired state."""
    return bool(result["reported_generation"] < result["desired_generation"])


def threads_notice(requested: int, assigned: int, device: dict[str, Any]) -> str:
    """Return why the orchestrator lowered the requested thread count, or "" when it kept it."""
    if not requested or assigned >= requested:
        return ""
    return (
        f"requested {requested} threads, lowered to {assigned}: device {device['device_id']} has "
        f"{device['usable_cores']:g} usable cores, and threads beyond them add no speed"
    )


def wait_for_state(
    client: Client, device_id: str, assignment: agent_pb2.ModelAssignment, generation: int, timeout_s: float
) -> dict[str, Any]:
    """Poll the device until it reports the assigned variant serving or failed, or timeout_s passes.

    Only a report of desired generation `generation` or later counts. An earlier one may show the same
    variant serving as it ran before this deploy, with other threads, or before a failed deploy.
    """
    model, variant_id = assignment.model_name, assignment.variant_id
    deadline = time.monotonic() + timeout_s
    while True:
        device = views.device_view(client.call("GetDevice", operator_pb2.GetDeviceRequest(device_id=device_id)))
        status = next((m for m in device["models"] if m["model"] == model and m["variant_id"] == variant_id), None)
        applied = device["reported_generation"] >= generation
        if applied and status is not None and status["state"] in ("serving", "failed"):
            return device
        if time.monotonic() > deadline:
            state_text = status["state"] + views.last_report_note(device) if status else "not reported yet"
            if not applied:
                state_text += f"; the device reports generation {device['reported_generation']} of {generation}"
            raise CliError(
                f"timed out after {timeout_s:g} s waiting for {variant_id} on {device_id} (state: {state_text})",
                EXIT_TIMEOUT,
            )
        time.sleep(0.5)


def render_deploy(result: dict[str, Any]) -> str:
    state = result["state"]
    line = f"{result['variant_id']} -> {result['device_id']} (desired generation {result['desired_generation']})"
    if state is None:
        line += ": not reported yet"
    else:
        detail = (
            state["error"]
            if state["state"] == "failed"
            else f"{state['runtime']} {','.join(state['providers'])} threads={state['threads']}"
        )
        note = views.last_report_note({"status": result["device_status"], "last_seen": result["last_seen"]})
        if reported_before(result):
            note += f" (reported for generation {result['reported_generation']}, before this deploy)"
        line = f"{line}: {state['state']}{note} {detail}".rstrip()
    if result["notice"]:
        line += f"\nnote: {result['notice']}"
    return line


# Metrics


def parse_range(since_text: str | None, until_text: str | None) -> tuple[datetime | None, datetime | None]:
    """Parse --since and --until of the metrics commands, either of which may be None.

    Raises CliError (usage) for an invalid time, a --since in the future or a --since not before --until.
    """
    since = parse_since(since_text) if since_text else None
    until = parse_time(until_text) if until_text else None
    if since is not None and until is not None and since >= until:
        durations = DURATION_PATTERN.fullmatch(since_text or "") and DURATION_PATTERN.fullmatch(until_text or "")
        hint = "a duration counts back from now, so give --since the longer one" if durations else "swap them"
        raise CliError(
            f"invalid range: --since {since_text} ({since:%Y-%m-%dT%H:%M:%SZ}) is not before --until {until_text} "
            f"({until:%Y-%m-%dT%H:%M:%SZ}); {hint} (--since {until_text} --until {since_text})",
            EXIT_USAGE,
        )
    return since, until


def cmd_metrics_query(client: Client, args: argparse.Namespace) -> None:
    # Repeated flags add up: --group-by device --group-by model is --group-by device,model.
    group_by = ",".join(args.group_by) if args.group_by else DEFAULT_GROUP_BY
    keys = [key.strip() for key in group_by.split(",") if key.strip()]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise CliError(
            f"invalid --group-by {group_by!r}: {', '.join(repeated)} is given more than once; name each key once",
            EXIT_USAGE,
        )
    request = operator_pb2.QueryMetricsRequest(group_by=keys)
    for name, value in metric_filters(args).items():
        setattr(request, name, value)
    since, until = parse_range(args.since, args.until)
    if since is not None:
        request.start.FromDatetime(since)
    if until is not None:
        request.end.FromDatetime(until)
    response = client.call("QueryMetrics", request, flags=METRIC_FLAGS)
    rows = [views.metric_row_view(r) for r in response.rows]

    def render(data: list[dict[str, Any]]) -> str:
        return views.table(
            (*[k.upper() for k in keys], "INFERENCES", "ERRORS", "PER S", "P50 MS", "P95 MS", "P99 MS"),
            [
                (
                    *[r.get(k) for k in keys],
                    r["inferences"],
                    r["errors"],
                    r["throughput_per_s"],
                    r["p50_ms"],
                    r["p95_ms"],
                    r["p99_ms"],
                )
                for r in data
            ],
        )

    emit(rows, args.output, render)


def cmd_metrics_plot(client: Client, args: argparse.Namespace) -> None:
    from edgefleet.cli.plot import output_path, plot_latency

    filters = metric_filters(args)
    if not any(filters.values()):
        raise CliError("name what to plot: --device, --model, --variant or --hardware-class", EXIT_USAGE)
    try:
        out = output_path(args.out)
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    start, end = parse_range(args.since, args.until)
    assert start is not None, "--since has a default"
    if args.bucket is None:
        bucket = automatic_bucket(((end or datetime.now(UTC)) - start).total_seconds())
    else:
        bucket = parse_bucket(args.bucket)
    series_request = operator_pb2.QueryMetricsRequest(bucket_seconds=bucket)
    overall_request = operator_pb2.QueryMetricsRequest(include_sketch=True)
    for request in (series_request, overall_request):
        for name, value in filters.items():
            setattr(request, name, value)
        request.start.FromDatetime(start)
        if end is not None:
            request.end.FromDatetime(end)
    series = client.call("QueryMetrics", series_request, flags=METRIC_FLAGS).rows
    overall = client.call("QueryMetrics", overall_request, flags=METRIC_FLAGS).rows
    if not overall or not overall[0].inference_count:
        until_text = f" until {args.until}" if args.until else ""
        raise CliError(
            f"no latency windows match {filters_text(filters)} since {args.since}{until_text}", EXIT_NOT_FOUND
        )
    try:
        path = plot_latency(list(series), overall[0], filters_text(filters), out)
    except OSError as error:
        raise CliError(
            f"cannot write --out {out}: {error.strerror or error}; give a file path in a writable folder", EXIT_USAGE
        ) from None
    result = {
        "path": str(path),
        "inferences": overall[0].inference_count,
        "buckets": len(series),
        "bucket_seconds": bucket,
    }
    emit(result, args.output, render_plot)


# The buckets `metrics plot` chooses from without --bucket, and the most points it draws with them.
AUTOMATIC_BUCKETS_S = (10, 60, 300, 900, 3600, 6 * 3600, 24 * 3600)
MAX_AUTOMATIC_POINTS = 360


def automatic_bucket(range_s: float) -> int:
    """Return the shortest of AUTOMATIC_BUCKETS_S that splits range_s into at most MAX_AUTOMATIC_POINTS buckets."""
    # Whole seconds: the range is measured a little after --since was read, so 1h is 3600.0x s here.
    for bucket in AUTOMATIC_BUCKETS_S:
        if int(range_s) / bucket <= MAX_AUTOMATIC_POINTS:
            return bucket
    return AUTOMATIC_BUCKETS_S[-1]


def render_plot(result: dict[str, Any]) -> str:
    return (
        f"wrote {result['path']} ({result['inferences']} inferences in {result['buckets']} buckets "
        f"of {result['bucket_seconds']} s)"
    )


def filters_text(filters: dict[str, str]) -> str:
    return ", ".join(
        f"{key.removesuffix('_id').removesuffix('_name')}={value}" for key, value in filters.items() if value
    )


def parse_bucket(value: str) -> int:
    """Parse the --bucket of `metrics plot` (10s, 5m, 1h) into whole seconds.

    Raises CliError for other text and for more than MAX_PLOT_BUCKET_S, which the orchestrator rejects.
    """
    match = re.fullmatch(r"(\d+)([smh]?)", value)
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)] if match else 0
    if not 1 <= seconds <= MAX_PLOT_BUCKET_S:
        raise CliError(
            f"invalid --bucket {value!r}: give whole seconds or a duration such as 10s, 5m or 1h, "
            f"from 1 s to 24h ({MAX_PLOT_BUCKET_S} s)",
            EXIT_USAGE,
        )
    return seconds


def cmd_health(client: Client, args: argparse.Namespace) -> None:
    """Check the orchestrator's grpc.health.v1 status; exit 69 unless it is SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(client.channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=client.timeout_s)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:  # grpc.health.v1 sends no details for an unknown service.
            raise CliError(
                f"the orchestrator at {client.address} has no service {args.service!r}; use "
                "edgefleet.v1.OperatorService, edgefleet.v1.AgentService, or no --service for the whole server",
                EXIT_NOT_FOUND,
            ) from None
        raise client.error(error) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    emit({"address": client.address, "service": args.service, "status": status}, args.output, lambda r: r["status"])
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise CliError(f"orchestrator at {client.address} is {status}", EXIT_UNAVAILABLE)


def cmd_demo(args: argparse.Namespace) -> int:
    from edgefleet.demo.run import run_demo

    return run_demo(
        report_path=args.report, duration_s=args.duration, work_dir=args.work_dir, json_output=args.output == "json"
    )


# The forms of --since and --until, for their help.
TIME_HELP = "ISO 8601 time, in this machine's time zone unless it ends in Z or an offset, or a duration back from now"


def metric_filter_flags(sub: argparse.ArgumentParser) -> None:
    """Add the --device, --model, --variant and --hardware-class filters of the metrics commands."""
    sub.add_argument("--device", metavar="DEVICE_ID", help="only windows of this device")
    sub.add_argument(
        "--model",
        metavar="NAME",
        help="only windows of this model name, all versions (filter a version with --variant)",
    )
    sub.add_argument("--variant", metavar="VARIANT_ID", help="only windows of this variant (NAME:VERSION:KIND)")
    sub.add_argument(
        "--hardware-class", metavar="CLASS", help="only windows of devices in this hardware class (see devices show)"
    )


OUTPUT_FORMATS = ("table", "json")
# The orchestrator's rule for model names and versions (NAME_PATTERN in edgefleet.orchestrator.validation).
NAME_RULE = "1 to 128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


def output_flag_of_command(sub: argparse.ArgumentParser) -> None:
    """Add --output/-o to a command, so that it is accepted before and after the command's name.

    The default is SUPPRESS, so a command given no --output keeps the value of the top-level flag
    instead of resetting it to table.
    """
    sub.add_argument("--output", "-o", choices=OUTPUT_FORMATS, default=argparse.SUPPRESS, help="output format")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = CliArgumentParser(
        prog="edgefleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--orchestrator",
        type=orchestrator_address,
        help="orchestrator operator HOST:PORT (env EDGEFLEET_ORCHESTRATOR, default "
        f"{DEFAULT_ORCHESTRATOR}, or {DEFAULT_INSECURE_ORCHESTRATOR} with --insecure)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("EDGEFLEET_TOKEN", ""),
        help="API token (env EDGEFLEET_TOKEN); `edgefleet tokens create` makes one",
    )
    parser.add_argument(
        "--ca-cert",
        type=Path,
        default=os.environ.get("EDGEFLEET_CA_CERT") or None,
        help="PEM file of the fleet CA that the orchestrator's certificate chains to (env EDGEFLEET_CA_CERT)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="talk plaintext to an orchestrator started with --insecure"
    )
    parser.add_argument(
        "--timeout",
        type=argtypes.seconds(),
        default=30.0,
        help="seconds to wait for each request, above 0 (default 30)",
    )
    parser.add_argument(
        "--output",
        "-o",
        choices=OUTPUT_FORMATS,
        default="table",
        help="output format (default table); the same flag after the command overrides it",
    )
    nouns = parser.add_subparsers(dest="noun", required=True)

    def output_flag(sub: argparse.ArgumentParser) -> None:
        output_flag_of_command(sub)

    devices = nouns.add_parser("devices", help="list and inspect devices").add_subparsers(dest="verb", required=True)
    sub = devices.add_parser("list", help="list devices")
    sub.add_argument("--status", choices=("online", "stale", "offline"), help="only devices in this status")
    sub.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="only devices with this label")
    sub.add_argument(
        "--drift", action="store_true", help="only devices whose reported state differs from the desired one"
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_devices_list)
    sub = devices.add_parser("show", help="show one device with its hardware and models")
    sub.add_argument("device_id")
    output_flag(sub)
    sub.set_defaults(handler=cmd_devices_show)
    from edgefleet.cli import pki, tokens

    tokens.add_device_commands(devices, output_flag)

    models = nouns.add_parser("models", help="add and inspect models").add_subparsers(dest="verb", required=True)
    sub = models.add_parser("add", help="upload an ONNX or TFLite file")
    sub.add_argument(
        "path",
        type=Path,
        help="ONNX or TFLite model file, up to the orchestrator's --max-upload-bytes (default 512 MiB)",
    )
    sub.add_argument("--name", required=True, help=f"model name in the catalog: {NAME_RULE}")
    sub.add_argument("--version", required=True, help=f"model version, such as 1 or 2026-12-01: {NAME_RULE}")
    sub.add_argument(
        "--variant-kind",
        help="add the file as a variant of this kind (tflite-fp32, int8, ...) of an existing version",
    )
    sub.add_argument(
        "--evaluation",
        metavar="SOURCE",
        help="for a lossy --variant-kind (int8, fp16, pruned, distilled, tflite-int8, tflite-fp16): gate the "
        "variant on this data (demo-photos, digits, an image folder or an .npz file on the orchestrator host); "
        "without it the variant stays pending, never deployed",
    )
    sub.add_argument(
        "--max-accuracy-drop",
        type=argtypes.finite_number(0, 100, "percentage points"),
        metavar="POINTS",
        help="reject the variant when it loses more accuracy than this, in percentage points from 0 to 100 "
        "(default 1; needs --evaluation)",
    )
    sub.add_argument("--no-wait", action="store_true", help="print the queued gate job and return at once")
    sub.add_argument(
        "--wait-timeout",
        type=argtypes.wait_seconds(),
        help="seconds to follow the gate job; 0 or unset waits until done",
    )
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    output_flag(sub)
    sub.set_defaults(handler=cmd_models_add)
    sub = models.add_parser("list", help="list model versions")
    sub.add_argument("--name", help="only versions of this model")
    output_flag(sub)
    sub.set_defaults(handler=cmd_models_list)
    sub = models.add_parser("show", help="show a model version (NAME or NAME:VERSION)")
    sub.add_argument("model")
    output_flag(sub)
    sub.set_defaults(handler=cmd_models_show)
    sub = models.add_parser("variants", help="list the variants of a model version with their figures")
    sub.add_argument("model")
    output_flag(sub)
    sub.set_defaults(handler=cmd_models_variants)
    sub = models.add_parser(
        "delete", help="delete a model version with its variants (NAME:VERSION), or one variant with --variant"
    )
    sub.add_argument("model", metavar="NAME:VERSION")
    sub.add_argument(
        "--variant", metavar="VARIANT_ID", help="delete only this variant; the source variant goes with the version"
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_models_delete)
    from edgefleet.cli import compress

    compress.add_commands(models, nouns, output_flag)

    rollout.add_commands(nouns, output_flag)

    sub = nouns.add_parser("deploy", help="assign a model to a device")
    sub.add_argument("--model", required=True, help="NAME or NAME:VERSION (default: latest version)")
    sub.add_argument("--device", required=True, help="device id")
    sub.add_argument("--variant", help="variant id; default: the source variant or one the device can run")
    sub.add_argument(
        "--threads",
        type=argtypes.whole_number(0, MAX_DEPLOY_THREADS),
        default=0,
        help="intra-op threads, at most the device's usable cores (a larger value is lowered to them) "
        f"and at most {MAX_DEPLOY_THREADS}; 0 (default) lets the orchestrator or the agent choose",
    )
    sub.add_argument(
        "--wait",
        type=argtypes.wait_seconds(),
        default=0.0,
        help="seconds to wait until the device serves or fails it; 0 (default) returns at once",
    )
    sub.add_argument(
        "--rollback",
        action="store_true",
        help="let the device accept this assignment although its signed counter is lower than the running one's",
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_deploy)

    metrics = nouns.add_parser("metrics", help="query latency metrics").add_subparsers(dest="verb", required=True)
    sub = metrics.add_parser("query", help="count, throughput and p50/p95/p99 latency from merged sketches")
    metric_filter_flags(sub)
    sub.add_argument("--since", help=f"start: {TIME_HELP} (15m, 2h), no more than {MAX_SINCE_AHEAD_S:.0f} s after now")
    sub.add_argument("--until", help=f"end: {TIME_HELP}")
    sub.add_argument(
        "--group-by",
        action="append",
        help=f"comma-separated, or repeated: device, model, variant, hardware_class (default {DEFAULT_GROUP_BY})",
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_metrics_query)

    sub = metrics.add_parser("plot", help="write a PNG of latency over time and of its distribution")
    metric_filter_flags(sub)
    sub.add_argument(
        "--since",
        default="1h",
        help=f"start: {TIME_HELP} (default 1h), no more than {MAX_SINCE_AHEAD_S:.0f} s after now",
    )
    sub.add_argument("--until", help=f"end: {TIME_HELP} (default: now)")
    sub.add_argument(
        "--bucket",
        help="time bucket of the series: whole seconds or 10s, 1m, 5m, 1h, at most 24h (default: the shortest of "
        "10s, 1m, 5m, 15m, 1h, 6h and 24h that draws --since to --until in at most 360 points)",
    )
    sub.add_argument(
        "--out",
        type=Path,
        default=Path("latency.png"),
        help="image file to write; its suffix sets the format, a name without one gets .png, and missing folders "
        "are created (default latency.png)",
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_metrics_plot)

    from edgefleet.cli import explain  # Imported here because it imports this module.

    explain.add_parser(nouns)

    sub = nouns.add_parser("health", help="check that the orchestrator is serving (exit 0) or not (exit 69)")
    sub.add_argument("--service", default="", help="a service name; empty checks the whole server")
    output_flag(sub)
    sub.set_defaults(handler=cmd_health)

    pki.add_commands(nouns)
    tokens.add_commands(nouns, output_flag)

    sub = nouns.add_parser("demo", help="run the demo fleet on real models (orchestrator and three agents)")
    sub.add_argument("--report", type=Path, help="also write the figures as JSON to this file")
    sub.add_argument(
        "--duration", type=argtypes.seconds(), default=20.0, help="seconds of inference per device, above 0"
    )
    sub.add_argument("--work-dir", type=Path, help="directory for the demo's database and agents (default: a temp dir)")
    # With -o json the report goes to stdout and the narration to stderr.
    output_flag(sub)
    sub.set_defaults(handler=None)

    from edgefleet.cli import completion

    completion.add_parser(nouns)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv, and report unknown arguments with the usage of the command they were given to.

    argparse reports them from the top-level parser, whose usage lists only the global options, so a
    mistyped flag of `edgefleet deploy` would show no flag of deploy. Exits 2 through parser.error.
    """
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    command = parser
    while True:
        subcommands = next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, subcommands.dest, None) if subcommands is not None else None
        if subcommands is None or chosen is None:
            break
        command = subcommands.choices[chosen]
    flags = [option for action in command._actions for option in action.option_strings]
    hints = []
    for argument in unknown:
        close = difflib.get_close_matches(argument.partition("=")[0], flags, n=1) if argument.startswith("-") else []
        if close:
            hints.append(f"{argument.partition('=')[0]}: did you mean {close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    try:
        if args.noun == "demo":
            return cmd_demo(args)
        if args.noun == "completion":
            from edgefleet.cli.completion import script

            if args.output == "json":
                raise CliError(
                    "completion prints a shell script, which has no JSON form; run it without -o json", EXIT_USAGE
                )

            print(script(build_parser(), args.shell), end="")
            return 0
        for pair in getattr(args, "label", []):
            key, sep, value = pair.partition("=")
            if not sep:
                raise CliError(f"invalid --label {pair!r}: expected KEY=VALUE", EXIT_USAGE)
            problem = label_problem({key: value})
            if problem:
                raise CliError(f"invalid --label {pair!r}: {problem}", EXIT_USAGE)
        if getattr(args, "local_handler", None) is not None:
            return int(args.local_handler(args))
        if args.insecure:
            print("edgefleet: warning: talking to the orchestrator without TLS (--insecure)", file=sys.stderr)
        address = args.orchestrator or environment_orchestrator()
        address = address or (DEFAULT_INSECURE_ORCHESTRATOR if args.insecure else DEFAULT_ORCHESTRATOR)
        client = Client(address, args.timeout, token=args.token, ca_cert=args.ca_cert, insecure=args.insecure)
        args.handler(client, args)
    except CliError as error:
        print(f"edgefleet: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout (head, less) went away; point stdout at /dev/null so the exit flush succeeds.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the subcommand modules import
    # edgefleet.cli.main, and their CliError must be the class this main() catches.
    from edgefleet.cli.main import main as imported_main

    sys.exit(imported_main())
