"""Export gates: parity with torch fp32, ZO fidelity and conditioning sensitivity.

Each figure lands in the manifest's ``verification``; a failed gate stops the export. The gates
run in two halves: ``torch_references`` asks the torch fp32 pipeline everything the gates compare
against before any graph is built, so that the export can free the torch modules before it
quantizes; ``run_gates`` then asks the bundle's sessions the same questions. Torch and the bundle
are never in memory together (for SDXL that is the difference between 14 GB and 20 GB).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort
import torch

from ..errors import UserError
from ..schedule import alphas_cumprod, noisy_and_target
from .graphs import GraphSpec, TextEncoderFromEmbeddings, UNetWrapper, dummy_inputs
from .load import LoadedPipeline, release_weights

FIDELITY_MIN_PEARSON = 0.95
CONDITIONING_MIN_RATIO = 0.9
PROMPTS = ("a photo of a dog", "a painting of a red car on the beach")


def session(path: Path, config: dict) -> ort.InferenceSession:
    """A gate's session: no arena and no memory pattern, which keep each session's largest
    activations allocated between runs (the SD1.5 gates peaked at 3.8 GB RssAnon with them, 2.8
    without; docs/performance.md)."""
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def parity_reference(spec: GraphSpec, p: LoadedPipeline) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]:
    """Fixed inputs of one graph and the torch fp32 module's outputs for them."""
    inputs = dummy_inputs(spec, batch=1, seed=1)
    module = spec.wrap(p).eval()
    with torch.no_grad():
        ref = module(*inputs.values())
    release_weights(module)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return {k: v.numpy() for k, v in inputs.items()}, tuple(r.numpy() for r in ref)


def graph_parity(spec: GraphSpec, reference: tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]],
                 sess: ort.InferenceSession) -> dict:
    """Max-abs and relative error of the bundle graph vs the torch fp32 module on fixed inputs."""
    inputs, ref = reference
    got = sess.run(list(spec.outputs), inputs)
    return {name: {"max_abs": float(np.abs(g - r).max()), "rel": rel_err(g, r)} for name, r, g in zip(spec.outputs, ref, got)}


@contextlib.contextmanager
def checkpointed(unet: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing on the U-Net while the gates take its gradients: the activations a
    backward pass keeps are larger than the U-Net's weights at SDXL's sizes (about 15 GB at
    1024 px in fp32), and recomputing them block by block gives the same gradients."""
    can = getattr(unet, "_supports_gradient_checkpointing", False)
    if can:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if can:
            unet.disable_gradient_checkpointing()


@dataclass
class Probe:
    """Fixed (prompt embeddings, z_t, t, target) on which the diffusion loss is compared."""

    ids: np.ndarray  # [1, 77] token ids
    row: int  # position of the probed token
    zt: np.ndarray
    t: int
    target: np.ndarray


def make_probe(p: LoadedPipeline, latent: int, seed: int = 0, t: int = 700) -> Probe:
    rng = np.random.default_rng(seed)
    ids = p.token_ids(PROMPTS[0])
    row = int(np.argmax(ids[0] == p.tokenizer.eos_token_id)) - 1  # last word ("dog")
    z = rng.standard_normal((1, 4, latent, latent)).astype(np.float32)
    eps = rng.standard_normal(z.shape).astype(np.float32)
    zt, target = noisy_and_target(z, eps, t, alphas_cumprod(p.scheduler_config), p.scheduler_config.get("prediction_type", "epsilon"))
    return Probe(ids, row, zt, t, target)


def torch_directional_derivatives(p: LoadedPipeline, probe: Probe, dirs: np.ndarray) -> np.ndarray:
    """∇_θ L · u for each unit direction u, by autograd through the fp32 torch modules."""
    te, unet = TextEncoderFromEmbeddings(p.text_encoder).eval(), UNetWrapper(p.unet).eval()
    emb = p.text_encoder.get_input_embeddings()(torch.from_numpy(probe.ids)).detach().clone().requires_grad_(True)
    cond = te(emb)[0]
    (grad_cond,) = through_unet(p, [cond], lambda c: unet(torch.from_numpy(probe.zt), torch.tensor([float(probe.t)]), c),
                                probe.target)
    (grad,) = torch.autograd.grad(cond, emb, grad_outputs=grad_cond)
    release_weights(p.text_encoder)
    return dirs @ grad[0, probe.row].double().numpy()


def through_unet(p: LoadedPipeline, conditions: list[torch.Tensor], run: Callable[..., torch.Tensor],
                 target: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The diffusion loss's gradients at the U-Net's ``conditions`` (text encoder outputs), by
    ``run(*conditions)``: the chain rule split at the conditions, so that the text encoders' weights
    and the U-Net's are not resident together (``release_weights``; the same gradients as one
    backward pass through both)."""
    release_weights(*p.text_encoders())
    leaves = [c.detach().requires_grad_(True) for c in conditions]
    with checkpointed(p.unet):
        loss = torch.mean((run(*leaves) - torch.from_numpy(target)) ** 2)
        grads = torch.autograd.grad(loss, leaves)
    release_weights(p.unet)
    return grads


def bundle_losses(te: ort.InferenceSession, unet: ort.InferenceSession, embeds: np.ndarray, probe: Probe, chunk: int = 1) -> np.ndarray:
    """Diffusion loss of the bundle graphs for a batch of prompt embeddings [B, 77, d]."""
    out = []
    for i in range(0, len(embeds), chunk):
        e = embeds[i : i + chunk].astype(np.float32)
        b = len(e)
        cond = te.run(["last_hidden_state"], {"inputs_embeds": e})[0]
        pred = unet.run(None, {"sample": np.repeat(probe.zt, b, 0), "timestep": np.full((b,), probe.t, np.float32),
                               "encoder_hidden_states": cond})[0]
        out.append(np.mean((pred.astype(np.float64) - probe.target) ** 2, axis=(1, 2, 3)))
    return np.concatenate(out)


def unit_directions(k: int, d: int, seed: int = 0) -> np.ndarray:
    """The k random unit directions of the token that the fidelity gate probes."""
    dirs = np.random.default_rng(seed + 1).standard_normal((k, d))
    return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def training_step(mu: float, d: int) -> float:
    """Norm of the step RGE takes at ``mu``: ‖μ·e‖ ≈ μ·√d for e ~ N(0, I_d)."""
    return float(mu * np.sqrt(d))


def central_differences(te: ort.InferenceSession, unet: ort.InferenceSession, table: np.ndarray, probe: Probe,
                        dirs: np.ndarray, mu: float) -> np.ndarray:
    """(L(θ + hu) − L(θ − hu)) / 2h of the bundle graphs along each unit direction u (θ: the probed row).

    ``mu`` means what it means in training: RGE steps by μ·e with e ~ N(0, I_d), a step of norm
    ≈ μ·√d, so the probe steps by h = μ·√d (the authors' code: z ~ N(0, I_768), step 1e-3·z).
    """
    batch, h = perturbed_embeddings(table, probe, dirs, mu)
    losses = bundle_losses(te, unet, batch, probe)
    k = len(dirs)
    return (losses[:k] - losses[k:]) / (2 * h)


def perturbed_embeddings(table: np.ndarray, probe: Probe, dirs: np.ndarray, mu: float) -> tuple[np.ndarray, float]:
    """The probe's prompt embeddings [2k, 77, d] with the token row at θ + h·u then θ − h·u for each
    direction u, and h = μ·√d (training's step)."""
    k, h = len(dirs), training_step(mu, dirs.shape[1])
    batch = np.repeat(table[probe.ids[0]].astype(np.float32)[None], 2 * k, 0)
    batch[:k, probe.row] += (h * dirs).astype(np.float32)
    batch[k:, probe.row] -= (h * dirs).astype(np.float32)
    return batch, h


def fidelity_probes(p: LoadedPipeline, latent: int, t_low: int, t_high: int) -> list[Probe]:
    """One probe at each end and the middle of the PUTS range, each with its own (z, ε).

    One probe is not enough: on the toy world a w8a8-static graph read pearson 0.97 at t = 700 and
    0.20-0.96 at 20 other (t, ε) draws (benchmarks/experiments/fidelity_by_t.py), and learned a quarter of
    what int8-cpu learns at that μ.
    """
    ts = (t_low, (t_low + t_high - 1) // 2, t_high - 1)
    return [make_probe(p, latent, seed=i, t=t) for i, t in enumerate(ts)]


def true_derivatives(p: LoadedPipeline, probes: list[Probe], d: int, k: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per probe: k unit directions of the token and torch fp32 autograd's derivatives along them."""
    out = []
    for i, probe in enumerate(probes):
        dirs = unit_directions(k, d, i)
        out.append((dirs, torch_directional_derivatives(p, probe, dirs)))
    return out


def fidelity_report(te: ort.InferenceSession, unet: ort.InferenceSession, table: np.ndarray, probes: list[Probe],
                    truth: list[tuple[np.ndarray, np.ndarray]], mu: float) -> dict:
    """Central differences of the bundle's loss at the training μ vs the true derivatives, per probe.

    ``pearson`` is the worst probe's (the gate's verdict), ``rel_err`` the worst probe's too.
    """
    per = []
    for probe, (dirs, exact) in zip(probes, truth, strict=True):
        fd = central_differences(te, unet, table, probe, dirs, mu)
        per.append({"t": probe.t, "pearson": float(np.corrcoef(fd, exact)[0, 1]), "rel_err": rel_err(fd, exact)})
    pearson = min(r["pearson"] for r in per)
    return {"mu": mu, "step_norm": training_step(mu, table.shape[1]), "directions": len(truth[0][0]), "probes": per,
            "pearson": pearson, "rel_err": max(r["rel_err"] for r in per), "min_pearson": FIDELITY_MIN_PEARSON,
            "passed": bool(pearson >= FIDELITY_MIN_PEARSON)}


@dataclass
class References:
    """The torch fp32 pipeline's answers to every question the gates ask (``torch_references``)."""

    parity: dict[str, tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]]  # graph -> (inputs, outputs)
    ids: np.ndarray  # [2, 77] token ids of PROMPTS
    text: np.ndarray  # CLIPTextModel(ids).last_hidden_state
    conditioning_probe: Probe
    conditioning: np.ndarray  # the U-Net's output for the two prompts at conditioning_probe
    probes: list[Probe] = field(default_factory=list)
    truth: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per probe: directions, derivatives


def torch_references(p: LoadedPipeline, specs: list[GraphSpec], table: np.ndarray, latent: int, defaults: dict,
                     k: int = 8) -> References:
    """Everything the SD1/SD2 gates compare the bundle against, from the torch fp32 modules."""
    ids = np.concatenate([p.token_ids(s) for s in PROMPTS])
    probe = make_probe(p, latent, seed=2)
    with torch.no_grad():
        cond = p.text_encoder(torch.from_numpy(ids)).last_hidden_state
        release_weights(p.text_encoder)
        ref = UNetWrapper(p.unet)(torch.from_numpy(np.repeat(probe.zt, 2, 0)), torch.full((2,), float(probe.t)), cond).numpy()
    probes = fidelity_probes(p, latent, defaults["t_low"], defaults["t_high"])
    return References(parity={s.name: parity_reference(s, p) for s in specs}, ids=ids, text=cond.numpy(),
                      conditioning_probe=probe, conditioning=ref, probes=probes,
                      truth=true_derivatives(p, probes, table.shape[1], k))


def conditioning_figures(got: np.ndarray, ref: np.ndarray) -> dict:
    """‖ε(c1) − ε(c2)‖ of the bundle over the same for torch fp32 (does INT8 keep the text signal?)."""
    ratio = float(np.linalg.norm(got[0] - got[1]) / max(np.linalg.norm(ref[0] - ref[1]), 1e-30))
    return {"prompts": list(PROMPTS), "ratio": ratio, "torch_delta": float(np.linalg.norm(ref[0] - ref[1])),
            "min_ratio": CONDITIONING_MIN_RATIO, "passed": bool(ratio >= CONDITIONING_MIN_RATIO)}


def conditioning_sensitivity(refs: References, table: np.ndarray, te: ort.InferenceSession, unet: ort.InferenceSession) -> dict:
    probe = refs.conditioning_probe
    c = te.run(["last_hidden_state"], {"inputs_embeds": table[refs.ids].astype(np.float32)})[0]
    got = unet.run(None, {"sample": np.repeat(probe.zt, 2, 0), "timestep": np.full((2,), probe.t, np.float32), "encoder_hidden_states": c})[0]
    return conditioning_figures(got, refs.conditioning)


def text_encoder_parity(refs: References, table: np.ndarray, te: ort.InferenceSession) -> dict:
    """The graph fed with looked-up embeddings vs CLIPTextModel(input_ids).last_hidden_state."""
    got = te.run(["last_hidden_state"], {"inputs_embeds": table[refs.ids].astype(np.float32)})[0]
    return {"max_abs": float(np.abs(got - refs.text).max()), "rel": rel_err(got, refs.text), "table_dtype": str(table.dtype)}


def gates_on_sessions(parity: dict, specs: list[GraphSpec], paths: dict[str, Path], config: dict,
                      resident: tuple[str, ...], gates: Callable[..., dict]) -> dict:
    """Every graph's parity against ``parity`` (graph -> reference), then ``gates(*sessions of
    resident)``'s figures, holding as few ORT sessions at once as it can: the VAE graphs one at a
    time, then the ``resident`` graphs together, for the gates that chain them."""
    by_name = {s.name: s for s in specs}
    got = {}
    for name in ("vae_encoder", "vae_decoder"):
        sess = session(paths[name], config)
        got[name] = graph_parity(by_name[name], parity[name], sess)
        del sess
        gc.collect()
    sessions = [session(paths[n], config) for n in resident]
    for name, sess in zip(resident, sessions):
        got[name] = graph_parity(by_name[name], parity[name], sess)
    return {"parity": {s.name: got[s.name] for s in specs}, **gates(*sessions)}  # parity in manifest order


def run_gates(refs: References, specs: list[GraphSpec], paths: dict[str, Path], config: dict,
              table: np.ndarray, defaults: dict) -> dict:
    """All gates against ``refs``."""
    def gates(te: ort.InferenceSession, unet: ort.InferenceSession) -> dict:
        return {"text_encoder_parity": text_encoder_parity(refs, table, te),
                "conditioning_sensitivity": conditioning_sensitivity(refs, table, te, unet),
                "zo_fidelity": fidelity_report(te, unet, table, refs.probes, refs.truth, defaults["mu"])}

    return gates_on_sessions(refs.parity, specs, paths, config, ("text_encoder", "unet"), gates)


def check_gates(v: dict, recipe: str, allow_unfaithful: bool) -> None:
    """Raise UserError naming the first failed gate."""
    for name, res in v["parity"].items():
        for out, r in res.items():
            if r["rel"] > v["parity_tolerance"]:
                raise UserError(f"parity gate failed: {name}.{out} relative error {r['rel']:.3g} > {v['parity_tolerance']:.3g} for recipe {recipe}")
    for key, name in (("text_encoder_parity", "text-encoder"), ("text_encoder_2_parity", "second text-encoder")):
        if recipe == "fp32" and key in v and v[key]["max_abs"] > 1e-4:  # text_encoder_2: SDXL's
            raise UserError(f"{name} parity gate failed: max abs error {v[key]['max_abs']:.3g} > 1e-4")
    c = v["conditioning_sensitivity"]
    if not c["passed"]:
        raise UserError(f"conditioning gate failed: the {recipe} U-Net keeps {c['ratio']:.2f} of the torch fp32 text-conditioning "
                        f"signal (need >= {c['min_ratio']}); quantization erased the text conditioning, personalization would learn nothing")
    f = v["zo_fidelity"]
    if not f["passed"] and not allow_unfaithful:
        raise UserError(f"ZO fidelity gate failed: finite differences of the {recipe} bundle at mu={f['mu']:g} (a step of norm {f['step_norm']:.2g}) correlate with the "
                        f"true derivatives at pearson {f['pearson']:.3f} at worst over t = {', '.join(str(r['t']) for r in f['probes'])} (< {f['min_pearson']}); zeroth-order training would "
                        "follow noise. Use a weight-only recipe, or --allow-unfaithful to export anyway")
