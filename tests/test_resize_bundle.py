"""benchmarks.resize_bundle: the bundles behind the SDXL 768 and 1024 px measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from zoodip_edge.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_resize_bundle_exports_the_resolution_graphs_again_and_copies_the_rest(sd1_pipeline, sd1_bundle, tmp_path):
    src = load_bundle(sd1_bundle)
    size = 2 * src.manifest["resolution"]
    out = tmp_path / "resized"
    r = subprocess.run([sys.executable, "-m", "benchmarks.resize_bundle", str(sd1_pipeline), str(sd1_bundle),
                        "--resolution", str(size), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    b = load_bundle(out)  # hashes and schema
    m = b.manifest
    assert (m["resolution"], m["latent_size"]) == (size, 2 * src.manifest["latent_size"])
    assert "not_run" in m["verification"]
    assert m["recipe"]["graphs"]["unet"]["weights_first"] > 0
    for name in ("text_encoder", "vae_decoder"):  # not resolution-specific: the source's files
        assert (out / m["components"][name]["path"]).read_bytes() == (sd1_bundle / src.manifest["components"][name]["path"]).read_bytes()
    image = next(i for i in m["components"]["vae_encoder"]["inputs"] if i["name"] == "image")
    assert image["shape"][2:] == [size, size]
    r = subprocess.run([sys.executable, "-m", "benchmarks.unet_forward", str(out), "--batch", "2", "--repeat", "1"],
                       cwd=ROOT, capture_output=True, text=True)  # its U-Net runs at the new size
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["batch"] == 2, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "benchmarks.resize_bundle", str(sd1_pipeline), str(sd1_bundle),
                        "--resolution", str(size), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "exists" in r.stderr  # never writes over a folder
