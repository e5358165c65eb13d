"""What users install: the wheel holds every file of the package, its extras cover every import, and CI tests the
installed copy (``.ci/run`` sets ``ONLINE_MERGING_TEST_INSTALLED=1``), not the source tree."""

import ast
import configparser
import contextlib
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import online_merging

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "online_merging"
# imported by code that runs only where the dependency comes with something else
IMPLIED = {"triton": "CUDA builds of torch"}


def _package_files() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_the_wheel_holds_every_file_of_the_package(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(PACKAGE, source / "online_merging", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n for n in names if n.startswith("online_merging/")} == _package_files()
    assert "online_merging/kernels/fused_cpu.cpp" in names
    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "online-merging = online_merging.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = lambda text: [line for line in text.splitlines() if line.strip() and not line.startswith("#")]  # noqa: E731
    extras = {name: lines(config["options.extras_require"][name]) for name in config["options.extras_require"]}
    return lines(config["options"]["install_requires"]), extras


def _closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, with the requirements of each (as installed here)."""
    names, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in names or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        names.add(name)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # not installed here: checked where it is
            todo += [Requirement(r) for r in importlib.metadata.requires(name) or []]
    return names


def _third_party_imports() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"online_merging"}


def test_the_extras_cover_every_import_and_all_holds_every_extra():
    required, extras = _extras()
    for name, items in extras.items():  # %(trl)s and the like, as configparser interpolates them
        assert all(Requirement(item) for item in items), name
    assert set(extras) == {"trl", "deepspeed", "bench", "eval", "mergekit", "dev", "all"}
    assert set(extras["all"]) == {item for name in extras if name not in ("dev", "all") for item in extras[name]}
    assert set(extras["all"]) <= set(extras["dev"])
    installed = _closure(required + extras["all"])
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in _third_party_imports() - set(IMPLIED):
        distributions = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [module])}
        if not distributions & installed:
            missing[module] = distributions
    assert not missing, f"imported by online_merging, in no extra (setup.cfg): {missing}"


@pytest.mark.skipif(os.environ.get("ONLINE_MERGING_TEST_INSTALLED") != "1", reason="only where .ci/run installed it")
def test_the_tests_import_the_installed_package():
    here = Path(online_merging.__file__).resolve()
    # the venv may live inside the checkout (.ci/run's .ci-venv): the source tree is the package folder itself
    assert not here.is_relative_to(ROOT / "online_merging"), f"the tests imported the source tree: {here}"
    assert any(here.is_relative_to(Path(p).resolve()) for p in site.getsitepackages()), here
    child = subprocess.run([sys.executable, "-c", "import online_merging; print(online_merging.__file__)"],
                           capture_output=True, text=True, cwd=ROOT, check=True)  # fmt: skip
    assert Path(child.stdout.strip()).resolve() == here  # subprocesses too, even started in the source tree
