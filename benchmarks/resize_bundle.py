"""A bundle's resolution-specific graphs (U-Net, VAE encoder) exported again at another resolution,
without the gates, for memory and speed measurements only.

    python -m benchmarks.resize_bundle PIPELINE BUNDLE --resolution 1024 --out DIR

An SDXL-architecture export runs its gates for most of its time (19 of 36 minutes at 512 px on 2
cores, and its torch reference answers grow with the pixels), so the bundles that the 768 and 1024
px measurements need are made this way: the U-Net and the VAE encoder go through the same
functions as ``zoodip-edge export`` (torch export, attention fusion, the source bundle's recipe),
and everything that does not depend on the resolution (text encoders, token tables, tokenizers,
VAE decoder) is copied from BUNDLE, which must have been exported from PIPELINE. The graphs are
what an export at that resolution makes; only the gates are not run, so the manifest's
``verification`` says so and this folder is not a bundle to personalize real photos with.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import header, peak_rss_mb
from zoodip_edge.bundle import load_bundle, write_manifest
from zoodip_edge.export import _quiet, quantize_graph
from zoodip_edge.export.graphs import export_graph, graph_specs, vae_scale_factor
from zoodip_edge.export.load import load_pipeline
from zoodip_edge.recipes import RECIPES

RESIZED = ("unet", "vae_encoder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline", help="the diffusers pipeline folder BUNDLE was exported from")
    ap.add_argument("bundle")
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--out", required=True, help="a new folder")
    a = ap.parse_args()
    src = load_bundle(a.bundle, verify=False)
    m = json.loads(json.dumps(src.manifest))
    out = Path(a.out)
    if out.exists():
        sys.exit(f"{out} exists; choose a new --out")
    rec = RECIPES[m["recipe"]["name"]]
    if rec.calibrated:
        sys.exit(f"recipe {rec.name} calibrates on the model's inputs; not supported here")
    t0 = time.perf_counter()
    with _quiet():
        p = load_pipeline(a.pipeline)
    latent = a.resolution // vae_scale_factor(p)
    specs = {s.name: s for s in graph_specs(p, a.resolution) if s.name in RESIZED}
    out.mkdir(parents=True)
    raw = {}
    for name, spec in specs.items():
        print(f"exporting {name} at {a.resolution} px", file=sys.stderr, flush=True)
        raw[name] = out / "raw" / name / "model.onnx"
        raw[name].parent.mkdir(parents=True)
        with _quiet():
            export_graph(spec, p, str(raw[name]))
        gc.collect()
    del p
    gc.collect()
    for name in RESIZED:
        print(f"quantizing {name} ({rec.for_graph(name).name})", file=sys.stderr, flush=True)
        entry, info = quantize_graph(raw[name], out, name, rec)
        if "added_conditions" in m["recipe"]["graphs"].get(name, {}):
            info["added_conditions"] = m["recipe"]["graphs"][name]["added_conditions"]
        m["recipe"]["graphs"][name] = info
        m["components"][name] = entry
    shutil.rmtree(out / "raw")
    for name, entry in src.manifest["components"].items():
        if name not in RESIZED:
            for f in [entry, *entry.get("external_data", [])]:
                (out / f["path"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.root / f["path"], out / f["path"])
    for key in ("token_embeddings", "tokenizer", "token_embeddings_2", "tokenizer_2"):
        if key in m:
            shutil.copyfile(src.root / m[key]["path"], out / m[key]["path"])
    m["resolution"], m["latent_size"] = a.resolution, latent
    m["verification"] = {"not_run": f"U-Net and VAE encoder re-exported at {a.resolution} px without the gates "
                                    f"(benchmarks.resize_bundle) from a bundle exported at {src.manifest['resolution']} px"}
    write_manifest(out, m)
    load_bundle(out)  # every file's hash and the schema
    print(header(sys.argv))
    print(json.dumps({"resolution": a.resolution, "s": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb(),
                      "graph_bytes": {k: v["bytes"] + sum(e["bytes"] for e in v.get("external_data", []))
                                      for k, v in m["components"].items()}}))


if __name__ == "__main__":
    main()
