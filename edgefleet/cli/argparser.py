"""The CLI's ArgumentParser, whose error for a flag without a value names what the flag expects and the fix."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

# argparse's message when a flag that takes one value is followed by nothing or by something that looks
# like an option. The flags group is the flag's option strings joined with "/" (--output/-o).
MISSING_VALUE = re.compile(r"argument (?P<flags>\S+): expected one argument")
# The start of a negative duration or number such as -5m, -1h or -1e3. argparse takes only plain negative
# numbers (-5, -0.5) as values and reads these as options.
NEGATIVE = re.compile(r"-\.?\d")
# The "(default ...)" part of a help text, which is left out of the description of accepted values.
DEFAULT_NOTE = re.compile(r"\s*\(default[^()]*\)")


class CliArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that explains a flag value starting with a dash, which argparse reads as an option.

    argparse reports `--since -5m` or `--ttl -1h` as "expected one argument". error() replaces that
    message with one that names the value, what the flag expects and how to give it. Subparsers made with
    add_subparsers() are of this class too, so the rule covers every flag of the CLI.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Kept for error(). A subparser receives only the arguments after its command name.
        self.arguments = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        match = MISSING_VALUE.fullmatch(message)
        if match is not None:
            message = self.missing_value_message(match["flags"].split("/")) or message
        message = self.missing_command_message(message) or message
        super().error(message)

    def missing_command_message(self, message: str) -> str | None:
        """Return the message for a parser called without its subcommand, or None for another message.

        argparse would name the subcommand by its internal dest ("arguments are required: verb").
        """
        subcommands = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subcommands is None or message != f"the following arguments are required: {subcommands.dest}":
            return None
        return f"missing command: give one of {', '.join(subcommands.choices)} (`{self.prog} --help` describes each)"

    def missing_value_message(self, option_strings: list[str]) -> str | None:
        """Return the message for a flag of option_strings that got no value, or None if it is not found."""
        action = self._option_string_actions.get(option_strings[0])
        if action is None:
            return None

        name = max(action.option_strings, key=len)
        expects = f"{name} expects {expected_value(action)}"
        arguments: list[str] = getattr(self, "arguments", [])

        # The first use of the flag that is last or followed by a dash, as argparse rejects the first one.
        positions = [
            i
            for i, argument in enumerate(arguments)
            if self.names_flag(argument, action) and (i + 1 == len(arguments) or arguments[i + 1].startswith("-"))
        ]
        if not positions:
            return None

        following = arguments[positions[0] + 1 : positions[0] + 2]
        if not following:
            return f"argument {name}: missing value at the end of the command; {expects}"
        value = following[0]
        if self.is_option(value):
            return f"argument {name}: missing value before {value}; {expects}"

        message = (
            f"argument {name}: {value!r} starts with a dash, so it is read as an option instead of a value. {expects}."
        )
        free_text = action.type is None or action.type is Path
        if NEGATIVE.match(value):
            fix = f"write {name} {value[1:]}" if accepts(action, value[1:]) else "drop the minus sign"
            message += f" Durations and counts are positive, so {fix}."
            if free_text:
                message += f" To pass a value that does start with a dash, write {name}={value}."
        elif free_text and action.choices is None:
            message += f" To pass a value that starts with a dash, write {name}={value}."
        return message

    def names_flag(self, argument: str, action: argparse.Action) -> bool:
        """Return whether argument is one of action's option strings or an abbreviation that argparse accepts."""
        if argument in action.option_strings:
            return True
        if not argument.startswith("--") or len(argument) < 3:
            return False
        matches = {a for option, a in self._option_string_actions.items() if option.startswith(argument)}
        return matches == {action}

    def is_option(self, argument: str) -> bool:
        """Return whether argument is a flag of this parser (--flag, --flag=VALUE or an abbreviation)."""
        flag = argument.partition("=")[0]
        if flag in self._option_string_actions:
            return True
        return flag.startswith("--") and any(option.startswith(flag) for option in self._option_string_actions)


def accepts(action: argparse.Action, value: str) -> bool:
    """Return whether the flag's type, if it has one, accepts value."""
    if action.type is None or not callable(action.type):
        return True
    try:
        action.type(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False
    return True


def expected_value(action: argparse.Action) -> str:
    """Describe what a flag accepts, from its choices, help text or metavar."""
    if action.choices is not None:
        return "one of: " + ", ".join(str(choice) for choice in action.choices)
    text = DEFAULT_NOTE.sub("", action.help or "").strip()
    if text and text != argparse.SUPPRESS:
        return text
    metavar: Any = action.metavar or action.dest.upper()
    return f"a {metavar} value"
