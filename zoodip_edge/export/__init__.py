"""Workstation stage: a diffusers pipeline -> a verified ONNX bundle.

    from zoodip_edge.export import export_bundle
    export_bundle("path/to/sd15", "bundle/", recipe="int8-cpu")

Imports torch, diffusers, transformers and onnx (the ``export`` extra).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

from ..errors import UserError

__all__ = ["export_bundle", "RECIPES", "DEFAULT_RECIPE"]

# Before transformers/diffusers are imported: their import-time notices are not for our users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from .quantize import DEFAULT_RECIPE, RECIPES  # noqa: E402

Progress = Callable[[str], None]


@contextlib.contextmanager
def _quiet():
    """torch.onnx and ORT's quantizers log per node at INFO; the user wants stages, not nodes."""
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(None):
            try:
                yield
            finally:
                logging.disable(logging.NOTSET)


def _io_entries(model) -> tuple[list[dict], list[dict]]:
    """Graph inputs/outputs (name, ORT-style dtype, shape with named dynamic axes) from the proto.

    Read from the model in memory: loading each graph into a session only for this would cost
    a second U-Net load per export (the gates load it anyway).
    """
    import onnx

    inits = {i.name for i in model.graph.initializer}

    def desc(values):
        return [{"name": v.name, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                 "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]}
                for v in values if v.name not in inits]

    return desc(model.graph.input), desc(model.graph.output)


def _save_graph(model, folder: Path, name: str) -> list[str]:
    """Save one graph as ``name/model.onnx``; weights go to external data past 1.8 GB (ONNX's 2 GB limit)."""
    import onnx

    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    for graph in (model.graph, *model.functions):
        drop_stack_traces(graph)
    big = model.ByteSize() > 1_800_000_000 if _proto_size_ok(model) else True
    if big:
        onnx.save_model(model, d / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return [f"{name}/model.onnx", f"{name}/model.onnx.data"]
    onnx.save_model(model, d / "model.onnx")
    return [f"{name}/model.onnx"]


#: Node metadata that torch's exporter writes with the exporting machine's file paths in it (Python
#: stack traces): a bundle carries no trace of where it was made, and exports of the same model
#: on two machines are the same bytes. The other metadata (module names, scopes) stays.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def drop_stack_traces(graph) -> None:
    """Remove ``STACK_TRACE`` from every node of ``graph`` (or function) and of its subgraphs."""
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                drop_stack_traces(sub)


def _proto_size_ok(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False


#: What SDXL's ``time_ids`` hold, in order (StableDiffusionXLPipeline._get_add_time_ids), in pixels.
SDXL_TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")


def _save_tokenizer(tokenizer, path: Path, model: str) -> None:
    """The tokenizer in the ``tokenizers`` library's format, truncating and padding to its length."""
    fast = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else None
    if fast is None:
        raise UserError(f"{model}: tokenizer has no fast (tokenizers) form; cannot write {path.name}")
    max_len = int(tokenizer.model_max_length)
    fast.enable_truncation(max_len)
    fast.enable_padding(length=max_len, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    fast.save(str(path))


def _text_entry(tokenizer, table) -> dict:
    """The manifest's ``text`` (or ``text_2``): a text encoder's length, width and special tokens."""
    return {"max_length": int(tokenizer.model_max_length), "hidden_size": int(table.shape[1]), "vocab_size": int(table.shape[0]),
            "bos_token_id": int(tokenizer.bos_token_id), "eos_token_id": int(tokenizer.eos_token_id),
            "pad_token_id": int(tokenizer.pad_token_id)}


def _sdxl_entries(p, table_2) -> dict:
    """The manifest's ``text_2`` and ``conditioning`` for an SDXL pipeline (read from its torch modules)."""
    from .graphs import time_ids_count
    from .verify_sdxl import pooled_rule

    return {"text_2": {**_text_entry(p.tokenizer_2, table_2), "projection_dim": int(p.text_encoder_2.config.projection_dim),
                       "pooled_at": pooled_rule(p)},
            "conditioning": {"encoder_hidden_states": ["text_encoder.penultimate_hidden_state",
                                                       "text_encoder_2.penultimate_hidden_state"],
                             "text_embeds": "text_encoder_2.text_embeds",
                             "time_ids": list(SDXL_TIME_IDS[:time_ids_count(p)]),
                             "force_zeros_for_empty_prompt": p.force_zeros_for_empty_prompt}}


def _model_inside(out: Path, model: str, config: str | None) -> Path | None:
    """The local model file or folder (or --config folder) that ``out`` is or contains, if any:
    compared both as written and with links resolved."""
    for given in (model, config):
        if not given or not Path(given).expanduser().exists():
            continue  # a hub id
        src = Path(given).expanduser()
        for a, b in ((out.resolve(), src.resolve()), (Path(os.path.abspath(out)), Path(os.path.abspath(src)))):
            if a == b or a in b.parents:
                return src
    return None


def export_bundle(
    model: str,
    out: str | Path,
    recipe: str = DEFAULT_RECIPE,
    resolution: int | None = None,
    force: bool = False,
    allow_unfaithful: bool = False,
    config: str | None = None,
    progress: Progress | None = None,
    defaults: dict | None = None,
) -> dict:
    """Export ``model`` to a bundle folder at ``out``; returns the manifest.

    Writes into a temporary sibling folder and renames at the end, so an interrupted export
    never leaves a folder that looks like a bundle. ``force`` replaces only an existing bundle,
    never the model itself or a folder holding it. Holds a lock on ``out`` while it works.
    ``defaults`` overrides the family's ZOODiP defaults that the manifest records (and the ZO
    fidelity gate's mu), for a model that wants others (the toy models). Raises UserError on bad
    input or a failed gate.
    """
    from ..bundle import check_replaceable
    from ..families import defaults_for
    from ..files import exclusive_lock

    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    defaults_for("sd1", defaults)  # bad keys or values fail before the model loads
    if resolution is not None and not 8 <= resolution <= 4096:  # the model's own multiple is checked once it loads
        raise UserError(f"--resolution must be from 8 to 4096 pixels, got {resolution}")
    from .load import check_single_file, model_kind

    kind = model_kind(model)  # a wrong path or file type fails before anything loads
    out = Path(os.path.abspath(out))  # "." or "x/.." would have no name for the siblings made beside it
    src = _model_inside(out, model, config)
    if src is not None:
        raise UserError(f"{out} is or contains the model being exported ({src}); choose another --out")
    if not out.parent.exists():
        raise UserError(f"output parent folder does not exist: {out.parent}")
    from ..files import check_writable

    check_writable(out, "the bundle")
    if kind == "single_file":
        check_single_file(model, config)  # a refiner, a foreign or truncated file: refused before it loads
    with exclusive_lock(out):
        check_replaceable(out, force)
        return _export(model, out, recipe, resolution, force, allow_unfaithful, config, progress or (lambda msg: None),
                       defaults)


def quantize_graph(raw: Path, folder: Path, name: str, rec, feeds: list | None = None,
                   lazy_weights: bool = True) -> tuple[dict, dict]:
    """Stage 2 of an export for one graph: the raw ONNX file ``raw`` (deleted with its folder
    afterwards) through attention fusion and the recipe ``rec``'s passes, saved as ``name/`` under
    ``folder``. Returns its manifest entry (files, inputs, outputs) and what the passes did."""
    import onnx

    from ..bundle import file_entry
    from ..heap import return_free_memory
    from .attention import fuse_attention
    from .graph_ops import load_lazily, load_remaining, weights_in
    from .quantize import LAZY_PASSES, quantize

    graph_rec = rec.for_graph(name)
    lazy = lazy_weights and set(graph_rec.passes_for(name)) <= LAZY_PASSES
    raw_folder = raw.parent
    with _quiet(), (weights_in(raw_folder) if lazy else contextlib.nullcontext()):  # passes of a whole graph read protos, not disk
        graph = load_lazily(raw) if lazy else onnx.load(str(raw))
        graph, fused = fuse_attention(graph)
        graph, info = quantize(graph, graph_rec.name, feeds, graph=name)
        graph = load_remaining(graph, raw_folder)
    info["recipe"] = graph_rec.name
    if fused:
        info["multi_head_attention"] = fused
    io = _io_entries(graph)
    files = _save_graph(graph, folder, name)
    del graph
    shutil.rmtree(raw_folder)
    gc.collect()
    # glibc keeps a freed graph's heap mapped (heap.py): 1.4 of the SD1.5 U-Net's 1.6 GB stayed
    # resident through the gates until malloc_trim
    return_free_memory()
    entry = file_entry(folder, files[0])
    entry["external_data"] = [file_entry(folder, f) for f in files[1:]]
    entry["inputs"], entry["outputs"] = io
    return entry, info


def _export(model: str, out: Path, recipe: str, resolution: int | None, force: bool, allow_unfaithful: bool,
            config: str | None, say: Progress, defaults_override: dict | None = None, lazy_weights: bool = True) -> dict:
    """The export in three stages, so that torch and the ONNX graphs are never in memory together:

    1. torch: ask the fp32 pipeline what the gates compare against, export each graph to a raw
       ONNX file, then free the torch modules;
    2. ONNX: quantize each raw graph with its large weights left on disk until a pass reads them
       (``lazy_weights``; graph_ops.load_lazily), save it, delete the raw file;
    3. ORT: run the gates on the bundle's sessions against the torch answers.

    ``lazy_weights=False`` loads each raw graph whole, as exports before 0.11.0 did; the bundle is
    byte-for-byte the same (tests/test_export_memory.py).
    """
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    from safetensors.numpy import save_file

    from .. import __version__
    from ..bundle import FORMAT_VERSION, aside_name, aside_pattern, file_entry, graph_features, publish, write_manifest
    from ..families import defaults_for
    from ..files import remove_stale
    from ..heap import return_free_memory
    from . import verify
    from .graphs import calibration_feeds, export_graph, graph_specs, vae_scale_factor
    from .load import load_pipeline, release_weights
    from .prefix import ADDED_CONDITIONS

    rec = RECIPES[recipe]
    say(f"loading {model}")
    with _quiet():
        p = load_pipeline(model, config=config)
    if p.family == "sdxl" and rec.calibrated:
        raise UserError(f"recipe {recipe} is not available for SDXL (its U-Net calibration has no added conditions yet)")
    scale = vae_scale_factor(p)
    resolution = resolution or int(p.unet.config.sample_size) * scale
    if resolution % (scale * 4):
        raise UserError(f"resolution {resolution} must be a multiple of {scale * 4}")
    latent = resolution // scale
    specs = graph_specs(p, resolution)
    defaults = defaults_for(p.family, defaults_override).to_dict()
    tables = [p.text_encoder.get_input_embeddings().weight.detach().numpy().astype(rec.embeddings_dtype)]
    if p.family == "sdxl":
        tables.append(p.text_encoder_2.get_input_embeddings().weight.detach().numpy().astype(rec.embeddings_dtype))
    gate_tables = tuple(t.astype(np.float32) for t in tables)  # what the gates feed: the bundle's table, as fp32
    text_entry = _text_entry(p.tokenizer, tables[0])
    sdxl_entries = _sdxl_entries(p, tables[1]) if p.family == "sdxl" else {}
    latent_channels = int(p.vae.config.latent_channels)
    latent_scale = float(getattr(p.vae.config, "scaling_factor", 0.18215))

    say(f"asking torch fp32 what the gates compare against (ZO fidelity at mu {defaults['mu']:g})")
    with _quiet():
        if p.family == "sdxl":
            from . import verify_sdxl

            refs = verify_sdxl.torch_references(p, specs, gate_tables, latent, resolution, defaults)
        else:
            refs = verify.torch_references(p, specs, gate_tables[0], latent, defaults)
    feeds = {s.name: calibration_feeds(s, p, latent) for s in specs if rec.for_graph(s.name).calibrated}

    remove_stale(out.parent, aside_pattern(out), folders=True)  # left by exports that were killed
    tmp = aside_name(out, "partial")
    tmp.mkdir()
    try:
        raw = {}
        for spec in specs:
            say(f"exporting {spec.name}")
            raw[spec.name] = tmp / "raw" / spec.name / "model.onnx"
            raw[spec.name].parent.mkdir(parents=True)
            with _quiet():
                export_graph(spec, p, str(raw[spec.name]))
            gc.collect()  # the exporter's intermediate copies of the weights
            release_weights(*p.modules())  # read again from their files by the graph that needs them
        say("writing token embeddings and tokenizer")
        save_file({"token_embedding": tables[0]}, str(tmp / "token_embeddings.safetensors"))
        _save_tokenizer(p.tokenizer, tmp / "tokenizer.json", model)
        if p.family == "sdxl":
            save_file({"token_embedding": tables[1]}, str(tmp / "token_embeddings_2.safetensors"))
            _save_tokenizer(p.tokenizer_2, tmp / "tokenizer_2.json", model)
        source, scheduler_config, family = p.source, p.scheduler_config, p.family
        del p  # the torch modules: from here on only the graphs are in memory
        gc.collect()
        return_free_memory()

        components, quant_info = {}, {}
        for spec in specs:
            say(f"quantizing {spec.name} ({rec.for_graph(spec.name).name})")
            components[spec.name], quant_info[spec.name] = quantize_graph(raw[spec.name], tmp, spec.name, rec, feeds.get(spec.name),
                                                                          lazy_weights)
            if spec.name == "unet" and family == "sdxl":  # the sdxl graph feature (bundle.FEATURES)
                quant_info[spec.name]["added_conditions"] = sum(n in ADDED_CONDITIONS for n in spec.inputs)
        shutil.rmtree(tmp / "raw")

        sdxl = {}  # the second text encoder's manifest entries
        if family == "sdxl":
            sdxl = {"text_2": sdxl_entries["text_2"],
                    "token_embeddings_2": {**file_entry(tmp, "token_embeddings_2.safetensors"), "tensor": "token_embedding",
                                           "shape": list(tables[1].shape), "dtype": str(tables[1].dtype)},
                    "tokenizer_2": file_entry(tmp, "tokenizer_2.json"), "conditioning": sdxl_entries["conditioning"]}

        say("verifying the bundle against torch fp32")
        paths = {s.name: tmp / components[s.name]["path"] for s in specs}
        with _quiet():
            if family == "sdxl":
                v = verify_sdxl.run_gates(refs, specs, paths, rec.session_config, gate_tables, defaults)
            else:
                v = verify.run_gates(refs, specs, paths, rec.session_config, gate_tables[0], defaults)
        v["parity_tolerance"] = rec.parity_tolerance
        verify.check_gates(v, recipe, allow_unfaithful)

        sched = {k: v_ for k, v_ in scheduler_config.items() if not k.startswith("_")}
        sched.setdefault("prediction_type", "epsilon")
        manifest = {
            "format_version": FORMAT_VERSION,
            "family": family,
            "source": source,
            "recipe": {"name": recipe, "description": rec.description, "experimental": rec.experimental,
                       "targets": list(rec.targets), "graphs": quant_info},
            "requires": graph_features(quant_info),  # what a runtime must understand (bundle.FEATURES)
            "resolution": resolution,
            "latent_size": latent,
            "latent_channels": latent_channels,
            "latent_scale": latent_scale,
            "scheduler": sched,
            "text": text_entry,
            "components": components,
            "session": {"config_entries": rec.session_config},
            "token_embeddings": {**file_entry(tmp, "token_embeddings.safetensors"), "tensor": "token_embedding",
                                 "shape": list(tables[0].shape), "dtype": str(tables[0].dtype)},
            "tokenizer": file_entry(tmp, "tokenizer.json"),
            **sdxl,
            "defaults": defaults,
            "verification": v,
            "created": {"tool": f"zoodip-edge {__version__}", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        }
        write_manifest(tmp, manifest)  # last: a folder without a manifest is not a bundle
        publish(tmp, out, force)
        say(f"bundle written to {out}")
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
