"""The tiny pipelines and bundles kept between test runs (conftest.py) are keyed by the exporter's
source: a kept bundle is never served to an exporter that changed."""

from __future__ import annotations

from pathlib import Path

import conftest


def test_the_key_follows_every_module_the_exporter_can_import():
    names = {f"{p.parent.name}/{p.name}" for p in conftest.exporter_sources()}
    # imported at module level, inside functions (graphs.py imports schedule in one) and as packages
    assert {"export/__init__.py", "export/quantize.py", "export/tiny.py", "zoodip_edge/recipes.py",
            "zoodip_edge/schedule.py", "zoodip_edge/__init__.py", "zoodip_edge/bundle.py"} <= names
    assert not any(n.startswith(("runtime/", "toy/", "many/")) for n in names), names  # the runtime is not the exporter's


def test_the_key_changes_with_a_source_byte(tmp_path, monkeypatch):
    source = tmp_path / "export" / "quantize.py"
    source.parent.mkdir()
    source.write_text("BLOCK = 32\n")
    monkeypatch.setattr(conftest, "exporter_sources", lambda: [source])
    before = conftest.cache_key()
    assert conftest.cache_key() == before
    source.write_text("BLOCK = 64\n")
    assert conftest.cache_key() != before


def test_a_test_gets_a_copy_never_the_kept_files(sd1_bundle):
    cache = conftest._cache_dir()
    assert cache is None or not Path(sd1_bundle).resolve().is_relative_to(cache.resolve())
