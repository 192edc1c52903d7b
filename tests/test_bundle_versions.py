"""Versions and graph features: what an export records, and how inspect, personalize and generate
decide from it to run, to warn (with what re-exporting buys), or to refuse in one line."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import zoodip_edge
from zoodip_edge import bundle as B
from zoodip_edge.cli import app

from cli_checks import personalize_args, refused

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TOY = Path(zoodip_edge.__file__).parent / "toy"


def _edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m, indent=2))


def _generate(bundle: Path, out: Path) -> list:
    return ["generate", bundle, "--prompt", "a dog", "--out", out, "--steps", "1", "--device", "cpu", "-q"]


# ------------------------------------------------------------------ the version ---------------
def test_one_version_recorded_in_package_changelog_and_export(sd1_bundle):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "zoodip_edge.__version__"}
    first = re.search(r"^## (\d\S*) — \d{4}-\d\d-\d\d$", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert first == zoodip_edge.__version__, "CHANGELOG's newest version heading is the package's version"
    m = json.loads((sd1_bundle / "manifest.json").read_text())
    assert m["created"]["tool"] == f"zoodip-edge {zoodip_edge.__version__}"
    assert B.exporter_version(m) == tuple(map(int, zoodip_edge.__version__.split(".")))


def test_every_feature_came_with_a_changelog_version():
    versions = re.findall(r"^## (\d+\.\d+\.\d+) — ", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert versions, "CHANGELOG headings read '## X.Y.Z — DATE'"
    for name, f in B.FEATURES.items():
        assert f.since in versions, (name, f.since)
        assert B._version(f.since) <= B._version(zoodip_edge.__version__)


# ------------------------------------------------------------------ what an export records ----
def test_export_records_the_features_it_wrote(sd1_bundle):
    m = json.loads((sd1_bundle / "manifest.json").read_text())
    graphs = m["recipe"]["graphs"]
    assert m["requires"] == B.graph_features(graphs)
    # the tiny int8-cpu bundle: the prefix and the dequantized MatMuls are there, Winograd rewrote nothing at 8x8
    assert {"shared-prefix", "dequantized-matmul"} <= set(m["requires"])
    assert graphs["unet"]["winograd_convs"] == {} and "winograd" not in m["requires"]
    assert ("multi-head-attention" in m["requires"]) == any(g.get("multi_head_attention") for g in graphs.values())
    assert B.load_bundle(sd1_bundle).features == m["requires"]


def test_feature_registry_matches_the_recipes():
    """A feature's recipes are the ones with the export pass that writes it (Recipe.passes)."""
    from zoodip_edge.export.quantize import PASSES, RECIPES

    writer = {"winograd": "winograd_convs", "shared-prefix": "shared_prefix", "int8-matmul": "int8_compute_matmuls",
              "dequantized-matmul": "block_int8_matmuls"}
    model = {"sdxl"}  # a feature of the model family, not of a recipe's passes: every recipe writes it for SDXL
    order = {"weights-first"}  # every export's last step; it matters where passes made weight-only chains
    assert set(writer) | {"multi-head-attention"} | model | order == set(B.FEATURES) and set(writer.values()) <= set(PASSES)
    for name, pass_name in writer.items():
        users = {r for r, rec in RECIPES.items() if any(pass_name in passes for passes in rec.passes.values())}
        assert set(B.FEATURES[name].recipes) == users, name
    chains = {r for r, rec in RECIPES.items() if any({"block_int8_matmuls", "winograd_convs"} & set(p) for p in rec.passes.values())}
    assert set(B.FEATURES["weights-first"].recipes) == chains and not B.FEATURES["weights-first"].required
    assert all(B.FEATURES[name].required for name in set(B.FEATURES) - order)
    assert B.FEATURES["multi-head-attention"].recipes is None  # every export rewrites attention
    assert all(B.FEATURES[name].recipes is None and B.FEATURES[name].families for name in model)


# ------------------------------------------------------------------ refusals ------------------
def test_a_feature_this_runtime_does_not_know_is_refused_in_one_line(bundle_copy, photos, tmp_path):
    _edit(bundle_copy, lambda m: m.update(requires=[*m["requires"], "sparse-attention"]))
    match = "requires sparse-attention, which zoodip-edge"
    refused(["inspect", bundle_copy], bundle_copy, match=match)
    refused(_generate(bundle_copy, tmp_path / "g"), bundle_copy, tmp_path, match=match)
    refused(personalize_args(bundle_copy, photos, tmp_path / "e.safetensors", "--steps", "1"),
            bundle_copy, photos, tmp_path, match=match)


def test_a_newer_format_version_is_refused_in_one_line(bundle_copy, photos, tmp_path):
    _edit(bundle_copy, lambda m: m.update(format_version=B.FORMAT_VERSION + 1))
    match = f"format_version {B.FORMAT_VERSION + 1} is newer than this zoodip-edge"
    refused(["inspect", bundle_copy], bundle_copy, match=match)
    refused(_generate(bundle_copy, tmp_path / "g"), bundle_copy, tmp_path, match=match)
    refused(personalize_args(bundle_copy, photos, tmp_path / "e.safetensors", "--steps", "1"),
            bundle_copy, photos, tmp_path, match=match)


@pytest.mark.parametrize("requires", ["shared-prefix", ["Shared Prefix"], [3]])
def test_requires_must_be_a_list_of_feature_names(bundle_copy, requires):
    _edit(bundle_copy, lambda m: m.update(requires=requires))
    refused(["inspect", bundle_copy], bundle_copy, match="requires")


# ------------------------------------------------------------------ warnings ------------------
def _as_exported_before_dequantized_matmuls(m: dict) -> None:
    """The manifest an int8-cpu export of 0.5.0 or 0.6.0 wrote: no ``requires``, no dequantized_matmuls
    count (the graphs stay as they are: a runtime loads both forms)."""
    m.pop("requires")
    m["created"]["tool"] = "zoodip-edge 0.1.0"
    for info in m["recipe"]["graphs"].values():
        info.pop("dequantized_matmuls", None)


def test_an_old_bundle_runs_and_warns_with_what_re_exporting_buys(bundle_copy, photos, tmp_path):
    assert B.compatibility(B.load_bundle(bundle_copy)) == []  # a fresh export: nothing to warn about
    _edit(bundle_copy, _as_exported_before_dequantized_matmuls)
    want = "this int8-cpu bundle predates dequantized-matmul (zoodip-edge 0.7.0); re-exporting it buys plain float GEMMs"
    r = runner.invoke(app, ["inspect", str(bundle_copy)])
    assert r.exit_code == 0 and "(inferred from recipe.graphs" in r.stdout, r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {want}"), r.stderr
    for args in (_generate(bundle_copy, tmp_path / "g"),
                 personalize_args(bundle_copy, photos, tmp_path / "e.safetensors", "--steps", "1", "--no-search-init")):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, (r.output, r.exception)
        assert r.stderr.count(want) == 1, r.stderr


def test_a_bundle_with_requires_is_judged_by_its_exporter_version(bundle_copy):
    b = B.load_bundle(bundle_copy)
    b.manifest["created"]["tool"] = "zoodip-edge 0.6.0"  # requires kept: what that exporter wrote, read as such
    assert [w.split(" (")[0] for w in B.compatibility(b)] == ["this int8-cpu bundle predates dequantized-matmul"]
    b.manifest["created"]["tool"] = "zoodip-edge 0.4.0"
    assert [w.split(" (")[0] for w in B.compatibility(b)] == ["this int8-cpu bundle predates shared-prefix",
                                                             "this int8-cpu bundle predates dequantized-matmul"]
    b.manifest["recipe"]["name"] = "int8-gpu"  # the CPU passes are not int8-gpu's: nothing missing
    assert B.compatibility(b) == []


def test_weights_first_is_judged_by_its_key_and_never_required(bundle_copy):
    """An ordering any runtime runs: a fresh export records it in every graph and leaves it out of
    ``requires``; a bundle without the key warns whatever its exporter's version, one with the key
    (a bundle rewritten in place) does not."""
    b = B.load_bundle(bundle_copy)
    graphs = b.manifest["recipe"]["graphs"]
    assert all("weights_first" in info for info in graphs.values()) and "weights-first" not in b.manifest["requires"]
    assert graphs["unet"]["weights_first"] > 0 and B.compatibility(b) == []
    for info in graphs.values():
        info.pop("weights_first")
    assert [w.split(" (")[0] for w in B.compatibility(b)] == ["this int8-cpu bundle predates weights-first"]
    graphs["unet"]["weights_first"] = 7
    b.manifest["created"]["tool"] = "zoodip-edge 0.10.0"  # before the feature, rewritten since
    assert B.compatibility(b) == []


def test_inspect_lists_what_the_bundle_requires(bundle_copy):
    r = runner.invoke(app, ["inspect", str(bundle_copy)])
    m = json.loads((bundle_copy / "manifest.json").read_text())
    assert r.exit_code == 0 and r.stderr == ""
    assert f"requires    {', '.join(m['requires'])}\n" in r.stdout
    assert f"exporter    zoodip-edge {zoodip_edge.__version__}, " in r.stdout


# ------------------------------------------------------------------ the shipped toy bundles ----
def test_the_old_toy_bundle_has_no_requires_and_its_features_are_inferred():
    old, new = B.load_bundle(TOY / "bundle", verify=False), B.load_bundle(TOY / "bundle-768", verify=False)
    assert "requires" not in old.manifest and new.manifest["requires"] == new.features
    # exported 2026-11-27, before Winograd, the shared prefix and the dequantized MatMuls
    assert old.features == ["multi-head-attention"] and not old.shared_prefix
    assert [w.split(" (")[0] for w in B.compatibility(old)] == [f"this int8-cpu bundle predates {f}" for f in
                                                                ("winograd", "shared-prefix", "dequantized-matmul")]
    # exported by 0.10.0, with requires: every pass ran (Winograd with nothing to rewrite at 8x8), nothing to warn about
    assert new.features == ["multi-head-attention", "shared-prefix", "dequantized-matmul"] and new.shared_prefix
    assert B.compatibility(new) == []


def test_the_old_toy_bundle_generates_and_says_what_re_exporting_buys(tmp_path):
    r = runner.invoke(app, [str(a) for a in _generate(TOY / "bundle", tmp_path / "g")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stderr.count("warning: this int8-cpu bundle predates") == 3 and "re-exporting it buys" in r.stderr
    assert (tmp_path / "g" / "grid.png").is_file()
