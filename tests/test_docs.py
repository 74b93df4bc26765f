"""Tests of the documentation: quoted command lines parse, named paths exist and docs/api.md is current."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.agent.main import build_parser as build_agent_parser
from edgefleet.cli.main import build_parser
from edgefleet.common.config import add_flags

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
REDIRECTS = {">", ">>", "<", "2>", "&>"}
# Backticked paths that start with one of these name a file or folder of the repository.
REPO_PREFIXES = ("edgefleet/", "deploy/", "docs/", "tests/", "bench/", "scripts/", "protos/")
REPO_FILES = {"Makefile", "pyproject.toml", "README.md"}
# Words that stand for a value the reader fills in; a path with one is a pattern, not a file.
PLACEHOLDER = re.compile(r"[A-Z]{2,}|<|\.\.\.")


def orchestrator_parser() -> argparse.ArgumentParser:
    """Build the parser edgefleet-orchestrator's main() builds, which has no factory of its own."""
    from edgefleet.orchestrator.config import HELP, OrchestratorConfig

    parser = argparse.ArgumentParser(prog="edgefleet-orchestrator")
    parser.add_argument("--config", type=Path)
    add_flags(parser, OrchestratorConfig, HELP)
    return parser


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "edgefleet": build_parser,
    "edgefleet-agent": build_agent_parser,
    "edgefleet-orchestrator": orchestrator_parser,
}


def code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """Yield (language, body) of each fenced code block."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        yield match.group(1), match.group(2)


def command_lines(text: str) -> Iterator[str]:
    """Yield the shell command lines of the sh and console blocks, continuation lines joined."""
    for language, body in code_blocks(text):
        if language not in ("sh", "console"):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        for line in lines:
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            yield line


def commands(line: str) -> Iterator[list[str]]:
    """Yield each simple command of a shell line as words, leading VAR=value assignments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    after_redirect = False
    for token in [*lexer, ";"]:
        if after_redirect:
            after_redirect = False  # The file name of a redirection.
        elif token in REDIRECTS or (token.endswith(">") and token[:-1].isdigit()):
            after_redirect = True
        elif set(token) <= set("|&;<>()"):
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)
            if words:
                yield words
            words = []
        else:
            words.append(token)


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in [*DOCS, ROOT / "README.md"]:
        for line in command_lines(doc.read_text()):
            for words in commands(line):
                program = Path(words[0]).name
                if program in PARSERS and words[1:2] != ["infer"]:
                    found.append((f"{doc.name}: {line.strip()}", [program, *words[1:]]))
    return found


COMMANDS = documented_commands()


def test_docs_quote_commands() -> None:
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_command_parses(where: str, words: list[str]) -> None:
    parser = PARSERS[words[0]]()
    try:
        parser.parse_args(words[1:])
    except SystemExit as exit_:
        pytest.fail(f"{where}: argparse rejected {shlex.join(words)} (exit {exit_.code})")


def named_paths() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for token in re.findall(r"`([^`\s]+)`", doc.read_text()):
            path = token.split("::")[0].rstrip(".,:;")  # A pytest node id names its file.
            if path in REPO_FILES or path.startswith(REPO_PREFIXES):
                found.append((doc.name, path))
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            found.append((doc.name, str(Path("docs") / target)))
    return sorted(set(found))


PATHS = named_paths()


@pytest.mark.parametrize(("doc", "path"), PATHS, ids=[f"{doc}:{path}" for doc, path in PATHS])
def test_named_path_exists(doc: str, path: str) -> None:
    if glob.glob(str(ROOT / path)):
        return
    if PLACEHOLDER.search(path):
        pytest.skip(f"{path} contains a placeholder")
    pytest.fail(f"{doc} names {path}, which does not exist")


def test_api_doc_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module runs.
    spec.loader.exec_module(module)
    expected = module.render(module.load_descriptors())
    actual = (ROOT / "docs" / "api.md").read_text()
    assert actual == expected, "docs/api.md is stale; run .venv/bin/python scripts/gen_api_docs.py"


def test_api_doc_lists_every_rpc() -> None:
    from edgefleet.v1 import agent_pb2, inference_pb2, operator_pb2

    text = (ROOT / "docs" / "api.md").read_text()
    for module in (agent_pb2, inference_pb2, operator_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"| `{method.name}` |" in text, f"{service.name}.{method.name} is missing from docs/api.md"
