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

from . import __version__
from .errors import UserError
from .families import SUPPORTED_FAMILIES
from .schema import Bool, Int, List, Num, Obj, Optional, SchemaError, Str, check

#: The manifest's layout. It changes only when a reader of the previous one would misread a
#: bundle of the new one; keys that readers may ignore are added without it (docs/bundle.md).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
#: SDXL's second text encoder: its graph, and the manifest keys of its table and tokenizer.
SECOND_TEXT_ENCODER = "text_encoder_2"
SECOND_TEXT_FILES = ("token_embeddings_2", "tokenizer_2")


@dataclass(frozen=True)
class Feature:
    """A graph feature an export may write and a runtime must understand, or (``required`` False)
    runs unchanged (docs/bundle.md)."""

    description: str
    key: str  # what the export records in ``recipe.graphs.<graph>`` when the pass ran: a count, or counts by kind
    since: str  # the zoodip-edge version whose exports first wrote it
    recipes: tuple[str, ...] | None  # the recipes whose exports write it now (None: every recipe)
    buys: str  # what re-exporting a bundle from before ``since`` buys
    families: tuple[str, ...] | None = None  # the model families whose exports write it (None: every family)
    unsupported: str | None = None  # why this runtime reads such a bundle but does not run it (one line)
    # False: an order or layout that any runtime runs unchanged; not in ``requires``, and judged by
    # the key alone (a bundle rewritten in place has it, whichever version exported it)
    required: bool = True


#: Every graph feature this zoodip-edge knows, in the order they came. A bundle whose manifest
#: ``requires`` a name not here is refused; one exported before a feature its recipe now has warns.
FEATURES: dict[str, Feature] = {
    "multi-head-attention": Feature(
        "attention as com.microsoft MultiHeadAttention (an ONNX Runtime contrib op)", "multi_head_attention",
        "0.2.0", None, "ONNX Runtime's flash attention (SD1.5 U-Net forward 8.0 -> 5.6 s, peak 2.0 -> 1.7 GB)"),
    "winograd": Feature(
        "the U-Net's 3x3 convolutions at 16x16 and larger as Winograd convolutions in plain ONNX ops", "winograd_convs",
        "0.4.0", ("int8-cpu", "int8-cpu-fast"), "1.7x faster 3x3 convolutions at 16x16 and larger (SD1.5 cpu step 0.75x)"),
    "shared-prefix": Feature(
        "the U-Net takes one sample and timestep row for a batch of text conditions and runs what does not read "
        "the condition once", "shared_prefix_nodes",
        "0.5.0", ("int8-cpu", "int8-cpu-fast"), "a lighter batched step (SD1.5 cpu profile: 178 MB less, U-Net 0.87-0.97x as long)"),
    "int8-matmul": Feature(
        "MatMulNBits nodes that compute in int8 (accuracy level 4)", "int8_matmul",
        "0.6.0", ("int8-cpu-fast",), "nothing: the recipe came with it"),
    "dequantized-matmul": Feature(
        "MatMul weights as block-wise DequantizeLinear + MatMul, kept apart by the session config", "dequantized_matmuls",
        "0.7.0", ("int8-cpu",), "plain float GEMMs instead of MatMulNBits' float path (SD1.5 cpu step on an AVX2-only CPU "
        "19.0 -> 17.9 s, 40 MB more)"),
    "weights-first": Feature(
        "the nodes that compute from weights alone (dequantization, Winograd weight transforms) listed first, so that "
        "ONNX Runtime runs each right before its consumer", "weights_first",
        "0.14.0", ("int8-cpu", "int8-cpu-fast"), "a lower peak: ONNX Runtime no longer dequantizes weights long before "
        "their use (SDXL U-Net forward at 1024 px, batch 1: 7,189 -> 4,110 MB peak RSS)", required=False),
    # A feature of the model, not of a recipe: every SDXL bundle has it, and a runtime from before
    # it refuses the bundle instead of feeding its U-Net one text encoder's output.
    "sdxl": Feature(
        "SDXL: a second text encoder with a pooled output at an EOS position given as input, and a U-Net with added "
        "conditions (text_embeds, time_ids)", "added_conditions",
        "0.9.0", None, "nothing: SDXL bundles came with it", families=("sdxl",)),
}


def _version(text: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\S*)", text)
    return tuple(map(int, m.groups())) if m else None


def graph_features(graphs: dict[str, Any]) -> list[str]:
    """The features that ``recipe.graphs`` shows in use (a non-zero count), in registry order: what
    an export writes as ``requires``, and what is inferred for a bundle exported before that key."""
    used = set()
    for info in graphs.values():
        for name, f in FEATURES.items():
            count = info.get(f.key) if isinstance(info, dict) and f.required else None
            if sum(count.values()) if isinstance(count, dict) else count:
                used.add(name)
    return [name for name in FEATURES if name in used]


def exporter_version(manifest: dict[str, Any]) -> tuple[int, ...] | None:
    """The zoodip-edge version that exported the bundle, where the manifest can tell: only bundles
    with ``requires`` (the versions before it all called themselves 0.1.0)."""
    tool = manifest.get("created", {}).get("tool", "")
    if "requires" not in manifest or not tool.startswith("zoodip-edge "):
        return None
    return _version(tool.removeprefix("zoodip-edge "))


def unknown_features(manifest: dict[str, Any]) -> list[str]:
    """What the bundle ``requires`` that this zoodip-edge does not know."""
    return [name for name in manifest.get("requires", []) if name not in FEATURES]


def compatibility(bundle: "Bundle") -> list[str]:
    """One line per feature the bundle's recipe has now that the bundle was exported without, with
    what re-exporting it buys. Bundles with ``requires`` are judged by their exporter's version;
    older ones by which passes ``recipe.graphs`` shows to have run (a pass records its count, 0 too)."""
    m, recipe = bundle.manifest, bundle.recipe
    made = exporter_version(m)
    graphs = m["recipe"].get("graphs", {})
    out = []
    for name, f in FEATURES.items():
        if f.recipes is not None and recipe not in f.recipes:
            continue
        if f.families is not None and bundle.family not in f.families:
            continue
        if made is not None and f.required:
            missing = made < _version(f.since)
        else:
            missing = not any(f.key in info for info in graphs.values())
        if missing:
            out.append(f"this {recipe} bundle predates {name} (zoodip-edge {f.since}); re-exporting it buys {f.buys}")
    return out


def check_runnable(bundle: "Bundle") -> None:
    """Refuse in one line a bundle that needs a feature this runtime reads but does not run."""
    for name in bundle.features:
        reason = FEATURES[name].unsupported if name in FEATURES else None
        if reason:
            raise UserError(f"{bundle.root}: {reason} (zoodip-edge {__version__})")


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
    def features(self) -> list[str]:
        """The graph features a runtime must understand: ``requires``, or for a bundle exported before
        that key, what ``recipe.graphs`` shows in use."""
        if "requires" in self.manifest:
            return list(self.manifest["requires"])
        return graph_features(self.manifest["recipe"].get("graphs", {}))

    @property
    def shared_prefix(self) -> bool:
        """The U-Net takes one sample/timestep row for a batch of conditions (export/prefix.py)."""
        return "shared-prefix" in self.features

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
        for key in ("token_embeddings", "tokenizer", *SECOND_TEXT_FILES):
            if key in self.manifest:  # the second text encoder's: SDXL's
                yield self.manifest[key]


def _inside(root: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``root``, refusing absolute paths and escapes (``../``, symlinks)."""
    if os.path.isabs(rel):
        raise UserError(f"bundle manifest names an absolute path: {rel}")
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise UserError(f"bundle manifest path escapes the bundle folder: {rel}")
    return p


def _dim(v: Any, where: str) -> None:
    """A graph dimension: a size, or the name of a dynamic axis."""
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v < 0):
        raise SchemaError(f"{where}: expected a size or an axis name, got {v!r}")


_FILE = {"path": Str(), "sha256": Str(pattern="[0-9a-f]{64}"), "bytes": Int(0)}
_IO = List(Obj({"name": Str(), "shape": List(_dim)}, optional={"dtype": Str()}))


def _scalar(v: Any, where: str) -> None:
    if not isinstance(v, (str, int, float, bool)):
        raise SchemaError(f"{where}: expected a string or number, got {v!r}"[:200])


_GRAPH = Obj(_FILE, optional={"external_data": List(Obj(_FILE)), "inputs": _IO, "outputs": _IO})
_TABLE = Obj(_FILE, optional={"tensor": Str(), "dtype": Str(), "shape": List(Int(1), 2)})
_TEXT_KEYS = {"max_length": Int(2, 4096), "pad_token_id": Int(0)}
_TEXT_IDS = {k: Int(0) for k in ("bos_token_id", "eos_token_id", "vocab_size", "hidden_size")}
_TEXT = Obj(_TEXT_KEYS, optional=_TEXT_IDS)

#: What a runtime relies on in manifest.json (docs/bundle.md); other keys are free to add.
MANIFEST_SCHEMA = Obj({
    "format_version": Int(FORMAT_VERSION, FORMAT_VERSION),
    "family": Str(SUPPORTED_FAMILIES),
    "source": Obj({}),
    "recipe": Obj({"name": Str()}, optional={"graphs": Obj({}, extra=Obj({}, optional={"int8_matmul": Int(0)})),
                                             "description": Str(), "experimental": Bool(), "targets": List(Str())}),
    "resolution": Int(8, 16384),
    "scheduler": Obj({}, optional={
        "num_train_timesteps": Int(2, 100_000), "beta_start": Num(above=0, hi=1), "beta_end": Num(above=0, hi=1),
        "beta_schedule": Str(("linear", "scaled_linear", "squaredcos_cap_v2")),
        "prediction_type": Str(("epsilon", "v_prediction")), "trained_betas": Optional(List(Num(0, 1)))}),
    "latent_scale": Num(above=0),
    "components": Obj({c: _GRAPH for c in COMPONENTS}, optional={SECOND_TEXT_ENCODER: _GRAPH}),
    "token_embeddings": _TABLE,
    "tokenizer": Obj(_FILE),
    "text": _TEXT,
    "defaults": Obj({"n": Int(1, 256), "mu": Num(above=0), "lr": Num(above=0), "tau": Int(2, 4096), "nu": Num(0, 1),
                     "t_low": Int(0), "t_high": Int(1), "steps": Int(1)},
                    optional={"search_init": Bool(), "guide_momentum": Bool(), "guide_k": Int(0), "guide_vocab": Int(0),
                              "guide_alpha": Num(above=0, hi=1), "guide_encoder": Int(0, 256), "guide_refresh": Int(1)}),
    "verification": Obj({}),
    "session": Obj({"config_entries": Obj({}, extra=_scalar)}),
    "latent_channels": Int(1, 64),
    "latent_size": Int(1, 4096),
}, optional={"created": Obj({}, optional={"tool": Str()}), "requires": List(Str(pattern="[a-z0-9][a-z0-9-]{0,63}")),
             "token_embeddings_2": _TABLE, "tokenizer_2": Obj(_FILE),
             "text_2": Obj(_TEXT_KEYS, optional={**_TEXT_IDS, "projection_dim": Int(1),
                                                      "pooled_at": Str(("max_id", "first_eos"))}),
             "conditioning": Obj({})})


def _inputs(manifest: dict, component: str) -> dict[str, list]:
    return {i["name"]: i["shape"] for i in manifest["components"][component].get("inputs", [])}


def check_token_ids(text: dict[str, Any], rows: int, where: str = "text") -> None:
    """SchemaError if a special token id of the manifest's ``text`` falls outside a table of ``rows``."""
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if text.get(key, 0) >= rows:
            raise SchemaError(f"{where}.{key}: {text[key]} is outside the token table's {rows} rows")


def _check_text(manifest: dict, text_key: str, table_key: str, graph: str) -> None:
    """A text encoder's ``text`` entry agrees with its token table and its graph's inputs."""
    text, table = manifest[text_key], manifest.get(table_key, {}).get("shape")
    rows = table[0] if table else text.get("vocab_size")
    if rows is not None:
        check_token_ids(text, rows, text_key)
    if table and text.get("vocab_size", table[0]) != table[0]:
        raise SchemaError(f"{text_key}.vocab_size {text['vocab_size']} differs from the token table's {table[0]} rows")
    width = table[1] if table else text.get("hidden_size")
    embeds = _inputs(manifest, graph).get("inputs_embeds") if graph in manifest["components"] else None
    if embeds is not None and len(embeds) == 3:
        for got, want, what in ((embeds[1], text["max_length"], f"{text_key}.max_length"), (embeds[2], width, "the token width")):
            if want is not None and isinstance(got, int) and got != want:
                raise SchemaError(f"components.{graph}: inputs_embeds is {got} where {what} is {want}")


def validate_manifest(manifest: Any) -> None:
    """Refuse (SchemaError, one line) a manifest whose fields have the wrong kinds, or that
    contradicts itself: token ids outside the table, widths or lengths that differ between graphs."""
    check(manifest, MANIFEST_SCHEMA)
    text, d = manifest["text"], manifest["defaults"]
    steps = manifest["scheduler"].get("num_train_timesteps", 1000)
    if not d["t_low"] < d["t_high"] <= steps:
        raise SchemaError(f"defaults: timestep range [{d['t_low']}, {d['t_high']}) is not inside [0, {steps})")
    if manifest["family"] == "sdxl":
        missing = [k for k in ("text_2", *SECOND_TEXT_FILES) if k not in manifest]
        missing += [f"components.{SECOND_TEXT_ENCODER}"] * (SECOND_TEXT_ENCODER not in manifest["components"])
        if missing or "sdxl" not in manifest.get("requires", []):
            raise SchemaError(f"family: sdxl needs {', '.join(missing) or 'requires: sdxl'}")
    _check_text(manifest, "text", "token_embeddings", "text_encoder")
    if "text_2" in manifest:
        _check_text(manifest, "text_2", "token_embeddings_2", SECOND_TEXT_ENCODER)
    cond = _inputs(manifest, "unet").get("encoder_hidden_states")
    if cond is not None and len(cond) == 3 and isinstance(cond[1], int) and cond[1] != text["max_length"]:
        raise SchemaError(f"components.unet: encoder_hidden_states has {cond[1]} tokens where text.max_length is {text['max_length']}")


def check_graph_inputs(bundle: "Bundle", component: str, inputs: list[tuple[str, list]]) -> None:
    """Refuse a graph whose inputs (``(name, shape)`` as ONNX Runtime reports them) are not the ones
    the manifest describes: same names, and the same size wherever both give a number."""
    want = _inputs(bundle.manifest, component)
    if not want:
        return
    got = dict(inputs)
    if set(got) != set(want):
        raise UserError(f"bundle {bundle.root}: {component} graph takes {', '.join(sorted(got))}; "
                        f"its manifest says {', '.join(sorted(want))} (re-export the bundle)")
    for name, shape in want.items():
        theirs = got[name]
        if len(theirs) != len(shape) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                            for a, b in zip(shape, theirs)):
            raise UserError(f"bundle {bundle.root}: {component} input {name} has shape {theirs}; "
                            f"its manifest says {shape} (re-export the bundle)")


def load_bundle(root: str | os.PathLike, verify: bool = True, run: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) check every file's size and sha256.

    ``run``: the caller means to run the bundle's graphs, so a bundle needing a feature this
    runtime only reads (``Feature.unsupported``) is refused; False to read it (``inspect``).
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
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UserError(f"{mpath}: bundle format_version {version} is newer than this zoodip-edge {__version__} reads "
                        f"({FORMAT_VERSION}); upgrade zoodip-edge")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UserError(f"{mpath}: unknown bundle format_version {version!r} (this zoodip-edge reads {FORMAT_VERSION})")
    try:
        validate_manifest(manifest)
    except SchemaError as e:
        raise UserError(f"{mpath}: invalid manifest: {e}") from None
    unknown = unknown_features(manifest)
    if unknown:
        raise UserError(f"{mpath}: this bundle requires {', '.join(unknown)}, which zoodip-edge {__version__} does not "
                        f"know (exported by {manifest.get('created', {}).get('tool', 'an unknown exporter')}); "
                        "upgrade zoodip-edge")
    bundle = Bundle(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest())
    if run:
        check_runnable(bundle)
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
