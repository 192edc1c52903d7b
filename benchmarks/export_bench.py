"""Export benchmark on the SD1.5 architecture (published configs, random weights).

For each recipe: export time and peak RSS, file sizes, the gates' figures, and ORT CPU-EP
U-Net s/forward and peak RSS at batch 1 and 3, each measurement in its own process.

    python -m benchmarks.export_bench --work bench-work [--recipes int8-cpu,int8-gpu,fp32,fp16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import header, run_measured

ap = argparse.ArgumentParser()
ap.add_argument("--work", type=Path, required=True)
ap.add_argument("--recipes", default="int8-cpu,int8-gpu,fp32,fp16")
ap.add_argument("--batches", default="1,3")
ap.add_argument("--out", type=Path, help="also write the markdown table here")
a = ap.parse_args()
a.work.mkdir(parents=True, exist_ok=True)
pipe = a.work / "sd15-architecture"
if not (pipe / "model_index.json").exists():
    from zoodip_edge.export.tiny import build_sd15_architecture

    build_sd15_architecture(pipe)

rows = []
for recipe in a.recipes.split(","):
    bundle = a.work / f"sd15-{recipe}"
    cmd = ["zoodip-edge", "export", str(pipe), "--out", str(bundle), "--recipe", recipe, "--force"]
    if recipe in ("fp16", "w8a8-dynamic"):
        cmd.append("--allow-unfaithful")  # measured for the record; the gate's verdict is reported
    if (bundle / "manifest.json").exists():
        exp = {"wall_s": float("nan"), "peak_rss_mb": float("nan"), "rc": 0, "reused": True}
    else:
        exp = run_measured(cmd)
    if exp["rc"] != 0:
        rows.append({"recipe": recipe, "error": exp["stderr"].strip().splitlines()[-1]})
        continue
    m = json.loads((bundle / "manifest.json").read_text())
    size = {k: (c["bytes"] + sum(e["bytes"] for e in c["external_data"])) / 1e6 for k, c in m["components"].items()}
    v = m["verification"]
    row = {"recipe": recipe, "export_s": exp["wall_s"], "export_peak_mb": exp["peak_rss_mb"],
           "te_mb": size["text_encoder"], "unet_mb": size["unet"], "vae_mb": size["vae_encoder"] + size["vae_decoder"],
           "pearson": v["zo_fidelity"]["pearson"], "fid_passed": v["zo_fidelity"]["passed"],
           "cond": v["conditioning_sensitivity"]["ratio"], "unet_rel": v["parity"]["unet"]["out_sample"]["rel"]}
    for b in a.batches.split(","):
        r = run_measured([sys.executable, "-m", "benchmarks.unet_forward", str(bundle), "--batch", b])
        res = r["result"] or {}
        row[f"b{b}_s"] = res.get("s_per_forward", float("nan"))
        row[f"b{b}_mb"] = res.get("peak_rss_mb", float("nan"))
    rows.append(row)
    print(json.dumps(row), flush=True)

bs = a.batches.split(",")
lines = [header(sys.argv), "",
         "| recipe | export s | export peak MB | text enc MB | U-Net MB | VAE MB | ZO fidelity (pearson) | conditioning kept | U-Net rel err | "
         + " | ".join(f"U-Net s/fwd b{b} | peak MB b{b}" for b in bs) + " |",
         "|---" * (9 + 2 * len(bs)) + "|"]
for r in rows:
    if "error" in r:
        lines.append(f"| {r['recipe']} | failed: {r['error']} |")
        continue
    fid = f"{r['pearson']:.4f}" + ("" if r["fid_passed"] else " (fails gate)")
    lines.append(f"| {r['recipe']} | {r['export_s']:.0f} | {r['export_peak_mb']:.0f} | {r['te_mb']:.0f} | {r['unet_mb']:.0f} | "
                 f"{r['vae_mb']:.0f} | {fid} | {r['cond']:.3f} | {r['unet_rel']:.2g} | "
                 + " | ".join(f"{r[f'b{b}_s']:.2f} | {r[f'b{b}_mb']:.0f}" for b in bs) + " |")
table = "\n".join(lines)
print(table)
if a.out:
    a.out.write_text(table + "\n")
