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
RECIPES = ROOT / "recipes"  # shipped as online_merging/recipes
# imported by code that runs only where the dependency comes with something else
IMPLIED = {"triton": "CUDA builds of torch"}


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _package_files() -> set[str]:
    """The files a wheel must hold, by their path in it: the package's, and recipes/ as online_merging/recipes/."""
    recipes = {f"online_merging/recipes/{p.relative_to(RECIPES)}" for p in _files(RECIPES)}
    return {str(p.relative_to(ROOT)) for p in _files(PACKAGE)} | recipes


@pytest.mark.slow
def test_the_wheel_holds_every_file_of_the_package_and_train_finds_a_recipe_by_name_in_it(tmp_path):
    source = tmp_path / "source"
    for folder in (PACKAGE, RECIPES):
        shutil.copytree(folder, source / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
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
    installed = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(installed)]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=600)
    (tmp_path / "elsewhere").mkdir()  # no recipes/ folder here: the name is looked up in the package
    script = ("from online_merging.cli import main; from online_merging.integrations.recipe import find_recipe; "
              "print(find_recipe('dpo_recommended')); main(['train', 'kto_ondare', '--help'])")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(installed)}  # ahead of this environment's copy of the package
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path / "elsewhere",
                         env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == str(installed / "online_merging" / "recipes" / "dpo_recommended.yaml")
    assert "--desirable_weight" in run.stdout  # KTOConfig's keys: kto_ondare.yaml was read


def test_setup_cfg_lists_every_package_and_ships_every_recipe_file():
    """setup.cfg lists the packages (recipes/ is mapped in, which find: cannot do): a new subpackage must be added."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    assert listed == {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")} | {
        "online_merging.recipes"
    }
    assert config["options"]["package_dir"].split() == ["online_merging.recipes", "=", "recipes"]
    patterns = config["options.package_data"]["online_merging.recipes"].split(",")
    shipped = {p for pattern in patterns for p in RECIPES.glob(pattern.strip()) if p.is_file()}
    assert shipped | {RECIPES / "__init__.py"} == _files(RECIPES)


def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from online_merging.cli import main
    from online_merging.integrations.recipe import find_recipe

    monkeypatch.chdir(tmp_path)
    for name in ("dpo_recommended", "dpo_recommended.yaml"):
        assert find_recipe(name).read_bytes() == (RECIPES / "dpo_recommended.yaml").read_bytes()
    assert main(["train", "kto_ondare", "--help"]) == 0
    assert "--desirable_weight" in capsys.readouterr().out  # KTOConfig's keys: the shipped kto_ondare.yaml was read


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
