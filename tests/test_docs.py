"""Docs that match the code: the CLI reference is current, README links exist, packaging is complete."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from gen_cli import render
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run: python docs/gen_cli.py"


def test_readme_links_exist():
    for link in re.findall(r"\]\(([^)#]+)\)", (ROOT / "README.md").read_text()):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_readme_commands_are_real_cli_commands():
    import typer

    from zoodip_edge.cli import app

    names = set(typer.main.get_command(app).commands)
    blocks = "\n".join(re.findall(r"```(?:bash)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S))
    used = set(re.findall(r"^\s*zoodip-edge (\w+)", blocks, re.M))
    assert used and used <= names, used - names


def test_ci_runs_exactly_the_readme_setup_and_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"] and "make test" in readme
    make = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:\n((?:\t.*\n)+)", make, re.M).group(1)
    steps = [part.strip() for part in recipe.replace("\\\n", " ").split("&&")]
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", readme, re.S).group(1)
    setup = [re.sub(r"\s+#.*", "", line).strip() for line in block.splitlines() if line.strip()]
    flat = [part.strip() for line in setup for part in line.split("&&")]
    assert steps[: len(flat)] == flat
    assert steps[len(flat):] == ["ruff check .", "python -m pytest"] and "python -m pytest" in readme


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "zoodip_edge").rglob("__init__.py")}
    assert found <= listed, found - listed
    assert cfg["package-dir"]["zoodip_edge.devices"] == "devices"
    assert not (ROOT / "export" / "__init__.py").exists() and not (ROOT / "runtime" / "__init__.py").exists()


def test_help_lists_what_the_registries_hold():
    """Recipe and device choices in --help come from the recipe table and devices/, never a stale list."""
    import typer

    from zoodip_edge.cli import app
    from zoodip_edge.profiles import builtin_profiles
    from zoodip_edge.recipes import RECIPES

    commands = typer.main.get_command(app).commands
    recipe_help = next(p.help for p in commands["export"].params if p.name == "recipe")
    device_help = next(p.help for p in commands["personalize"].params if p.name == "device")
    assert all(name in recipe_help for name in RECIPES), recipe_help
    assert all(name in device_help.split(" | ") for name in builtin_profiles()), device_help


def test_the_recipe_table_loads_without_onnx():
    import subprocess
    import sys

    code = "import sys, zoodip_edge.cli, zoodip_edge.recipes; print('onnx' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], out


def test_recorded_results_and_docs_name_no_machines_paths():
    """Results, docs and the shipped bundles are read on other machines: no absolute path of the
    machine that wrote them (a home, a checkout or a temporary folder)."""
    paths = re.compile(rb"(?<![\w.])/(?:home|work|tmp|root|Users)/\w")
    found = []
    for folder in ("docs", "zoodip_edge/toy"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.is_file() and f.suffix in {".md", ".json", ".jsonl", ".txt", ".log", ".onnx"}:
                if paths.search(f.read_bytes()):
                    found.append(str(f.relative_to(ROOT)))
    found += [name for name in ("README.md", "CHANGELOG.md") if paths.search((ROOT / name).read_bytes())]
    assert not found, found
