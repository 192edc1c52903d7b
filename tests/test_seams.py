"""The package's seams: no import cycles between its modules, and one description of
personalize's options that the CLI and personalize-many both read."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "zoodip_edge"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every import statement (those inside
    functions too: a lazy import only moves a cycle's failure to whichever call runs first)."""
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # "from X import Y" runs X, and Y may be a module of X
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph(PACKAGE)
    assert "zoodip_edge.many" in graph["zoodip_edge.cli"]  # a lazy import inside a command
    assert "zoodip_edge.errors" in graph["zoodip_edge.runtime.checkpoint"]  # "from ..errors import"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_personalize_is_built_from_the_option_table():
    """Every parameter of the command comes from the table, in its order, with its kind."""
    from zoodip_edge.cli import personalize
    from zoodip_edge.personalize_options import PERSONALIZE

    params = inspect.signature(personalize).parameters
    hints = typing.get_type_hints(personalize)
    assert list(params) == [p.name for p in PERSONALIZE]
    kinds = {Path: "path", str: "str", int: "int", float: "float", bool: "bool"}
    for p in PERSONALIZE:
        args = typing.get_args(hints[p.name])
        base = next((a for a in args if a is not type(None)), hints[p.name])
        assert kinds[base] == p.kind, p.name
        assert (type(None) in args) == (p.default is None), p.name
        info = params[p.name].default
        assert (info.default, info.help) == (p.default, p.help), p.name


def test_a_jobs_argv_parses_back_to_its_options(tmp_path):
    """personalize-many's command line for a job is one the CLI reads back as the job's options."""
    import typer

    from zoodip_edge.cli import app
    from zoodip_edge.many import Job, personalize_argv
    from zoodip_edge.personalize_options import job_keys

    options = {"bundle": "/b", "images": "/i", "token": "<t>", "init": "x", "steps": "auto", "seed": 3, "lr": 0.02,
               "n": 4, "batched": False, "search_init": True, "no_puts": True, "format": "a1111", "templates": "style",
               "captions": "/c.json", "init_embedding": "/e.safetensors", "checkpoint_every": 7, "strict": True}
    job = Job("j", 1, options)
    argv = personalize_argv(job, tmp_path, job_keys())
    command = typer.main.get_command(app).commands["personalize"]
    parsed = command.make_context("personalize", argv).params
    names = {p.key: p.name for p in job_keys().values()}
    for key, value in options.items():
        got = parsed[names[key]]
        assert (str(got) if isinstance(got, Path) else got) == value, key
    assert parsed["batched"] is False and parsed["quiet"] is True and parsed["resume"] is False
    assert parsed["checkpoint"] == tmp_path / "jobs" / "j" / "checkpoint.ckpt"
