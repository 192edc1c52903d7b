"""The bundle: the folder that is the only contract between export and runtime.

``manifest.json`` describes it completely (see docs/bundle.md). This module reads,
writes and verifies it, and imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    """``{"path", "sha256", "bytes"}`` for a file inside the bundle folder."""
    p = root / rel
    return {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def recipe(self) -> str:
        return self.manifest["recipe"]["name"]

    @property
    def shared_prefix(self) -> bool:
        """The U-Net takes one sample/timestep row for a batch of conditions (export/prefix.py)."""
        return bool(self.manifest["recipe"].get("graphs", {}).get("unet", {}).get("shared_prefix_nodes"))

    def path(self, component: str) -> Path:
        """Absolute path of a component graph (or ``token_embeddings`` / ``tokenizer``)."""
        entry = self.manifest["components"].get(component) or self.manifest.get(component)
        if entry is None:
            raise UserError(f"bundle {self.root} has no {component!r}")
        return _inside(self.root, entry["path"])

    def files(self) -> Iterator[dict[str, Any]]:
        """Every file entry the manifest lists (graphs, their external data, table, tokenizer)."""
        for comp in self.manifest["components"].values():
            yield comp
            yield from comp.get("external_data", [])
        yield self.manifest["token_embeddings"]
        yield self.manifest["tokenizer"]


def _inside(root: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``root``, refusing absolute paths and escapes (``../``, symlinks)."""
    if os.path.isabs(rel):
        raise UserError(f"bundle manifest names an absolute path: {rel}")
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise UserError(f"bundle manifest path escapes the bundle folder: {rel}")
    return p


REQUIRED_KEYS = (
    "format_version", "family", "source", "recipe", "resolution", "scheduler", "latent_scale",
    "components", "token_embeddings", "tokenizer", "defaults", "verification", "session",
)


def load_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) check every file's size and sha256.

    Raises UserError with one line naming the first problem found.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"bundle folder not found: {root}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{root} is not a zoodip-edge bundle (no {MANIFEST})")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath}: manifest is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{mpath}: unknown bundle format_version {version!r} (this zoodip-edge reads {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{mpath}: manifest lacks {', '.join(missing)}")
    absent = [c for c in COMPONENTS if c not in manifest["components"]]
    if absent:
        raise UserError(f"{mpath}: manifest lacks component(s) {', '.join(absent)}")
    bundle = Bundle(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest())
    for entry in bundle.files():
        p = _inside(root, entry["path"])
        if not p.is_file():
            raise UserError(f"bundle file missing: {entry['path']}")
        if verify:
            if p.stat().st_size != entry["bytes"]:
                raise UserError(f"bundle file {entry['path']} has {p.stat().st_size} bytes, manifest says {entry['bytes']}")
            if sha256_file(p) != entry["sha256"]:
                raise UserError(f"bundle file {entry['path']} does not match its sha256 in the manifest (modified or corrupt)")
    return bundle


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """A new file, swapped in: never a partial manifest, never written through a hard link."""
    from .files import write_atomic

    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())


def rewrite_graph(root: Path, manifest: dict[str, Any], graph: str, rewrite: Callable[[Any], tuple[Any, Any]]) -> Any:
    """Replace one graph of the bundle folder ``root`` by ``rewrite(onnx model) -> (model, info)``.

    Writes a new file (a hard link to another bundle's file is replaced, never written through)
    and updates the graph's entry in ``manifest``, which the caller then writes; returns ``info``.
    Export-side tooling: imports onnx.
    """
    import onnx

    entry = manifest["components"][graph]
    if entry.get("external_data"):
        raise UserError(f"{graph}: graphs with external data are not handled")
    path = _inside(root, entry["path"])
    model, info = rewrite(onnx.load(path))
    path.unlink()
    onnx.save(model, path)
    entry.update(file_entry(root, entry["path"]))
    return info


def looks_like_bundle(path: Path) -> bool:
    """A folder (not a link) whose manifest.json is a JSON object with a bundle's keys: what
    ``export --force`` may replace. Files are not hashed: a damaged bundle is still ours."""
    manifest = Path(path) / MANIFEST
    if Path(path).is_symlink() or not Path(path).is_dir() or not manifest.is_file():
        return False
    try:
        m = json.loads(manifest.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and all(k in m for k in ("format_version", "components", "recipe"))


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse in one line unless ``out`` is free, or is a bundle and ``force`` is given."""
    if not os.path.lexists(out):
        return
    if not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link, not a zoodip-edge bundle folder; it will not be replaced")
    if not looks_like_bundle(out):
        raise UserError(f"{out} is not a zoodip-edge bundle (no manifest.json of ours); it will not be replaced")


def aside_pattern(out: Path) -> str:
    """Names ``publish`` and export give their folders beside ``out``: ``.NAME.partial-PID-HEX``
    (a bundle being written) and ``.NAME.old-PID-HEX`` (the replaced one, being removed)."""
    return rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)-[0-9a-f]{{12}}"


def aside_name(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}")


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a finished bundle from its temporary folder to ``out``, replacing it only if forced
    and only if it is a bundle (checked again: it may have changed during the export).

    The manifest is written last inside ``tmp``, so a folder without one was interrupted. The old
    bundle goes aside under a name of our own, then is removed.
    """
    check_replaceable(out, force)
    if not os.path.lexists(out):
        tmp.rename(out)
        return
    old = aside_name(out, "old")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)
