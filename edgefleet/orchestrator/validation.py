"""Checks on request fields. Each raises InvalidArgument naming the field, the value and what is allowed."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from edgefleet.common.errors import InvalidArgument
from edgefleet.common.labels import LABEL_KEY_PATTERN, LABEL_KEY_RULE, MAX_LABEL_VALUE, MAX_LABELS
from edgefleet.v1 import common_pb2

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_TEXT = 256
MAX_FEATURES = 64
MAX_ACCELERATORS = 16
MAX_RUNTIMES = 8
MAX_PROVIDERS = 16
MIN_INSTANCE_KEY = 16
MAX_INSTANCE_KEY = 256


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def check_device_id(value: str, field: str = "device_id", *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument(field, "missing; pass the device id")
        return
    if not ID_PATTERN.match(value):
        raise InvalidArgument(
            field,
            f"{_shown(value)} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit",
        )


def check_name(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(field, "missing")
    if not NAME_PATTERN.match(value):
        raise InvalidArgument(
            field,
            f"{_shown(value)} must be 1-128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit",
        )


def check_text(value: str, field: str, max_length: int = MAX_TEXT) -> None:
    if len(value) > max_length:
        raise InvalidArgument(field, f"is {len(value)} characters long; at most {max_length} are allowed")


def check_labels(labels: Mapping[str, str], field: str = "labels") -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field, f"has {len(labels)} entries; at most {MAX_LABELS} are allowed")
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.match(key):
            raise InvalidArgument(f"{field}[{_shown(key)}]", LABEL_KEY_RULE)
        check_text(value, f"{field}[{key}]", MAX_LABEL_VALUE)


def check_instance_key(value: str) -> None:
    if not value:
        raise InvalidArgument("instance_key", "missing; the agent stores a random key beside its device id")
    if not MIN_INSTANCE_KEY <= len(value) <= MAX_INSTANCE_KEY:
        raise InvalidArgument(
            "instance_key",
            f"is {len(value)} characters long; {MIN_INSTANCE_KEY} to {MAX_INSTANCE_KEY} are allowed",
        )


def check_hardware(hardware: common_pb2.HardwareProfile, field: str = "hardware") -> None:
    """Check a reported hardware profile for missing, oversized and out-of-range fields."""
    if not hardware.architecture:
        raise InvalidArgument(f"{field}.architecture", "missing; report platform.machine()")
    if hardware.logical_cores < 1:
        raise InvalidArgument(f"{field}.logical_cores", f"{hardware.logical_cores} must be at least 1")
    if not 0 < hardware.usable_cores <= max(hardware.logical_cores, 1):
        raise InvalidArgument(
            f"{field}.usable_cores",
            f"{hardware.usable_cores:g} must be above 0 and at most logical_cores ({hardware.logical_cores})",
        )
    if hardware.memory_total_bytes == 0:
        raise InvalidArgument(f"{field}.memory_total_bytes", "missing; report the memory in bytes")
    if hardware.memory_available_bytes > hardware.memory_total_bytes:
        raise InvalidArgument(
            f"{field}.memory_available_bytes",
            f"{hardware.memory_available_bytes} exceeds memory_total_bytes ({hardware.memory_total_bytes})",
        )
    for name in ("cpu_model", "architecture", "os", "kernel", "profile_name", "hardware_class"):
        check_text(getattr(hardware, name), f"{field}.{name}")
    if len(hardware.cpu_features) > MAX_FEATURES:
        raise InvalidArgument(
            f"{field}.cpu_features", f"has {len(hardware.cpu_features)} entries; at most {MAX_FEATURES}"
        )
    for i, feature in enumerate(hardware.cpu_features):
        check_text(feature, f"{field}.cpu_features[{i}]", 32)
    if len(hardware.accelerators) > MAX_ACCELERATORS:
        raise InvalidArgument(
            f"{field}.accelerators", f"has {len(hardware.accelerators)} entries; at most {MAX_ACCELERATORS}"
        )
    for i, accelerator in enumerate(hardware.accelerators):
        kinds = common_pb2.AcceleratorKind.values()
        if accelerator.kind not in kinds or accelerator.kind == 0:
            raise InvalidArgument(
                f"{field}.accelerators[{i}].kind",
                f"unknown or unspecified value {accelerator.kind}; allowed: GPU, NPU, DSP",
            )
        for name in ("vendor", "name", "device_path", "pci_address", "driver", "source"):
            check_text(getattr(accelerator, name), f"{field}.accelerators[{i}].{name}")
    if len(hardware.runtimes) > MAX_RUNTIMES:
        raise InvalidArgument(f"{field}.runtimes", f"has {len(hardware.runtimes)} entries; at most {MAX_RUNTIMES}")
    for i, runtime in enumerate(hardware.runtimes):
        if not runtime.name:
            raise InvalidArgument(f"{field}.runtimes[{i}].name", "missing")
        check_text(runtime.name, f"{field}.runtimes[{i}].name", 64)
        check_text(runtime.version, f"{field}.runtimes[{i}].version", 64)
        if len(runtime.providers) > MAX_PROVIDERS:
            raise InvalidArgument(
                f"{field}.runtimes[{i}].providers",
                f"has {len(runtime.providers)} entries; at most {MAX_PROVIDERS}",
            )
        for j, provider in enumerate(runtime.providers):
            check_text(provider, f"{field}.runtimes[{i}].providers[{j}]", 64)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Turns request messages that do not parse into INVALID_ARGUMENT instead of gRPC's UNKNOWN.

    The generated handlers parse requests before any servicer code runs, and gRPC reports a parse
    failure as UNKNOWN, which gives a client nothing it can fix. This interceptor wraps each
    handler's request parser: a message that does not parse reaches the handler as a _Malformed
    marker, and the call ends with INVALID_ARGUMENT naming the message type. In a request stream
    the marker raises InvalidArgument from the iterator, which the servicers map to
    INVALID_ARGUMENT like their other checks.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _tolerant_handler(handler)


@dataclass(frozen=True)
class _Malformed:
    message: str


def _tolerant_parser(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return _Malformed(f"request message of {len(data)} bytes does not parse ({error}); send a valid message")

    return parse_or_mark


async def _tolerant_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            raise InvalidArgument("request", request.message)
        yield request


def _tolerant_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.request_streaming:
        behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
    else:
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler  # A synchronous handler; this server has none.
    parser = _tolerant_parser(handler.request_deserializer)
    serializer = handler.response_serializer

    def accept(request: Any) -> Any:
        if handler.request_streaming:
            return _tolerant_stream(request)
        if isinstance(request, _Malformed):
            raise InvalidArgument("request", request.message)
        return request

    async def abort(error: InvalidArgument, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

    wrapped: Callable[..., Any]
    if inspect.iscoroutinefunction(behavior):

        async def wrap_coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                accepted = accept(request)
            except InvalidArgument as error:
                await abort(error, context)
            return await behavior(accepted, context)

        wrapped = wrap_coroutine
    else:

        async def wrap_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                accepted = accept(request)
            except InvalidArgument as error:
                await abort(error, context)
            async for response in behavior(accepted, context):
                yield response

        wrapped = wrap_generator
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrapped, parser, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrapped, parser, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrapped, parser, serializer)
    return grpc.unary_unary_rpc_method_handler(wrapped, parser, serializer)
