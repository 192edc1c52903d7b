"""Inference samplers for text-to-image generation: DDIM, DPM-Solver++ and Euler (NumPy only).

A sampler is built from the diffusers scheduler config dict stored in a bundle's manifest and
reproduces the matching diffusers scheduler (checked against diffusers 0.42 by
tests/test_schedulers.py) for the options below. Missing keys take the default of that diffusers
class, as ``<Scheduler>.from_config(config)`` does (so ``timestep_spacing`` defaults to "leading"
for DDIM but "linspace" for DPM++ and Euler), and keys the class does not read (PNDM's
``skip_prk_steps``, ``_class_name``...) are ignored. An option the class reads but this module
does not implement raises UserError instead of sampling differently.

Supported options
  all    num_train_timesteps, beta_start, beta_end, beta_schedule (linear, scaled_linear,
         squaredcos_cap_v2), trained_betas, prediction_type (epsilon, v_prediction),
         timestep_spacing (leading, trailing, linspace), steps_offset
  ddim   clip_sample, clip_sample_range, set_alpha_to_one; eta is 0 (deterministic DDIM)
  dpm++  algorithm_type dpmsolver++, solver_order 1|2,
         solver_type midpoint|heun (logrho/bh1/bh2 mapped to midpoint, as diffusers does),
         lower_order_final, euler_at_final, final_sigmas_type zero|sigma_min, lambda_min_clipped
  euler  interpolation_type linear, final_sigmas_type zero|sigma_min, timestep_type discrete
         (continuous only with epsilon, where diffusers ignores it); s_churn = 0 (deterministic)
Unsupported (UserError unless left at the default): thresholding, rescale_betas_zero_snr,
prediction_type sample/flow_prediction, karras/exponential/beta/lu/flow sigmas, DPM++ solver_order 3,
SDE and non-"++" DPM algorithms, variance_type learned, Euler log_linear interpolation and
continuous v-prediction timesteps.

Deviations from diffusers, on purpose
- ``num_inference_steps`` must be 1..num_train_timesteps (diffusers' DPM++/Euler accept more and
  repeat timesteps).
- "trailing" spacing: diffusers' float ``np.arange`` yields a spurious (n+1)-th timestep -1 for some
  step counts (61, 103, 121, ... of 1000); it is dropped here, the first n timesteps are identical.
- Arithmetic is NumPy: schedule coefficients in float64 (from the same float32 ᾱ/σ tables), arrays
  in the dtype of the inputs, so results agree with diffusers' float32 torch to ~1e-6 relative.

The loop (classifier-free guidance goes where the UNet is called)::

    s = make_sampler("dpm++", manifest_scheduler_config, 25)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        out = unet(s.scale_model_input(x, i), t, text)
        x = s.step(out, i, x)

``len(timesteps)`` is the number of UNet calls; like diffusers, DPM++ with lambda_min_clipped and
"trailing" spacing can give fewer than ``num_inference_steps``. ``step`` must be called for i = 0, 1, 2, ... in order (DPM++ keeps its multistep history in the
sampler; i = 0 starts a new image, so one sampler can be reused).
"""

from __future__ import annotations

import math

import numpy as np

from zoodip_edge.errors import UserError

from ..schedule import alphas_cumprod

SAMPLERS = ("ddim", "dpm++", "euler")
_OFF = (False, None)  # values of an unsupported on/off option that leave it off


class Sampler:
    """The interface the generation loop drives.

    timesteps: the UNet's timestep input for step i, descending. int64 for DDIM and DPM++;
        float32 for Euler, whose "linspace" spacing gives fractional timesteps (the bundle's
        UNet takes a float32 timestep, so feed these values as they are).
    init_noise_sigma: scale of the initial Gaussian noise.
    """

    name: str
    timesteps: np.ndarray
    init_noise_sigma: float = 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """What the UNet receives at step i (identity except for Euler)."""
        return sample

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The sample after step i, from the (guided) UNet output at step i."""
        raise NotImplementedError


def make_sampler(name: str, config: dict, num_inference_steps: int) -> Sampler:
    """A sampler `name` (ddim, dpm++, euler) for a diffusers scheduler config dict."""
    classes = {"ddim": DDIMSampler, "dpm++": DPMSolverPPSampler, "euler": EulerSampler}
    if name not in classes:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    n, total = num_inference_steps, int(config.get("num_train_timesteps", 1000))
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
        raise UserError(f"the number of sampling steps must be an integer from 1 to {total}, not {n!r}")
    return classes[name](config, int(n))


# ------------------------------------------------------------------------------ helpers ----

def _options(name: str, config: dict, defaults: dict, choices: dict) -> dict:
    """The options `name` reads, with diffusers' defaults, after checking they are supported."""
    opts = {key: config.get(key, default) for key, default in defaults.items()}
    for key, allowed in choices.items():
        if opts[key] not in allowed:
            ok = ", ".join(repr(a) for a in allowed if a is not None)
            raise UserError(f"sampler {name}: scheduler option {key}={opts[key]!r} is not supported "
                            f"(supported: {ok})")
    return opts


_COMMON_DEFAULTS = {"prediction_type": "epsilon", "steps_offset": 0, "rescale_betas_zero_snr": False}
_COMMON_CHOICES = {"prediction_type": ("epsilon", "v_prediction"),
                   "timestep_spacing": ("leading", "trailing", "linspace"),
                   "rescale_betas_zero_snr": _OFF}


def _abar(config: dict) -> np.ndarray:
    try:
        return alphas_cumprod(config)
    except ValueError as e:
        raise UserError(f"scheduler config: {e}") from None


def _sigma_table(abar: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1-ᾱ)/ᾱ) for every training timestep, in float32 like diffusers."""
    a = abar.astype(np.float32)
    return np.sqrt((1 - a) / a)


def _trailing(start: int, total: int, n: int) -> np.ndarray:
    """diffusers' round(arange(start, 0, -T/n)) - 1, less the spurious -1 its float error can add."""
    ts = np.round(np.arange(start, 0, -total / n)) - 1
    return ts[ts >= 0]


def _to_x0_eps(out: np.ndarray, x: np.ndarray, alpha: float, sigma: float, prediction: str):
    """(x0, ε) from a model output at x = alpha·x0 + sigma·ε (ε- or v-prediction)."""
    if prediction == "epsilon":
        return (x - sigma * out) / alpha, out
    return alpha * x - sigma * out, alpha * out + sigma * x


# --------------------------------------------------------------------------------- DDIM ----

class DDIMSampler(Sampler):
    """diffusers DDIMScheduler with eta = 0."""

    name = "ddim"

    def __init__(self, config: dict, n: int):
        o = _options(self.name, config,
                     {**_COMMON_DEFAULTS, "timestep_spacing": "leading", "clip_sample": True,
                      "clip_sample_range": 1.0, "set_alpha_to_one": True, "thresholding": False},
                     {**_COMMON_CHOICES, "thresholding": _OFF})
        total = int(config.get("num_train_timesteps", 1000))
        spacing = o["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, total - 1, n).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(n) * (total // n)).round()[::-1] + o["steps_offset"]
        else:
            ts = _trailing(total, total, n)
        self.timesteps = ts.astype(np.int64)
        self._abar = _abar(config)
        self._final = 1.0 if o["set_alpha_to_one"] else float(self._abar[0])
        self._stride = total // n  # diffusers' previous timestep is t - T//n whatever the spacing
        self._clip = float(o["clip_sample_range"]) if o["clip_sample"] else None
        self._prediction = o["prediction_type"]

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        t = int(self.timesteps[i])
        prev = t - self._stride
        a_t = float(self._abar[t])
        a_prev = float(self._abar[prev]) if prev >= 0 else self._final
        x0, eps = _to_x0_eps(model_output, sample, math.sqrt(a_t), math.sqrt(1 - a_t), self._prediction)
        if self._clip is not None:
            x0 = np.clip(x0, -self._clip, self._clip)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


# ------------------------------------------------------------------------------- DPM++ ----

class DPMSolverPPSampler(Sampler):
    """diffusers DPMSolverMultistepScheduler, algorithm dpmsolver++ (multistep, data prediction)."""

    name = "dpm++"

    def __init__(self, config: dict, n: int):
        unsupported = ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                       "use_lu_lambdas", "use_flow_sigmas")
        # variance_type only matters when the model predicts its variance ("learned", "learned_range");
        # DDPM configs carry "fixed_small"/"fixed_large", which diffusers' DPM solver ignores too.
        if config.get("variance_type") in ("learned", "learned_range"):
            raise UserError(f"sampler {self.name}: scheduler option variance_type={config['variance_type']!r} is not supported")
        o = _options(self.name, config,
                     {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "algorithm_type": "dpmsolver++",
                      "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
                      "euler_at_final": False, "final_sigmas_type": "zero",
                      "lambda_min_clipped": -math.inf, **{k: None for k in unsupported}},
                     {**_COMMON_CHOICES, "algorithm_type": ("dpmsolver++",), "solver_order": (1, 2),
                      "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
                      "final_sigmas_type": ("zero", "sigma_min"), **{k: _OFF for k in unsupported}})
        total = int(config.get("num_train_timesteps", 1000))
        abar = _abar(config)
        last = total
        if o["lambda_min_clipped"] > -math.inf:  # drop the noisiest timesteps, below a log-SNR floor
            a = abar.astype(np.float32)
            lam = np.log(np.sqrt(a)) - np.log(np.sqrt(1 - a))
            last = total - int(np.searchsorted(lam[::-1], o["lambda_min_clipped"]))
        spacing = o["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + o["steps_offset"]
        else:
            ts = _trailing(last, total, n)
        self.timesteps = ts.astype(np.int64)

        table = _sigma_table(abar)
        final = table[0] if o["final_sigmas_type"] == "sigma_min" else 0.0
        sig = np.append(np.interp(self.timesteps, np.arange(len(table)), table), final)
        sig = sig.astype(np.float32).astype(np.float64)
        self._alpha = 1 / np.sqrt(sig**2 + 1)  # VP coefficients: x = alpha·x0 + sigma·ε
        self._sigma = sig * self._alpha
        with np.errstate(divide="ignore"):  # sigma 0 at the end: log-SNR +inf, exp(-h) = 0
            self._lambda = np.log(self._alpha) - np.log(self._sigma)
        self._o = o
        self._x0s: list[np.ndarray] = []
        self._next = 0

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        if i == 0:
            self._x0s, self._next = [], 0
        if i != self._next:
            raise ValueError(f"DPM++ steps must run in order: expected step {self._next}, got {i}")
        o, n = self._o, len(self.timesteps)
        alpha, sigma = float(self._alpha[i]), float(self._sigma[i])
        x0, _ = _to_x0_eps(model_output, sample, alpha, sigma, o["prediction_type"])
        self._x0s = (self._x0s + [x0])[-2:]
        final_first_order = i == n - 1 and (
            o["euler_at_final"] or (o["lower_order_final"] and n < 15) or o["final_sigmas_type"] == "zero")
        h = float(self._lambda[i + 1] - self._lambda[i])
        a_t, phi = float(self._alpha[i + 1]), float(np.expm1(-h))  # exp(-h) - 1
        prev = (float(self._sigma[i + 1]) / sigma) * sample - (a_t * phi) * x0
        if o["solver_order"] == 2 and i > 0 and not final_first_order:
            r0 = float(self._lambda[i] - self._lambda[i - 1]) / h
            d1 = (1.0 / r0) * (x0 - self._x0s[0])
            if o["solver_type"] == "heun":
                prev = prev + (a_t * (phi / h + 1.0)) * d1
            else:  # midpoint
                prev = prev - (0.5 * a_t * phi) * d1
        self._next = i + 1
        return prev


# ------------------------------------------------------------------------------- Euler ----

class EulerSampler(Sampler):
    """diffusers EulerDiscreteScheduler (deterministic: s_churn = 0).

    Its timesteps are float32 and may be fractional ("linspace" spacing): that is what diffusers
    passes to the UNet, and the bundle's UNet takes a float32 timestep.
    """

    name = "euler"

    def __init__(self, config: dict, n: int):
        unsupported = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        o = _options(self.name, config,
                     {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "interpolation_type": "linear",
                      "final_sigmas_type": "zero", "timestep_type": "discrete",
                      **{k: False for k in unsupported}},
                     {**_COMMON_CHOICES, "interpolation_type": ("linear",),
                      "final_sigmas_type": ("zero", "sigma_min"), **{k: _OFF for k in unsupported}})
        if o["timestep_type"] == "continuous" and o["prediction_type"] == "v_prediction":
            raise UserError("sampler euler: scheduler option timestep_type='continuous' with v_prediction "
                            "is not supported (supported: 'discrete')")
        total = int(config.get("num_train_timesteps", 1000))
        spacing = o["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, total - 1, n, dtype=np.float32)[::-1]
        elif spacing == "leading":
            ts = (np.arange(n) * (total // n)).round()[::-1].astype(np.float32) + o["steps_offset"]
        else:
            ts = _trailing(total, total, n)
        self.timesteps = ts.astype(np.float32)

        table = _sigma_table(_abar(config))
        final = table[0] if o["final_sigmas_type"] == "sigma_min" else 0.0
        sig = np.append(np.interp(self.timesteps, np.arange(len(table)), table), final)
        self._sigmas = sig.astype(np.float32).astype(np.float64)
        top = float(self._sigmas.max())
        self.init_noise_sigma = top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
        self._prediction = o["prediction_type"]

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample / math.sqrt(self._sigmas[i] ** 2 + 1)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        s, s_next = float(self._sigmas[i]), float(self._sigmas[i + 1])
        c = math.sqrt(s**2 + 1)  # the sample is x0 + s·ε; the UNet saw it divided by c
        x0, _ = _to_x0_eps(model_output, sample / c, 1 / c, s / c, self._prediction)
        return sample + (sample - x0) / s * (s_next - s)
