"""edgefleet completion: bash and zsh completion scripts generated from the CLI's argparse parser."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

SHELLS = ("bash", "zsh")
# The value kinds a completion script offers after an option, or for a positional argument.
FILE_VALUE = "file"
FREE_VALUE = "any"


@dataclass(frozen=True)
class CommandSpec:
    """What one command path (such as "rollout create") accepts: subcommands, options and their values."""

    path: str
    subcommands: tuple[str, ...]
    options: tuple[str, ...]
    # Option string -> "choices a b c", FILE_VALUE or FREE_VALUE; options that take no value are absent.
    option_values: tuple[tuple[str, str], ...]
    # The value kind of the first positional argument; "" when the command takes none.
    positional: str


def _value_kind(action: argparse.Action) -> str:
    if action.choices is not None:
        return "choices " + " ".join(str(choice) for choice in action.choices)
    if action.type is Path:
        return FILE_VALUE
    return FREE_VALUE


def command_specs(parser: argparse.ArgumentParser, path: str = "") -> list[CommandSpec]:
    """Walk parser and its subparsers depth first and return one CommandSpec per command path."""
    subcommands: dict[str, argparse.ArgumentParser] = {}
    options: list[str] = []
    option_values: list[tuple[str, str]] = []
    positional = ""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands.update(action.choices)
        elif action.option_strings:
            options.extend(action.option_strings)
            if action.nargs != 0:
                option_values.extend((option, _value_kind(action)) for option in action.option_strings)
        elif not positional:
            positional = _value_kind(action)
    spec = CommandSpec(path, tuple(subcommands), tuple(options), tuple(option_values), positional)
    specs = [spec]
    for name, subparser in subcommands.items():
        specs.extend(command_specs(subparser, f"{path} {name}".strip()))
    return specs


def _bash_case(entries: list[tuple[str, str]]) -> str:
    """Return the branches of a bash `case` that prints value for key; the empty key is the top level."""
    lines = []
    for key, value in entries:
        pattern = shlex.quote(key) if key else '""'
        lines.append(f"        {pattern}) echo {shlex.quote(value)} ;;")
    return "\n".join(lines)


def bash_script(parser: argparse.ArgumentParser) -> str:
    """Return a bash completion script for parser's program: subcommands, options and option choices."""
    prog = parser.prog
    function = "_" + prog.replace("-", "_")
    specs = command_specs(parser)
    commands = [(spec.path, " ".join(spec.subcommands)) for spec in specs if spec.subcommands]
    options = [(spec.path, " ".join(spec.options)) for spec in specs]
    values = [(f"{spec.path}|{option}", kind) for spec in specs for option, kind in spec.option_values]
    positionals = [(spec.path, spec.positional) for spec in specs if spec.positional]
    return f"""# bash completion for {prog}, generated from its argparse parser by `{prog} completion bash`.
# Load it with: source <({prog} completion bash)

{function}_commands() {{
    case "$1" in
{_bash_case(commands)}
    esac
}}

{function}_options() {{
    case "$1" in
{_bash_case(options)}
    esac
}}

# Print what the option $2 of command $1 takes ("choices ...", "{FILE_VALUE}" or "{FREE_VALUE}");
# fail when it takes no value.
{function}_value() {{
    case "$1|$2" in
{_bash_case(values)}
        *) return 1 ;;
    esac
}}

{function}_positional() {{
    case "$1" in
{_bash_case(positionals)}
    esac
}}

{function}_offer() {{
    case "$1" in
        "choices "*) COMPREPLY=($(compgen -W "${{1#choices }}" -- "$2")) ;;
        {FILE_VALUE})
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "$2"))
            ;;
        *) COMPREPLY=() ;;
    esac
}}

{function}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}"
    local prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local path="" word next skip=0 i
    # Follow the subcommands typed so far, skipping options and the values they take.
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        if ((skip)); then
            skip=0
            continue
        fi
        case "$word" in
            -*=*|=) ;;
            -*) {function}_value "$path" "$word" >/dev/null && skip=1 ;;
            *)
                next="${{path:+$path }}$word"
                if [[ " $({function}_commands "$path") " == *" $word "* ]]; then
                    path="$next"
                fi
                ;;
        esac
    done
    # --option=value: bash splits at "=", so the option is two words back.
    if [[ "$prev" == "=" && $COMP_CWORD -ge 2 ]]; then
        prev="${{COMP_WORDS[COMP_CWORD-2]}}"
    elif [[ "$cur" == "=" ]]; then
        cur=""
    fi
    local kind
    if [[ "$prev" == -* ]] && kind="$({function}_value "$path" "$prev")"; then
        {function}_offer "$kind" "$cur"
        return 0
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$({function}_options "$path")" -- "$cur"))
        return 0
    fi
    local subcommands
    subcommands="$({function}_commands "$path")"
    if [[ -n "$subcommands" ]]; then
        COMPREPLY=($(compgen -W "$subcommands" -- "$cur"))
    else
        {function}_offer "$({function}_positional "$path")" "$cur"
    fi
    return 0
}}

complete -F {function} {prog}
"""


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """Return a zsh completion script: the bash script run through zsh's bashcompinit."""
    prog = parser.prog
    return f"""#compdef {prog}
# zsh completion for {prog}, generated by `{prog} completion zsh`; it runs the bash completion through
# zsh's bashcompinit. Load it with: source <({prog} completion zsh)
autoload -U +X compinit && compinit
autoload -U +X bashcompinit && bashcompinit

{bash_script(parser)}"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """Return the completion script of parser for shell ("bash" or "zsh"); raise ValueError for another shell."""
    if shell == "bash":
        return bash_script(parser)
    if shell == "zsh":
        return zsh_script(parser)
    raise ValueError(f"unsupported shell {shell!r}: use one of {', '.join(SHELLS)}")


def add_parser(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `completion bash|zsh`, which main() runs without contacting the orchestrator."""
    sub = nouns.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for the shell. Load it for this shell with "
        "`source <(edgefleet completion bash)`, or install it with "
        "`edgefleet completion bash > /etc/bash_completion.d/edgefleet`.",
    )
    sub.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    sub.set_defaults(handler=None)
