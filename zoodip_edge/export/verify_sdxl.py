"""Export gates for SDXL bundles: the SD1/SD2 gates (verify.py) with two text encoders.

SDXL conditions its U-Net on both encoders' penultimate hidden states, concatenated per token
(``encoder_hidden_states``), and on the second encoder's pooled, projected output at the EOS
token (``text_embeds``) with six size/crop ids (``time_ids``). A learned token has one row in each
encoder's table; ZO perturbs the two rows as one vector of both widths together (2048 in SDXL),
so the fidelity gate probes directions in that space.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..errors import UserError
from .graphs import GraphSpec, TextEncoderFromEmbeddings, TextEncoderWithProjectionFromEmbeddings, UNetXLWrapper
from .load import LoadedPipeline
from .verify import (
    CONDITIONING_MIN_RATIO,
    FIDELITY_MIN_PEARSON,
    PROMPTS,
    Probe,
    fidelity_probes,
    graph_parity,
    make_probe,
    rel_err,
    session,
    training_step,
    unit_directions,
)


def pooled_rule(p: LoadedPipeline) -> str:
    """Where CLIPTextModelWithProjection takes its pooled output: ``max_id`` (configs with
    ``eos_token_id`` 2, the published SDXL one: the position of the highest token id) or
    ``first_eos`` (the first position of the EOS id)."""
    return "max_id" if p.text_encoder_2.config.eos_token_id == 2 else "first_eos"


def eos_index(ids: np.ndarray, rule: str, eos_token_id: int) -> np.ndarray:
    """``[B]`` int64: the position transformers' CLIPTextModel pools at for each row of ``ids``."""
    if rule == "max_id":
        return ids.argmax(axis=1).astype(np.int64)
    return (ids == eos_token_id).argmax(axis=1).astype(np.int64)


def default_time_ids(resolution: int, count: int, batch: int = 1) -> np.ndarray:
    """SDXL pipeline's ``add_time_ids`` for an uncropped square image: (H, W, 0, 0, H, W)."""
    if count != 6:
        raise UserError(f"the SDXL U-Net embeds {count} time ids; only the base model's 6 (sizes and crop) are supported")
    return np.tile(np.array([[resolution, resolution, 0, 0, resolution, resolution]], np.float32), (batch, 1))


@dataclass
class Prompts:
    """Token ids of prompts in both tokenizers and the positions the second encoder pools at."""

    ids: np.ndarray  # [B, 77] text_encoder's
    ids_2: np.ndarray  # [B, 77] text_encoder_2's
    eos: np.ndarray  # [B] int64

    @classmethod
    def of(cls, p: LoadedPipeline, prompts: tuple[str, ...] | list[str]) -> "Prompts":
        ids = np.concatenate([p.token_ids(s) for s in prompts])
        ids_2 = np.concatenate([p.token_ids_2(s) for s in prompts])
        return cls(ids, ids_2, eos_index(ids_2, pooled_rule(p), p.text_encoder_2.config.eos_token_id))


class Torch:
    """SDXL's fp32 conditioning as diffusers computes it (StableDiffusionXLPipeline.encode_prompt)."""

    def __init__(self, p: LoadedPipeline, time_ids: np.ndarray):
        self.p, self.time_ids = p, torch.from_numpy(time_ids)

    def encode(self, pr: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(``encoder_hidden_states``, ``text_embeds``) from input ids."""
        o1 = self.p.text_encoder(torch.from_numpy(pr.ids), output_hidden_states=True)
        o2 = self.p.text_encoder_2(torch.from_numpy(pr.ids_2), output_hidden_states=True)
        return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2.text_embeds

    def unet(self, zt: np.ndarray, t: int, cond: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        b = len(cond)
        return UNetXLWrapper(self.p.unet)(torch.from_numpy(np.repeat(zt, b, 0)), torch.full((b,), float(t)), cond, pooled,
                                          self.time_ids.repeat(b, 1))


class Bundle:
    """The same conditioning and U-Net through the bundle's three graphs."""

    def __init__(self, te: ort.InferenceSession, te2: ort.InferenceSession, unet: ort.InferenceSession, time_ids: np.ndarray):
        self.te, self.te2, self.unet_sess, self.time_ids = te, te2, unet, time_ids

    def encode(self, embeds: np.ndarray, embeds_2: np.ndarray, eos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c1 = self.te.run(["penultimate_hidden_state"], {"inputs_embeds": embeds.astype(np.float32)})[0]
        c2, pooled = self.te2.run(["penultimate_hidden_state", "text_embeds"],
                                  {"inputs_embeds": embeds_2.astype(np.float32), "eos_index": eos})
        return np.concatenate([c1, c2], axis=-1), pooled

    def unet(self, zt: np.ndarray, t: int, cond: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        b = len(cond)
        return self.unet_sess.run(None, {"sample": np.repeat(zt, b, 0), "timestep": np.full((b,), t, np.float32),
                                         "encoder_hidden_states": cond, "text_embeds": pooled,
                                         "time_ids": np.repeat(self.time_ids, b, 0)})[0]


def _errors(got: list[np.ndarray], ref: list[np.ndarray], names: tuple[str, ...]) -> dict:
    outs = {n: {"max_abs": float(np.abs(g - r).max()), "rel": rel_err(g, r)} for n, g, r in zip(names, got, ref)}
    return {"max_abs": max(o["max_abs"] for o in outs.values()), "rel": max(o["rel"] for o in outs.values()), "outputs": outs}


def text_encoder_parity(p: LoadedPipeline, tables: tuple[np.ndarray, np.ndarray], te: ort.InferenceSession,
                        te2: ort.InferenceSession) -> tuple[dict, dict]:
    """Each graph fed with looked-up embeddings (and the EOS position) vs transformers fed with
    input ids: CLIPTextModel's last and penultimate hidden states, CLIPTextModelWithProjection's
    and its ``text_embeds``. ``max_abs``/``rel``: the worst output's."""
    pr = Prompts.of(p, PROMPTS)
    names = ("last_hidden_state", "penultimate_hidden_state")
    with torch.no_grad():
        o1 = p.text_encoder(torch.from_numpy(pr.ids), output_hidden_states=True)
        o2 = p.text_encoder_2(torch.from_numpy(pr.ids_2), output_hidden_states=True)
    got1 = te.run(list(names), {"inputs_embeds": tables[0][pr.ids].astype(np.float32)})
    got2 = te2.run([*names, "text_embeds"], {"inputs_embeds": tables[1][pr.ids_2].astype(np.float32), "eos_index": pr.eos})
    first = _errors(got1, [o1.last_hidden_state.numpy(), o1.hidden_states[-2].numpy()], names)
    second = _errors(got2, [o2.last_hidden_state.numpy(), o2.hidden_states[-2].numpy(), o2.text_embeds.numpy()],
                     (*names, "text_embeds"))
    return ({**first, "table_dtype": str(tables[0].dtype)},
            {**second, "table_dtype": str(tables[1].dtype), "pooled_at": pooled_rule(p)})


def conditioning_sensitivity(p: LoadedPipeline, tables: tuple[np.ndarray, np.ndarray], ref: Torch, got: Bundle,
                             latent: int) -> dict:
    """‖ε(c1) − ε(c2)‖ of the bundle over the same for torch fp32, both encoders and the pooled
    embedding carrying the prompt."""
    probe = make_probe(p, latent, seed=2)
    pr = Prompts.of(p, PROMPTS)
    with torch.no_grad():
        r = ref.unet(probe.zt, probe.t, *ref.encode(pr)).numpy()
    g = got.unet(probe.zt, probe.t, *got.encode(tables[0][pr.ids], tables[1][pr.ids_2], pr.eos))
    ratio = float(np.linalg.norm(g[0] - g[1]) / max(np.linalg.norm(r[0] - r[1]), 1e-30))
    return {"prompts": list(PROMPTS), "ratio": ratio, "torch_delta": float(np.linalg.norm(r[0] - r[1])),
            "min_ratio": CONDITIONING_MIN_RATIO, "passed": bool(ratio >= CONDITIONING_MIN_RATIO)}


def _probe_prompts(p: LoadedPipeline, probe: Probe) -> Prompts:
    pr = Prompts.of(p, PROMPTS[:1])
    if not np.array_equal(pr.ids, probe.ids) or pr.ids_2[0, probe.row] != pr.ids[0, probe.row]:
        raise UserError("the two SDXL tokenizers split the probe prompt differently; cannot place one token in both")
    return pr


def torch_directional_derivatives(p: LoadedPipeline, ref: Torch, probe: Probe, dirs: np.ndarray) -> np.ndarray:
    """∇_θ L · u for each unit direction u of the concatenated token θ = (row in table 1, row in table 2)."""
    pr = _probe_prompts(p, probe)
    te, te2 = TextEncoderFromEmbeddings(p.text_encoder).eval(), TextEncoderWithProjectionFromEmbeddings(p.text_encoder_2).eval()
    e1 = p.text_encoder.get_input_embeddings()(torch.from_numpy(pr.ids)).detach().clone().requires_grad_(True)
    e2 = p.text_encoder_2.get_input_embeddings()(torch.from_numpy(pr.ids_2)).detach().clone().requires_grad_(True)
    _, c2, pooled = te2(e2, torch.from_numpy(pr.eos))
    pred = ref.unet(probe.zt, probe.t, torch.cat([te(e1)[1], c2], dim=-1), pooled)
    loss = torch.mean((pred - torch.from_numpy(probe.target)) ** 2)
    g1, g2 = torch.autograd.grad(loss, (e1, e2))
    return dirs @ torch.cat([g1[0, probe.row], g2[0, probe.row]]).double().numpy()


def central_differences(p: LoadedPipeline, tables: tuple[np.ndarray, np.ndarray], got: Bundle, probe: Probe,
                        dirs: np.ndarray, mu: float) -> np.ndarray:
    """(L(θ + hu) − L(θ − hu)) / 2h of the bundle graphs, h = μ·√(d1 + d2): training's step on the
    concatenated token, split between the two tables' rows. One condition per run, as in verify.py."""
    pr = _probe_prompts(p, probe)
    k, d1, h = len(dirs), tables[0].shape[1], training_step(mu, dirs.shape[1])
    losses = []
    for sign in (1.0, -1.0):
        for u in dirs:
            e1, e2 = tables[0][pr.ids].astype(np.float32), tables[1][pr.ids_2].astype(np.float32)
            e1[0, probe.row] += (sign * h * u[:d1]).astype(np.float32)
            e2[0, probe.row] += (sign * h * u[d1:]).astype(np.float32)
            pred = got.unet(probe.zt, probe.t, *got.encode(e1, e2, pr.eos))
            losses.append(np.mean((pred.astype(np.float64) - probe.target) ** 2))
    losses = np.asarray(losses)
    return (losses[:k] - losses[k:]) / (2 * h)


def zo_fidelity(p: LoadedPipeline, tables: tuple[np.ndarray, np.ndarray], ref: Torch, got: Bundle, mu: float,
                probes: list[Probe], k: int = 8) -> dict:
    """Central differences at the training μ vs torch autograd along k directions of the
    concatenated token, per probe; ``pearson``/``rel_err`` the worst probe's (as verify.py)."""
    d = tables[0].shape[1] + tables[1].shape[1]
    per = []
    for i, probe in enumerate(probes):
        dirs = unit_directions(k, d, i)
        exact = torch_directional_derivatives(p, ref, probe, dirs)
        fd = central_differences(p, tables, got, probe, dirs, mu)
        per.append({"t": probe.t, "pearson": float(np.corrcoef(fd, exact)[0, 1]), "rel_err": rel_err(fd, exact)})
    pearson = min(r["pearson"] for r in per)
    return {"mu": mu, "step_norm": training_step(mu, d), "width": d, "widths": [int(t.shape[1]) for t in tables],
            "directions": k, "probes": per, "pearson": pearson, "rel_err": max(r["rel_err"] for r in per),
            "min_pearson": FIDELITY_MIN_PEARSON, "passed": bool(pearson >= FIDELITY_MIN_PEARSON)}


def run_gates(p: LoadedPipeline, specs: list[GraphSpec], paths: dict[str, Path], config: dict,
              tables: tuple[np.ndarray, np.ndarray], latent: int, resolution: int, defaults: dict) -> dict:
    """The SDXL gates; the figures have verify.run_gates' keys, and ``text_encoder_2_parity``."""
    from .graphs import time_ids_count

    v: dict = {"parity": {}}
    by_name = {s.name: s for s in specs}
    for name in ("vae_encoder", "vae_decoder"):
        sess = session(paths[name], config)
        v["parity"][name] = graph_parity(by_name[name], p, sess)
        del sess
        gc.collect()
    te, te2, unet = (session(paths[n], config) for n in ("text_encoder", "text_encoder_2", "unet"))
    for name, sess in (("text_encoder", te), ("text_encoder_2", te2), ("unet", unet)):
        v["parity"][name] = graph_parity(by_name[name], p, sess)
    time_ids = default_time_ids(resolution, time_ids_count(p))
    ref, got = Torch(p, time_ids), Bundle(te, te2, unet, time_ids)
    v["text_encoder_parity"], v["text_encoder_2_parity"] = text_encoder_parity(p, tables, te, te2)
    v["conditioning_sensitivity"] = conditioning_sensitivity(p, tables, ref, got, latent)
    probes = fidelity_probes(p, latent, defaults["t_low"], defaults["t_high"])
    v["zo_fidelity"] = zo_fidelity(p, tables, ref, got, defaults["mu"], probes)
    v["parity"] = {s.name: v["parity"][s.name] for s in specs}  # manifest order
    return v
