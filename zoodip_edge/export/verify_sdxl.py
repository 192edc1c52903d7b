"""Export gates for SDXL bundles: the SD1/SD2 gates (verify.py) with two text encoders.

SDXL conditions its U-Net on both encoders' penultimate hidden states, concatenated per token
(``encoder_hidden_states``), and on the second encoder's pooled, projected output at the EOS
token (``text_embeds``) with six size/crop ids (``time_ids``). A learned token has one row in each
encoder's table; ZO perturbs the two rows as one vector of both widths together (2048 in SDXL),
so the fidelity gate probes directions in that space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..errors import UserError
from .graphs import GraphSpec, TextEncoderFromEmbeddings, TextEncoderWithProjectionFromEmbeddings, UNetXLWrapper
from .load import LoadedPipeline, release_weights
from .verify import (
    FIDELITY_MIN_PEARSON,
    PROMPTS,
    Probe,
    conditioning_figures,
    fidelity_probes,
    gates_on_sessions,
    make_probe,
    parity_reference,
    rel_err,
    through_unet,
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


def text_encoder_parity(refs: "References", tables: tuple[np.ndarray, np.ndarray], te: ort.InferenceSession,
                        te2: ort.InferenceSession) -> tuple[dict, dict]:
    """Each graph fed with looked-up embeddings (and the EOS position) vs transformers fed with
    input ids: CLIPTextModel's last and penultimate hidden states, CLIPTextModelWithProjection's
    and its ``text_embeds``. ``max_abs``/``rel``: the worst output's."""
    pr = refs.prompts
    names = ("last_hidden_state", "penultimate_hidden_state")
    got1 = te.run(list(names), {"inputs_embeds": tables[0][pr.ids].astype(np.float32)})
    got2 = te2.run([*names, "text_embeds"], {"inputs_embeds": tables[1][pr.ids_2].astype(np.float32), "eos_index": pr.eos})
    first = _errors(got1, list(refs.text), names)
    second = _errors(got2, list(refs.text_2), (*names, "text_embeds"))
    return ({**first, "table_dtype": str(tables[0].dtype)},
            {**second, "table_dtype": str(tables[1].dtype), "pooled_at": refs.pooled_at})


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
    cond = torch.cat([te(e1)[1], c2], dim=-1)
    grads = through_unet(p, [cond, pooled], lambda c, pl: ref.unet(probe.zt, probe.t, c, pl), probe.target)
    g1, g2 = torch.autograd.grad((cond, pooled), (e1, e2), grad_outputs=grads)
    release_weights(p.text_encoder, p.text_encoder_2)
    return dirs @ torch.cat([g1[0, probe.row], g2[0, probe.row]]).double().numpy()


def central_differences(pr: Prompts, tables: tuple[np.ndarray, np.ndarray], got: Bundle, probe: Probe,
                        dirs: np.ndarray, mu: float) -> np.ndarray:
    """(L(θ + hu) − L(θ − hu)) / 2h of the bundle graphs, h = μ·√(d1 + d2): training's step on the
    concatenated token, split between the two tables' rows. One condition per run, as in verify.py.
    ``pr``: the probe's prompt in both tokenizers (``_probe_prompts``)."""
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


def zo_fidelity(refs: "References", tables: tuple[np.ndarray, np.ndarray], got: Bundle, mu: float) -> dict:
    """Central differences at the training μ vs torch autograd along k directions of the
    concatenated token, per probe; ``pearson``/``rel_err`` the worst probe's (as verify.py)."""
    d = tables[0].shape[1] + tables[1].shape[1]
    per = []
    for probe, (dirs, exact) in zip(refs.probes, refs.truth, strict=True):
        fd = central_differences(refs.probe_prompts, tables, got, probe, dirs, mu)
        per.append({"t": probe.t, "pearson": float(np.corrcoef(fd, exact)[0, 1]), "rel_err": rel_err(fd, exact)})
    pearson = min(r["pearson"] for r in per)
    return {"mu": mu, "step_norm": training_step(mu, d), "width": d, "widths": [int(t.shape[1]) for t in tables],
            "directions": len(refs.truth[0][0]), "probes": per, "pearson": pearson, "rel_err": max(r["rel_err"] for r in per),
            "min_pearson": FIDELITY_MIN_PEARSON, "passed": bool(pearson >= FIDELITY_MIN_PEARSON)}


@dataclass
class References:
    """The torch fp32 SDXL pipeline's answers to every question the gates ask (``torch_references``)."""

    parity: dict[str, tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]]
    prompts: Prompts  # PROMPTS in both tokenizers
    text: tuple[np.ndarray, ...]  # CLIPTextModel: last, penultimate hidden state
    text_2: tuple[np.ndarray, ...]  # CLIPTextModelWithProjection: last, penultimate, text_embeds
    pooled_at: str
    time_ids: np.ndarray
    conditioning_probe: Probe
    conditioning: np.ndarray
    probe_prompts: Prompts
    probes: list[Probe] = field(default_factory=list)
    truth: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def torch_references(p: LoadedPipeline, specs: list[GraphSpec], tables: tuple[np.ndarray, np.ndarray], latent: int,
                     resolution: int, defaults: dict, k: int = 8) -> References:
    """Everything the SDXL gates compare the bundle against, from the torch fp32 modules."""
    from .graphs import time_ids_count

    time_ids = default_time_ids(resolution, time_ids_count(p))
    ref = Torch(p, time_ids)
    pr = Prompts.of(p, PROMPTS)
    cprobe = make_probe(p, latent, seed=2)
    with torch.no_grad():
        o1 = p.text_encoder(torch.from_numpy(pr.ids), output_hidden_states=True)
        o2 = p.text_encoder_2(torch.from_numpy(pr.ids_2), output_hidden_states=True)
        encoded = ref.encode(pr)
        release_weights(p.text_encoder, p.text_encoder_2)
        cond = ref.unet(cprobe.zt, cprobe.t, *encoded).numpy()
        release_weights(p.unet)
    probes = fidelity_probes(p, latent, defaults["t_low"], defaults["t_high"])
    d = tables[0].shape[1] + tables[1].shape[1]
    truth = []
    for i, probe in enumerate(probes):
        dirs = unit_directions(k, d, i)
        truth.append((dirs, torch_directional_derivatives(p, ref, probe, dirs)))
    return References(parity={s.name: parity_reference(s, p) for s in specs}, prompts=pr,
                      text=(o1.last_hidden_state.numpy(), o1.hidden_states[-2].numpy()),
                      text_2=(o2.last_hidden_state.numpy(), o2.hidden_states[-2].numpy(), o2.text_embeds.numpy()),
                      pooled_at=pooled_rule(p), time_ids=time_ids, conditioning_probe=cprobe, conditioning=cond,
                      probe_prompts=_probe_prompts(p, probes[0]), probes=probes, truth=truth)


def run_gates(refs: References, specs: list[GraphSpec], paths: dict[str, Path], config: dict,
              tables: tuple[np.ndarray, np.ndarray], defaults: dict) -> dict:
    """The SDXL gates against ``refs``; the figures have verify.run_gates' keys, and ``text_encoder_2_parity``."""
    def gates(te: ort.InferenceSession, te2: ort.InferenceSession, unet: ort.InferenceSession) -> dict:
        got = Bundle(te, te2, unet, refs.time_ids)
        first, second = text_encoder_parity(refs, tables, te, te2)
        pr, probe = refs.prompts, refs.conditioning_probe
        g = got.unet(probe.zt, probe.t, *got.encode(tables[0][pr.ids], tables[1][pr.ids_2], pr.eos))
        return {"text_encoder_parity": first, "text_encoder_2_parity": second,
                "conditioning_sensitivity": conditioning_figures(g, refs.conditioning),
                "zo_fidelity": zo_fidelity(refs, tables, got, defaults["mu"])}

    return gates_on_sessions(refs.parity, specs, paths, config, ("text_encoder", "text_encoder_2", "unet"), gates)
