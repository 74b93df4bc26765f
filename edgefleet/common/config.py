"""Layered configuration: defaults, then a TOML file, then EDGEFLEET_* variables, then flags."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from edgefleet.common.errors import EXIT_CONFIG

T = TypeVar("T")

ENV_PREFIX = "EDGEFLEET_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _convert(value: Any, target: Any, source: str, name: str) -> Any:
    """Convert a file or environment value to the field's annotated type."""
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(target) if t is not type(None)]
        if value is None or value == "":
            return None
        target = options[0]
        origin = typing.get_origin(target)
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if target in (int, float, str):
            if isinstance(value, bool) or (target is not str and isinstance(value, str) and not value.strip()):
                raise ValueError(f"expected {target.__name__}, got {value!r}")
            return target(value)
        if target is Path:
            return Path(str(value)).expanduser()
        if origin is dict:
            if isinstance(value, Mapping):
                return {str(k): str(v) for k, v in value.items()}
            return parse_pairs(str(value), name)
        if origin is tuple:
            items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v.strip()]
            return tuple(str(v).strip() for v in items)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid value for {name} from {source}: {error}") from None
    return value


def parse_pairs(text: str, name: str) -> dict[str, str]:
    """Parse "k=v,k2=v2" into a dict; raise ConfigError naming the bad pair."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid {name} entry {item!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


class DaemonArgumentParser(argparse.ArgumentParser):
    """Command-line parser of a daemon that prints one line and exits 78 (EX_CONFIG) for an invalid command line.

    argparse prints its whole usage block and exits 2, which fills the journal and, for the agent, is the
    code of a device that the orchestrator rejected. The unit files do not restart either code.
    """

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [option for action in self._actions for option in action.option_strings]
            typos = [word.partition("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
            close = [(typo, difflib.get_close_matches(typo, flags, n=1)) for typo in typos]
            hints = [f"{typo}: did you mean {match[0]}?" for typo, match in close if match]
            hint = f" ({'; '.join(hints)})" if hints else ""
        line = f"{self.prog}: invalid command line: {message}{hint}; `{self.prog} --help` lists the flags"
        self.exit(EXIT_CONFIG, line + "\n")


def add_flags(parser: argparse.ArgumentParser, config_type: type, help_texts: Mapping[str, str]) -> None:
    """Add one flag per config field; flags default to None so that lower layers show through."""
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        kind = hints[field.name]
        help_text = f"{help_texts.get(field.name, '')} (env {env_name(field.name)})".strip()
        if kind is bool:
            parser.add_argument(
                flag_name(field.name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag_name(field.name), default=None, metavar=field.name.upper(), help=help_text)


def load_config(
    config_type: type[T],
    *,
    flags: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> T:
    """Build config_type from its defaults, a TOML file, the environment and parsed flags, in that order.

    Raises ConfigError naming the source and the key for unknown keys, unreadable files and bad values.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(config_type)
    names = {f.name for f in dataclasses.fields(config_type)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}

    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except OSError as error:
            raise ConfigError(f"cannot read config file {file}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {file} is not valid TOML: {error}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"unknown key {key!r} in {file}; allowed: {', '.join(sorted(names))}")
            values[name] = _convert(value, hints[name], str(file), key)

    for name in names:
        if env_name(name) in environ:
            values[name] = _convert(environ[env_name(name)], hints[name], "the environment", env_name(name))

    if flags is not None:
        for name in names:
            value = getattr(flags, name, None)
            if value is not None:
                values[name] = _convert(value, hints[name], "the command line", flag_name(name))
    return config_type(**values)


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: above or at minimum, and at most maximum when it is set."""

    minimum: float
    unit: str
    exclusive_minimum: bool = False
    maximum: float | None = None

    def check(self, name: str, value: float) -> None:
        """Raise ConfigError naming the flag of field name, the value and the range when value is outside it."""
        below = value <= self.minimum if self.exclusive_minimum else value < self.minimum
        above = self.maximum is not None and value > self.maximum
        if math.isfinite(value) and not below and not above:
            return
        raise ConfigError(f"invalid {flag_name(name)} {format_number(value)}: must be {self.describe()}")

    def describe(self) -> str:
        """Return the range in words, such as "greater than 0 seconds" or "from 1 to 86400 seconds"."""
        if self.exclusive_minimum:
            text = f"greater than {format_number(self.minimum)}"
            if self.maximum is not None:
                text += f" and at most {format_number(self.maximum)}"
        elif self.maximum is not None:
            text = f"from {format_number(self.minimum)} to {format_number(self.maximum)}"
        else:
            text = f"at least {format_number(self.minimum)}"
        return f"{text} {self.unit}".rstrip()


def format_number(value: float) -> str:
    """Format value as the user would write it: 30 for 30.0, 0.5, 4294967295, 1e+300, nan."""
    if isinstance(value, int):
        return str(value)
    # A float of 1e16 or more is no exact integer, and 1e300 would print as 301 digits.
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}"


MAX_PORT = 65535


def dial_address_problem(value: str, port_hint: str) -> str:
    """Return what is wrong with value as an address to connect to, or "" when it is HOST:PORT.

    The host may be a name, an IPv4 address or an IPv6 address in brackets, and the port goes from 1
    to 65535. gRPC takes a larger port modulo 65536 (127.0.0.1:99999 dials port 34463) and a missing
    one as 443, so either would reach another service. port_hint names the port to give instead.
    """
    example = "127.0.0.1:50051, orchestrator.example.internal:50051 or [::1]:50051"
    host, separator, port_text = value.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        return f"expected HOST:PORT, such as {example}"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return "put an IPv6 address in brackets, such as [::1]:50051"
    port = int(port_text)
    if not 1 <= port <= MAX_PORT:
        return f"port {port} is out of range; give {port_hint}, from 1 to {MAX_PORT}"
    return ""
