"""The user docs say what the code does: every shell command in README.md and docs/*.md is one the
code accepts, every relative link resolves, and docs/configuration.md is the schema's rendering.

Commands are read from the fenced ``bash``/``sh``/``shell`` blocks. Each `python` command in them is
checked without an accelerator and without training: `train.py`, `sft.py` and `scaling.py sweep` /
`depth` load their config file and overrides through the config loader (every key must exist, every
concrete value must have the key's type and sign); every `--flag` must appear in the `--help` of
the program it is given to; a `--help` command is run and must exit 0; `pip install -e ".[X]"`
must name extras of pyproject.toml; a `pytest` path must exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|shell)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SEPARATORS = {";", "&", "&&", "|", "||"}
SHELL_WORDS = {"for", "do", "done", "in", "then", "fi", "wait", "if"}
PLACEHOLDER = re.compile(r"[$<>]")  # a value the reader fills in: $i, <0..3>
CONFIG_CLASSES = {"train.py": "Config", "sft.py": "SFTConfig"}


def shell_lines(text: str) -> list[str]:
    """The logical lines of every shell block: continuations joined, comments and blanks left out."""
    lines = []
    for block in FENCE.finditer(text):
        for line in block.group(2).replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                lines.append(line)
    return lines


def segments(line: str) -> list[list[str]]:
    """The simple commands of a line: split at ; & && | ||, shell keywords and `VAR=value` prefixes
    dropped; a quoted argument that is itself a command (`--command "cd x && python ..."`) is
    searched too."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    found, current = [], []
    for token in [*lexer, ";"]:
        if token in SEPARATORS:
            while current and (current[0] in SHELL_WORDS or re.match(r"^[A-Za-z_]\w*=", current[0])):
                current.pop(0)
            if current:
                found.append(current)
            current = []
        elif " " in token and re.search(r"\b(python3?|pytest|pip)\s", token):
            found += segments(token)
        else:
            current.append(token)
    return found


def program(tokens: list[str]) -> list[str] | None:
    """The tokens from `python`, `pytest` or `pip` on (`srun ... python train.py` -> `python ...`);
    None for a usage synopsis (`python train.py [CONFIG.yaml] [key=value ...]`), which is no command."""
    if any(t.startswith("[") or t == "..." for t in tokens):
        return None
    for i, token in enumerate(tokens):
        if token in ("python", "python3", "pytest", "pip"):
            return tokens[i:]
    return None


def all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            for segment in segments(line):
                if (cmd := program(segment)) is not None:
                    found.append((f"{page.relative_to(ROOT)}: {line.strip()[:80]}", cmd))
    return found


COMMANDS = all_commands()


@cache
def help_flags(argv: tuple[str, ...]) -> frozenset[str]:
    """The `--flags` a program's `--help` names (it must exit 0)."""
    out = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"{' '.join(argv)} --help exited {out.returncode}: {out.stderr[-400:]}"
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def source_of(target: tuple[str, ...]) -> str:
    """The text of the file a target runs ('' when it is not one of the repository's)."""
    path = ROOT / (target[1].replace(".", "/") + ".py" if target[0] == "-m" else target[0])
    return path.read_text() if path.is_file() else ""


def python_target(cmd: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(`python` arguments naming the program, with a subcommand of scaling.py; the rest)."""
    args = cmd[1:]
    if args[:1] == ["-m"]:
        return tuple(args[:2]), args[2:]
    if args[:1] == ["scaling.py"] and len(args) > 1 and not args[1].startswith("-"):
        return tuple(args[:2]), args[2:]
    return tuple(args[:1]), args[1:]


def config_class(target: tuple[str, ...]):
    from jaxllm.core import config_schema

    if target[0] in CONFIG_CLASSES:
        return getattr(config_schema, CONFIG_CLASSES[target[0]])
    if target == ("scaling.py", "sweep"):
        from jaxllm.scaling.sweep import SweepConfig

        return SweepConfig
    if target == ("scaling.py", "depth"):
        from jaxllm.scaling.depth import DepthConfig

        return DepthConfig
    return None


def check_config(cls, rest: list[str]) -> None:
    """Loads the command's config file (when it is one of the repository's) and overrides."""
    from jaxllm.core.config import load_config, set_key

    positional = [a for a in rest if "=" not in a and not a.startswith("-")]
    path = positional[0] if positional and positional[0].endswith((".yaml", ".yml")) else None
    if path and path.startswith("configs/"):
        assert (ROOT / path).is_file(), f"{path} does not exist"
    cfg = load_config(str(ROOT / path) if path and path.startswith("configs/") else None, [], cls=cls)
    for item in (a for a in rest if "=" in a and not a.startswith("-")):
        key, value = item.split("=", 1)
        if PLACEHOLDER.search(value):
            *section, leaf = key.split(".")
            node = cfg
            for part in section:
                node = getattr(node, part)
            value = str(getattr(node, leaf)) if hasattr(node, leaf) else value
        set_key(cfg, key, value)


def check_python(cmd: list[str]) -> None:
    target, rest = python_target(cmd)
    if target[0].endswith(".py"):
        assert (ROOT / target[0]).is_file(), f"{target[0]} does not exist"
    if rest[-1:] == ["--help"]:
        help_flags(target)  # quick: run it
    source = source_of(target)
    flags = [a.split("=", 1)[0] for a in rest if a.startswith("--") and a != "--help"]
    unseen = [f for f in flags if f'"{f}"' not in source and f"'{f}'" not in source]
    missing = [f for f in unseen if f not in help_flags(target)] if unseen else []
    assert not missing, f"{' '.join(target)} has no {missing}"
    cls = config_class(target)
    if cls is not None:
        check_config(cls, [a for a in rest if not a.startswith("--")] if target[0] != "train.py" else plan_free(rest))


def plan_free(rest: list[str]) -> list[str]:
    """train.py's arguments without `--plan TARGET` (a target it knows), `--plan-out FILE`, `--search`."""
    from jaxllm.plan import hardware

    out, args = [], iter(rest)
    for arg in args:
        if arg == "--plan":
            hardware.parse_target(next(args))
        elif arg == "--plan-out":
            next(args)
        elif arg != "--search":
            out.append(arg)
    return out


def check_pip(cmd: list[str]) -> None:
    table = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", table, re.MULTILINE))
    for arg in cmd[2:]:
        if match := re.fullmatch(r"\.\[([\w,-]+)\]", arg):
            unknown = set(match.group(1).split(",")) - extras
            assert not unknown, f"pyproject.toml has no extra {sorted(unknown)}"


def check_pytest(cmd: list[str]) -> None:
    for arg in cmd[1:]:
        if arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).exists(), f"{arg} does not exist"


def test_docs_show_shell_commands():
    assert len(COMMANDS) > 20, "the command extraction found almost nothing"
    programs = {c[1] for _, c in COMMANDS if c[0] == "python"}
    assert {"train.py", "sft.py", "scaling.py", "-m"} <= programs


@pytest.mark.parametrize("where, cmd", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_shell_command_is_accepted(where, cmd):
    if cmd[0] in ("python", "python3"):
        if cmd[1:2] == ["-c"]:
            return
        check_python(cmd)
    elif cmd[0] == "pip":
        check_pip(cmd)
    elif cmd[0] == "pytest":
        check_pytest(cmd)


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    broken = [target for target, _ in LINK.findall(text) if "://" not in target and not (page.parent / target).exists()]
    assert not broken, f"{page.name} links to missing {broken}"


def test_configuration_reference_is_the_schema():
    from jaxllm.config_doc import render

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), "docs/configuration.md is stale: python -m jaxllm.config_doc --out docs/configuration.md"


def test_readme_is_a_short_first_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
