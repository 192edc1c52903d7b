"""Session-scoped tiny pipelines and bundles: built once, shared by every test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine of this project reaches a model hub

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


def _pipeline(work: Path, family: str) -> Path:
    from zoodip_edge.export.tiny import build_tiny_pipeline

    out = work / f"tiny-{family}"
    if not out.exists():
        build_tiny_pipeline(out, family=family, seed=0)
    return out


@pytest.fixture(scope="session")
def sd1_pipeline(work) -> Path:
    return _pipeline(work, "sd1")


@pytest.fixture(scope="session")
def sd2_pipeline(work) -> Path:
    return _pipeline(work, "sd2")


_bundles: dict = {}


def export_once(pipeline: Path, recipe: str, work: Path) -> tuple[Path, dict]:
    key = (pipeline, recipe)
    if key not in _bundles:
        from zoodip_edge.export import export_bundle

        out = work / f"bundle-{pipeline.name}-{recipe}"
        _bundles[key] = (out, export_bundle(str(pipeline), out, recipe=recipe))
    return _bundles[key]


@pytest.fixture(scope="session")
def sd1_bundle(sd1_pipeline, work) -> Path:
    """The bundle most runtime tests use: SD1-like, int8-cpu (the default recipe)."""
    return export_once(sd1_pipeline, "int8-cpu", work)[0]


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
