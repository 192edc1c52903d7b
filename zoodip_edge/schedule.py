"""Noise-schedule arithmetic shared by the export's checks and the device loop (NumPy only): it
lives outside runtime/ so that the workstation stage does not import the device package."""

from __future__ import annotations

import numpy as np


def alphas_cumprod(scheduler: dict) -> np.ndarray:
    """ᾱ_t for t = 0..T-1 from a diffusers scheduler config (float64)."""
    n = int(scheduler.get("num_train_timesteps", 1000))
    kind = scheduler.get("beta_schedule", "linear")
    b0, b1 = float(scheduler.get("beta_start", 1e-4)), float(scheduler.get("beta_end", 2e-2))
    if scheduler.get("trained_betas"):
        betas = np.asarray(scheduler["trained_betas"], dtype=np.float64)
    elif kind == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(n, dtype=np.float64)
        betas = np.minimum(1 - f((t + 1) / n) / f(t / n), 0.999)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    # diffusers computes the cumulative product in float32; match it.
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)


def noisy_and_target(z: np.ndarray, eps: np.ndarray, t: int, abar: np.ndarray, prediction_type: str) -> tuple[np.ndarray, np.ndarray]:
    """z_t = sqrt(ᾱ)z + sqrt(1-ᾱ)ε and the regression target (ε, or v for v-prediction)."""
    a, s = np.sqrt(abar[t]), np.sqrt(1.0 - abar[t])
    zt = (a * z + s * eps).astype(np.float32)
    if prediction_type == "epsilon":
        return zt, eps.astype(np.float32)
    if prediction_type == "v_prediction":
        return zt, (a * eps - s * z).astype(np.float32)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")
