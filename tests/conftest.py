"""Session-scoped tiny pipelines and bundles: built once, shared by every test."""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine of this project reaches a model hub
# numpy's OpenBLAS threads wait for work by spinning: on a 2-core machine with another job running,
# a 128x128 SVD in test_zo took 0.76 s instead of milliseconds (that test: 16 s, 0.5 s with one
# thread). The tests' matrices are small, so one thread costs nothing. Set it to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Prepended to code run in a subprocess: makes torch, diffusers and transformers unimportable.
BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_cli_without_torch(argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``zoodip-edge ARGV`` in a child where torch, diffusers and transformers cannot be
    imported; the child also fails if any of them got imported anyway."""
    code = BLOCK_TORCH + (
        "import zoodip_edge.runtime.personalize, zoodip_edge.runtime.generate\n"
        "from zoodip_edge.cli import main\n"
        f"sys.argv = ['zoodip-edge'] + {list(argv)!r}\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    # A profile with malloc_hugetlb would make the CLI re-execute itself without the import block
    # and the check below; a tunable already naming hugetlb means no restart.
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoodip")


# ------------------------------------------------------------- kept between runs --
# Exporting the int8-cpu bundle that most runtime tests read takes about 40 s on 2 cores, so the
# tiny pipelines and that bundle are kept between runs in pytest's cache folder
# (.pytest_cache/d/tiny-bundles, git-ignored: a fresh clone, and so CI, builds everything). An
# entry's key hashes the source of every zoodip_edge module the exporter can import and the
# versions of the libraries it runs on: a change to any of them builds afresh. A test gets a copy
# in its own session folder, never the kept files. `--cache-clear` (or `-p no:cacheprovider`)
# runs cold. Tests of the export itself call export_bundle or export_once: those really export.

CACHE_LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "safetensors",
                   "tokenizers")
KEEP_KEYS = 3  # the most recently used keys stay (another branch, an edit undone); older ones go
_cache: dict = {}


def pytest_configure(config: pytest.Config) -> None:
    # The key is taken before any test module imports the exporter, and again before a build is
    # kept: a source edited in between (a run beside an editor) keeps nothing.
    if getattr(config, "cache", None) is not None:
        _cache.update(cache=config.cache, key=cache_key())


# Fixtures that export an SDXL bundle (tens of seconds, never kept between runs): a test that uses
# one belongs to the slow tier, whether or not it says so, so the fast tier stays fast.
EXPORTING_FIXTURES = {"sdxl_bundle", "sdxl_learned"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def exporter_sources(roots: tuple[str, ...] = ("zoodip_edge.export", "zoodip_edge.export.tiny")) -> list[Path]:
    """The source files of the zoodip_edge modules ``roots`` can import: every import statement
    (those inside functions too) followed through the package."""
    import zoodip_edge

    base = Path(zoodip_edge.__file__).parent.parent

    def source(name: str) -> Path | None:
        p = base.joinpath(*name.split("."))
        return p / "__init__.py" if (p / "__init__.py").is_file() else p.with_suffix(".py") if p.with_suffix(".py").is_file() else None

    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = source(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(parts + ([node.module] if node.module else []))
                found = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            for full in found:
                bits = full.split(".")
                if bits[0] == "zoodip_edge":  # a module and the packages above it (their __init__ runs)
                    todo += [".".join(bits[:i]) for i in range(1, len(bits) + 1)]
    return sorted(seen.values())


def cache_key() -> str:
    h = hashlib.sha256(f"{sys.version} {platform.machine()}\n".encode())
    for lib in CACHE_LIBRARIES:
        try:
            h.update(f"{lib} {metadata.version(lib)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib} -\n".encode())
    for path in [*exporter_sources(), Path(__file__)]:  # this file: how the pipelines and bundles are built
        h.update(f"{path.parent.name}/{path.name}\n".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:20]


def _cache_dir() -> Path | None:
    """This key's folder of kept pipelines and bundles; None without pytest's cache."""
    return _cache["cache"].mkdir("tiny-bundles") / _cache["key"] if _cache else None


def _prune(keys: Path) -> None:
    """Keys beyond the KEEP_KEYS most recently used, and not used within the hour, are removed."""
    entries = sorted((p for p in keys.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_KEYS:]:
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)


def restore(name: str, dst: Path) -> bool:
    """Copy the kept ``name`` to ``dst``; False when none is kept."""
    root = _cache_dir()
    if root is None or not (root / name).is_dir():
        return False
    try:
        shutil.copytree(root / name, dst, symlinks=True)
    except OSError:  # removed under us by a run of another key
        shutil.rmtree(dst, ignore_errors=True)
        return False
    os.utime(root)
    return True


def keep(name: str, made: Path) -> None:
    """Keep a copy of the folder ``made`` as ``name`` (once: a kept one stays as it is)."""
    root = _cache_dir()
    if root is None or (root / name).is_dir() or cache_key() != _cache["key"]:
        return
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(made, partial, symlinks=True)
    try:
        partial.rename(root / name)  # whole or not at all; a run beside this one may have kept it first
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    _prune(root.parent)


def _pipeline(work: Path, family: str) -> Path:
    out = work / f"tiny-{family}"
    if not out.exists():
        from zoodip_edge.export.tiny import build_tiny_pipeline

        if not restore(out.name, out):
            keep(out.name, build_tiny_pipeline(out, family=family, seed=0))
    return out


@pytest.fixture(scope="session")
def sd1_pipeline(work) -> Path:
    return _pipeline(work, "sd1")


@pytest.fixture(scope="session")
def sd2_pipeline(work) -> Path:
    return _pipeline(work, "sd2")


_bundles: dict = {}  # (pipeline, recipe) -> (folder, manifest) exported in this run
_shared: dict = {}  # the same, kept from an earlier run


def export_once(pipeline: Path, recipe: str, work: Path) -> tuple[Path, dict]:
    """A real export of ``pipeline`` with ``recipe``, once per run: for tests of the export. A copy
    is kept for shared_bundle in later runs."""
    key = (pipeline, recipe)
    if key not in _bundles:
        from zoodip_edge.export import export_bundle

        out = work / f"bundle-{pipeline.name}-{recipe}"
        _bundles[key] = (out, export_bundle(str(pipeline), out, recipe=recipe))
        keep(out.name, out)
    return _bundles[key]


def shared_bundle(pipeline: Path, recipe: str, work: Path) -> tuple[Path, dict]:
    """The bundle of ``pipeline`` with ``recipe`` for tests that read one: this run's export if it
    made one, else a copy of the one kept from an earlier run with the same exporter, else a real
    export (kept for the next run)."""
    key = (pipeline, recipe)
    if key in _bundles:
        return _bundles[key]
    if key not in _shared:
        import json

        out = work / f"kept-bundle-{pipeline.name}-{recipe}"
        if not restore(f"bundle-{pipeline.name}-{recipe}", out):
            return export_once(pipeline, recipe, work)
        _shared[key] = (out, json.loads((out / "manifest.json").read_text()))
    return _shared[key]


@pytest.fixture(scope="session")
def sd1_bundle(sd1_pipeline, work) -> Path:
    """The bundle most runtime tests use: SD1-like, int8-cpu (the default recipe)."""
    return shared_bundle(sd1_pipeline, "int8-cpu", work)[0]


@pytest.fixture()
def bundle_copy(sd1_bundle, tmp_path) -> Path:
    """A private copy to tamper with."""
    dst = tmp_path / "bundle"
    shutil.copytree(sd1_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Four photos of a red ball (ball0.png ...)."""
    from zoodip_edge.demo import draw_photos

    return draw_photos(tmp_path_factory.mktemp("photos"))
