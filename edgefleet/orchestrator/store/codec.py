"""Conversion of frozen domain dataclasses to and from the JSON-safe dicts that the store keeps."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.models import ModelMetadata

T = TypeVar("T")

# Readings that change between boots of the same machine. A profile that differs only in these is
# the same hardware, so it adds no row to the hardware history.
VOLATILE_HARDWARE_FIELDS = ("memory_available_bytes", "disk_free_bytes")


def to_json_dict(value: Any) -> dict[str, Any]:
    """Convert a dataclass instance, nested ones included, to a dict of JSON types.

    Tuples become lists. Raises TypeError when value is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"expected a dataclass instance, got {type(value).__name__}")
    return typing.cast(dict[str, Any], _to_json(value))


def from_json_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a cls instance from a dict that to_json_dict produced, converting lists back to tuples.

    Keys missing from data take the field's default, so rows written before a field was added
    still load. Unknown keys are ignored. Raises ValueError for a missing field without a default
    or a value of the wrong type.
    """
    return typing.cast(T, _from_json(cls, data, cls.__name__))


def canonical_json(data: Any) -> str:
    """Serialize JSON-safe data with sorted keys and no whitespace, so equal values give equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def hardware_to_dict(profile: HardwareProfile) -> dict[str, Any]:
    """Convert a hardware profile to a JSON-safe dict."""
    return to_json_dict(profile)


def hardware_from_dict(data: Mapping[str, Any]) -> HardwareProfile:
    """Build a hardware profile from hardware_to_dict output; raise ValueError on a malformed dict."""
    return from_json_dict(HardwareProfile, data)


def hardware_identity(profile: HardwareProfile) -> str:
    """Return the canonical JSON of a profile without its volatile readings, for change detection."""
    data = hardware_to_dict(profile)
    for name in VOLATILE_HARDWARE_FIELDS:
        data.pop(name, None)
    return canonical_json(data)


def metadata_to_dict(metadata: ModelMetadata) -> dict[str, Any]:
    """Convert model metadata to a JSON-safe dict."""
    return to_json_dict(metadata)


def metadata_from_dict(data: Mapping[str, Any]) -> ModelMetadata:
    """Build model metadata from metadata_to_dict output; raise ValueError on a malformed dict."""
    return from_json_dict(ModelMetadata, data)


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot store a value of type {type(value).__name__} as JSON: {value!r}")


_SCALAR_TYPES = (str, int, float, bool)


def _from_json(annotation: Any, data: Any, where: str) -> Any:
    """Convert data to the type annotation describes; where names the field for error messages."""
    if annotation in _SCALAR_TYPES:  # Most fields: checked first, before the slower typing introspection.
        return _scalar_from_json(annotation, data, where)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _dataclass_from_json(annotation, data, where)
    if origin is typing.Union or origin is types.UnionType:
        if data is None and type(None) in args:
            return None
        non_none = [arg for arg in args if arg is not type(None)]
        if len(non_none) != 1:
            raise ValueError(f"{where}: unsupported union type {annotation!r}")
        return _from_json(non_none[0], data, where)
    if origin is tuple:
        if not isinstance(data, list | tuple):
            raise ValueError(f"{where}: expected a list, got {data!r}")
        if len(args) != 2 or args[1] is not Ellipsis:
            raise ValueError(f"{where}: unsupported tuple type {annotation!r}; use tuple[X, ...]")
        return tuple(_from_json(args[0], item, f"{where}[{i}]") for i, item in enumerate(data))
    if origin is dict:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object, got {data!r}")
        return {str(key): _from_json(args[1], item, f"{where}.{key}") for key, item in data.items()}
    if annotation is Any:
        return data
    return _scalar_from_json(annotation, data, where)


@functools.cache
def _init_fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """Return (name, resolved type, required) for each init field of the dataclass cls.

    Cached per class, because typing.get_type_hints compiles every string annotation again on each
    call: without the cache, decoding the hardware profiles took most of a device listing's time.
    """
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
        if f.init
    )


def _dataclass_from_json(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {data!r}")
    kwargs: dict[str, Any] = {}
    for name, annotation, required in _init_fields(cls):
        if name in data:
            kwargs[name] = _from_json(annotation, data[name], f"{where}.{name}")
        elif required:
            raise ValueError(f"{where}: required field {name!r} is missing")
    return cls(**kwargs)


def _scalar_from_json(annotation: Any, data: Any, where: str) -> Any:
    if annotation is float and isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)  # JSON writes 4.0 as 4.
    if annotation is int and isinstance(data, int) and not isinstance(data, bool):
        return data
    if annotation in (str, bool) and isinstance(data, annotation):
        return data
    raise ValueError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {data!r}")
