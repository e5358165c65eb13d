"""The docs run: every ```python block of the markdown docs executes, on its own, offline; every `online-merging`
command of a ```bash block parses with the CLI's parser (`train`'s overrides are recipe keys), and so do the keys of a
```yaml block; recipes/README.md's key table is RecipeArguments, defaults included.

A marker comment on the line before a block, ``<!-- docs-test: slow torchrun -->``, changes how it runs: ``slow``
(more than ~10 s) marks its test slow; ``torchrun`` runs it in a fresh process as rank 0 of a one-process
``torchrun`` launch (the launcher's environment variables set), for blocks that start a process group.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:(.*)-->$")
MARKERS = {"slow", "torchrun"}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the block's first code line, 1-based
    language: str
    code: str
    markers: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def padded(self) -> str:
        """The code at its lines in the doc, so that tracebacks name the doc's lines."""
        return "\n" * (self.line - 1) + self.code


def read_blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of ``doc``, each with the docs-test markers on the line before its fence, if any."""
    lines, blocks, start = doc.read_text(encoding="utf-8").splitlines(), [], None
    for number, text in enumerate(lines):
        fence = FENCE.match(text)
        if fence and start is None:
            start, language = number, fence.group(1)
        elif text.strip() == "```" and start is not None:
            previous = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
            marker = MARKER.match(previous)
            code = "\n".join(lines[start + 1 : number]) + "\n"
            blocks.append(Block(doc, start + 2, language, code, frozenset(marker.group(1).split() if marker else ())))
            start = None
    assert start is None, f"{doc}: a ``` block opened at line {start + 1} is not closed"
    return blocks


BLOCKS = [block for doc in DOCS for block in read_blocks(doc)]
PYTHON = [
    pytest.param(block, id=block.name, marks=[pytest.mark.slow] * ("slow" in block.markers))
    for block in BLOCKS
    if block.language == "python"
]
BASH = [pytest.param(block, id=block.name) for block in BLOCKS if block.language == "bash"]
YAML = [pytest.param(block, id=block.name) for block in BLOCKS if block.language == "yaml"]


def test_docs_have_blocks_with_known_markers():
    assert len(PYTHON) >= 16 and len(BASH) >= 10, [block.name for block in BLOCKS]
    for block in BLOCKS:
        assert block.markers <= MARKERS, f"{block.name}: unknown docs-test marker {set(block.markers - MARKERS)}"


@pytest.fixture
def offline(monkeypatch):
    """No Hub access: the environment variables, and the flags huggingface_hub and datasets read at import time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for module in ("huggingface_hub.constants", "datasets.config"):
        with contextlib.suppress(ImportError):
            monkeypatch.setattr(importlib.import_module(module), "HF_HUB_OFFLINE", True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.filterwarnings("default:gradient entanglement at step:UserWarning")  # the monitor's output, by design
@pytest.mark.parametrize("block", PYTHON)
def test_python_block_runs(block, tmp_path, monkeypatch, offline, one_thread):
    monkeypatch.chdir(tmp_path)
    if "torchrun" in block.markers:
        script = tmp_path / "block.py"
        script.write_text(block.padded())
        launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        done = subprocess.run([sys.executable, str(script)], env={**os.environ, **launcher}, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, f"{block.name} (its lines are block.py's):\n{done.stdout}\n{done.stderr}"
        return
    with torch.random.fork_rng(devices=[]):
        exec(compile(block.padded(), str(block.doc), "exec"), {"__name__": "__main__"})


INLINE_IMPORT = re.compile(r"`from (online_merging[\w.]*) import (\w+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_imports_named_in_the_text_exist(doc):
    for module, name in INLINE_IMPORT.findall(doc.read_text(encoding="utf-8")):
        assert hasattr(importlib.import_module(module), name), f"{doc.name}: `from {module} import {name}` fails"


def cli_commands(block: Block) -> list[list[str]]:
    """The argument lists of the `online-merging` (or `-m online_merging.cli`) commands of a bash block."""
    commands = []
    for text in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(text, comments=True)
        for i, word in enumerate(words):
            if word == "online-merging" or (word == "online_merging.cli" and words[i - 1] == "-m"):
                rest = words[i + 1 :]
                end = next((j for j, w in enumerate(rest) if w in ("|", "&&", ";", "||")), len(rest))
                commands.append(rest[:end])
    return commands


def _parsers(parser):
    """``parser`` and all its subcommands' parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("block", BASH)
def test_bash_block_cli_commands_parse(block):
    from online_merging.cli import build_parser
    from online_merging.integrations.recipe import recipe_parser, shipped_recipes

    parser = build_parser()
    for command in _parsers(parser):
        command.allow_abbrev = False  # a flag the docs shorten is a flag the docs misspell
    for argv in cli_commands(block):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{block.name}: `online-merging {shlex.join(argv)}` does not parse (its error is above)")
        if args.command == "train":
            recipe = args.recipe
            assert (ROOT / recipe).is_file() or recipe in shipped_recipes(), f"{block.name}: no recipe {recipe}"
            keys = {action.dest for action in recipe_parser()._actions}
            for word in args.overrides:
                key = word[2:].split("=")[0] if word.startswith("--") else None
                assert key is None or key in keys, f"{block.name}: `train ... --{key}`: no such recipe key"


@pytest.mark.parametrize("block", YAML)
def test_yaml_block_keys_are_recipe_keys(block):
    import yaml

    from online_merging.integrations.recipe import recipe_parser

    keys = {action.dest for action in recipe_parser()._actions}
    unknown = set(yaml.safe_load(block.code)) - keys
    assert not unknown, f"{block.name}: not recipe keys: {sorted(unknown)}"


def test_bash_blocks_name_cli_commands():
    named = {argv[0] for block in BLOCKS if block.language == "bash" for argv in cli_commands(block)}
    assert {"train", "merge", "hma-search", "evaluate", "bench"} <= named, named


def recipe_key_table() -> dict[str, str]:
    """recipes/README.md's table of our keys: key -> default, as written."""
    text = (ROOT / "recipes" / "README.md").read_text(encoding="utf-8")
    section = text.split("## Our keys", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `?([^|`]*?)`? \|", section, flags=re.MULTILINE)
    return dict(rows)


def test_recipe_readme_key_table_is_recipe_arguments_with_its_defaults():
    from online_merging.integrations import RecipeArguments

    table = recipe_key_table()
    defaults = {item.name: item.default for item in fields(RecipeArguments)}
    assert list(table) == list(defaults), "the table lists RecipeArguments' fields, in their order"
    for key, written in table.items():
        default = defaults[key]
        if isinstance(default, float):
            assert float(written) == default, f"{key}: README says {written}, the code {default}"
        else:
            expected = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
            assert written == str(expected), f"{key}: README says {written}, the code {expected}"


TRACKED = ("docs", "benchmarks", "online_merging", "recipes", "tests")
INLINE_COMMAND = re.compile(r"`((?:online-merging|python benchmarks/)[^`]*)`")


def doc_commands(doc: Path) -> list[str]:
    """The commands of ``doc``: the lines of its bash blocks and its inline `online-merging ...` and
    `python benchmarks/...` spans (joined across line breaks)."""
    bash = [line for block in read_blocks(doc) if block.language == "bash"
            for line in block.code.replace("\\\n", " ").splitlines()]  # fmt: skip
    inline = [" ".join(span.split()) for span in INLINE_COMMAND.findall(doc.read_text(encoding="utf-8"))]
    return bash + inline


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_doc_commands_write_to_scratch_folders_not_over_committed_files(doc):
    for command in doc_commands(doc):
        words = shlex.split(command, comments=True)
        for option, value in itertools.pairwise(words):
            if option in ("--out", "--output_dir", "--out_dir"):
                top = Path(value).parts[0] if not Path(value).is_absolute() else ""
                assert top not in TRACKED, f"{doc.name}: `{command}` writes into the committed {value}"


@pytest.mark.parametrize("script", ["step_speed", "sharded_step", "gpu_check", "normalized_dpo_cost"])
def test_benchmarks_write_to_a_scratch_folder_by_default(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    default = re.search(r"--out OUT\s+directory of the JSON.*?\(default\s+(\S+)\)", done.stdout, flags=re.DOTALL)
    assert default, done.stdout
    assert not Path(default.group(1)).is_absolute() and Path(default.group(1)).parts[0] not in TRACKED, default.group(1)
