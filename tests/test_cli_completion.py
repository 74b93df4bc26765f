"""Tests of `edgefleet completion`: the generated scripts, loaded and run in a real bash."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.cli.completion import command_specs, script
from edgefleet.cli.main import build_parser, main

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


@pytest.fixture(scope="module")
def bash_script_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "edgefleet.bash"
    path.write_text(script(build_parser(), "bash"))
    return path


def complete(script_path: Path, words: list[str], cwd: Path | None = None) -> list[str]:
    """Run the completion function in bash for the command line words (the last one is being typed)."""
    quoted = " ".join(shlex.quote(word) for word in ["edgefleet", *words])
    program = (
        f"source {shlex.quote(str(script_path))}\n"
        f"COMP_WORDS=({quoted})\n"
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
        "_edgefleet\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        [str(BASH), "--norc", "--noprofile", "-c", program], capture_output=True, text=True, check=True, cwd=cwd
    )
    return [line for line in result.stdout.splitlines() if line]


def test_console_script_registers(tmp_path: Path) -> None:
    executable = Path(sys.executable).parent / "edgefleet"
    if not executable.exists():
        pytest.skip(f"{executable} is not installed; run `make install`")
    result = subprocess.run(
        [str(BASH), "--norc", "--noprofile", "-c", f"source <({executable} completion bash); complete -p edgefleet"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().endswith("-F _edgefleet edgefleet")


def test_main_prints_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    assert "complete -F _edgefleet edgefleet" in capsys.readouterr().out


def test_nouns(bash_script_path: Path) -> None:
    nouns = complete(bash_script_path, [""])
    for noun in ("devices", "models", "deploy", "rollout", "metrics", "jobs", "explain", "completion"):
        assert noun in nouns


def test_noun_prefix(bash_script_path: Path) -> None:
    assert complete(bash_script_path, ["de"]) == ["devices", "deploy", "demo"]


def test_verb_prefix(bash_script_path: Path) -> None:
    assert complete(bash_script_path, ["rollout", "r"]) == ["resume", "rollback"]


def test_verb_after_global_option(bash_script_path: Path) -> None:
    assert complete(bash_script_path, ["--orchestrator", "127.0.0.1:50051", "--insecure", "rollout", "cr"]) == [
        "create"
    ]


def test_flag_prefix(bash_script_path: Path) -> None:
    assert complete(bash_script_path, ["devices", "list", "--st"]) == ["--status"]


def test_flag_choices(bash_script_path: Path) -> None:
    assert complete(bash_script_path, ["devices", "list", "--status", "o"]) == ["online", "offline"]


def test_output_choices(bash_script_path: Path) -> None:
    assert complete(bash_script_path, ["jobs", "list", "-o", ""]) == ["table", "json"]


def test_equals_form(bash_script_path: Path) -> None:
    # bash splits "--output=j" into "--output", "=" and "j".
    assert complete(bash_script_path, ["models", "list", "--output", "=", "j"]) == ["json"]


def test_path_option_files(bash_script_path: Path, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    assert complete(bash_script_path, ["metrics", "plot", "--out", "mod"], cwd=tmp_path) == ["model.onnx"]


def test_path_positional_files(bash_script_path: Path, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    assert complete(bash_script_path, ["models", "add", "--name", "m", "mod"], cwd=tmp_path) == ["model.onnx"]


def test_free_value_offers_nothing(bash_script_path: Path) -> None:
    assert complete(bash_script_path, ["deploy", "--model", "d"]) == []


def test_specs_cover_every_command() -> None:
    paths = {spec.path for spec in command_specs(build_parser())}
    for path in ("devices list", "models compress", "rollout rollback", "metrics plot", "jobs wait", "explain"):
        assert path in paths


def test_zsh_uses_bashcompinit() -> None:
    text = script(build_parser(), "zsh")
    assert text.startswith("#compdef edgefleet\n")
    assert "bashcompinit" in text


def test_unknown_shell_rejected() -> None:
    with pytest.raises(ValueError, match="fish"):
        script(build_parser(), "fish")


def test_completion_rejects_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["-o", "json", "completion", "bash"])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "completion prints a shell script, which has no JSON form; run it without -o json" in captured.err
