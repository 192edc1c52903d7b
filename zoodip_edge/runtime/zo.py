"""ZOODiP optimizer math in pure NumPy (docs/algorithm.md: "One step" and "Building P").

One token vector theta in R^d is learned from loss values alone: RGE (forward differences,
shared base) -> Subspace Gradient projection -> ZOAdam, timesteps from PUTS. A step is split
into ``propose`` and ``update`` so the n + 1 forward passes can be one batched ORT call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

#: Every graph computes in float32: a token it cannot hold is never applied.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def fits_float32(theta: np.ndarray) -> bool:
    """Finite and inside float32, the precision every graph computes in."""
    return bool(np.all(np.abs(theta) <= FLOAT32_MAX))  # NaN compares False


class OutOfRange(ValueError):
    """A step would take theta outside float32; the optimizer was left as it was."""


def puts_sample(rng: np.random.Generator, t_low: int, t_high: int) -> int:
    """Partial Uniform Timestep Sampling: t ~ U{t_low, ..., t_high - 1}. PUTS off = (0, 1000)."""
    return int(rng.integers(t_low, t_high))


@dataclass(frozen=True)
class ZOConfig:
    n: int = 2  # perturbations per step (n + 1 forward passes)
    mu: float = 1e-3  # perturbation size
    lr: float = 1e-2
    tau: int = 128  # SG buffer length and rebuild period
    nu: float = 1e-3  # SG keeps components explaining > 1 - nu of the variance
    t_low: int = 500
    t_high: int = 900
    subspace: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-3  # the authors' code uses 1e-3, not Adam's usual 1e-8
    # Guided directions (docs/algorithm.md, "Guided directions"); the defaults are the paper's method.
    guide_momentum: bool = False  # the first direction points along ZOAdam's first moment
    guide_k: int = 0  # > 0: directions mix the span of the last k gradient estimates into N(0, I)
    guide_alpha: float = 0.5  # the share of the full space in that mix
    guide_vocab: int = 0  # > 0: directions also mix the top-k principal directions of the token table
    guide_encoder: int = 0  # > 0: ... and the k directions the text conditions respond to most (sensitivity.py)
    guide_refresh: int = 250  # steps between readings of those directions at the current token


# ---------------------------------------------------------------- RGE ----------------

def perturbation_directions(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n directions e_i ~ N(0, I_d) as rows, shape [n, d]."""
    return rng.standard_normal((n, d))


def guided_directions(z: np.ndarray, basis: np.ndarray, alpha: float, extra: np.random.Generator) -> np.ndarray:
    """Guided evolution strategies: e ~ N(0, alpha I + (1 - alpha) d/k U U^T), U = ``basis`` rows
    (orthonormal, k of them). The covariance keeps trace d, so RGE's scale stays right, and the
    variance along the guiding subspace grows d/k times. ``z`` are the N(0, I) draws; ``extra``
    draws the subspace coordinates, so the main stream (t, noise, z) is the same with and without."""
    k, d = basis.shape
    if k == 0:
        return z
    eta = extra.standard_normal((z.shape[0], k))
    return np.sqrt(alpha) * z + np.sqrt((1 - alpha) * d / k) * (eta @ basis)


def along(v: np.ndarray) -> np.ndarray | None:
    """``v`` scaled to the norm of an N(0, I_d) draw (sqrt d); None for a zero vector."""
    norm = float(np.linalg.norm(v))
    return v * (np.sqrt(v.size) / norm) if norm > 0 else None


def vocabulary_basis(table: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """The top-``k`` principal directions of a token table's rows (orthonormal rows, [k, d]).

    The text encoder was trained on these rows, so its response to the token, and with it the
    diffusion loss's gradient, is concentrated along them (docs/steps.md measures it)."""
    # In float64 chunks of rows: SD's memory-mapped fp16 table (49,408 x 768) as one float64 copy,
    # centred, would add about 600 MB to the device's peak; the d x d scatter is small for any vocabulary.
    spans = [(i, min(i + chunk, len(table))) for i in range(0, len(table), chunk)]
    mean = sum(np.asarray(table[a:b], dtype=np.float64).sum(axis=0) for a, b in spans) / len(table)
    scatter = np.zeros((table.shape[1], table.shape[1]))
    for a, b in spans:
        centered = np.asarray(table[a:b], dtype=np.float64) - mean
        scatter += centered.T @ centered
    _, vectors = np.linalg.eigh(scatter)
    return np.ascontiguousarray(vectors[:, ::-1][:, :k].T)


def perturbed_thetas(theta: np.ndarray, directions: np.ndarray, mu: float) -> np.ndarray:
    """Rows [theta, theta + mu e_1, ..., theta + mu e_n]: one batch for all n + 1 losses."""
    return np.concatenate([theta[None, :], theta[None, :] + mu * directions], axis=0)


def rge_estimate(losses: np.ndarray, directions: np.ndarray, mu: float, p_rows: int) -> np.ndarray:
    """Randomized gradient estimate from losses[0] = L(theta), losses[i] = L(theta + mu e_i).

    Scaled by s = n sqrt((d' + n - 1) / n), d' = d - p_rows, as in the authors' code (the
    paper writes s = n). With small mu, E[g_hat] = grad L / sqrt((d' + n - 1) / n).
    """
    losses = np.asarray(losses, dtype=np.float64)
    n, d = directions.shape
    g = (losses[1:] - losses[0]) / mu  # directional derivatives along e_i
    s = n * np.sqrt((d - p_rows + n - 1) / n)
    return (g @ directions) / s


# ---------------------------------------------------------------- ZOAdam -------------

class ZOAdam:
    """Adam on the estimated gradient: bias-corrected, no weight decay."""

    def __init__(self, d: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m, self.v, self.t = np.zeros(d), np.zeros(d), 0

    def step(self, theta: np.ndarray, g: np.ndarray) -> np.ndarray:
        theta, moments = self.proposal(theta, g)
        self.commit(moments)
        return theta

    def proposal(self, theta: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The step's new theta and moments, nothing changed yet: ``commit`` applies the moments."""
        t = self.t + 1
        m = self.beta1 * self.m + (1 - self.beta1) * g
        v = self.beta2 * self.v + (1 - self.beta2) * g * g
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        return theta - self.lr * m_hat / (np.sqrt(v_hat) + self.eps), {"m": m, "v": v, "t": t}

    def commit(self, moments: dict[str, Any]) -> None:
        self.m, self.v, self.t = moments["m"], moments["v"], moments["t"]

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m.copy(), "v": self.v.copy(), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v = (np.array(state[k], dtype=np.float64) for k in ("m", "v"))
        self.t = int(state["t"])


# ---------------------------------------------------------------- Subspace Gradient --

def low_variance_basis(buffer: np.ndarray, nu: float) -> np.ndarray:
    """P (rows) = the PCA directions of the standardized buffer beyond the first i*.

    i* = smallest count i with sum(lambda[:i]) / sum(lambda) > 1 - nu; P = [v_{i*+1}, ...].
    Candidates are the SVD directions with nonzero variance, i.e. inside the span of the
    centered buffer (at most min(tau - 1, d)): a zero-variance SVD row is an arbitrary,
    LAPACK-dependent pick from the complement (sklearn's PCA would keep it; we do not).
    """
    b = np.asarray(buffer, dtype=np.float64)
    tau, d = b.shape
    mean, var = b.mean(axis=0), b.var(axis=0)  # population variance, as StandardScaler
    # StandardScaler treats features constant up to rounding (not only var == 0) as constant
    eps = np.finfo(np.float64).eps
    constant = var <= tau * eps * var + (tau * mean * eps) ** 2
    std = np.where(constant, 1.0, np.sqrt(var))
    z = (b - mean) / std
    z -= z.mean(axis=0)  # PCA centers again; ~0 already
    _, sing, vt = np.linalg.svd(z, full_matrices=False)
    rank = int(np.sum(sing > sing[0] * max(tau, d) * eps)) if sing[0] > 0 else 0  # as matrix_rank
    if rank == 0:  # no movement at all: nothing is known, remove nothing
        return np.zeros((0, d))
    lam, vt = sing[:rank] ** 2, vt[:rank]  # explained variance up to the factor 1 / (tau - 1)
    above = np.flatnonzero(np.cumsum(lam) / lam.sum() > 1.0 - nu)
    i_star = int(above[0]) + 1 if above.size else lam.size  # count of kept components
    return vt[i_star:].copy()


class SubspaceGradient:
    """Ring buffer of the last tau tokens; every tau pushes, P is rebuilt from it."""

    def __init__(self, d: int, tau: int, nu: float):
        self.tau, self.nu = tau, nu
        self.buffer, self.count, self.p = np.zeros((tau, d)), 0, np.zeros((0, d))  # count: pushes

    def push(self, theta: np.ndarray) -> None:
        self.buffer[self.count % self.tau] = theta
        self.count += 1
        if self.count % self.tau == 0:
            self.p = low_variance_basis(self.buffer, self.nu)

    def project(self, g: np.ndarray) -> np.ndarray:
        """g (I - P^T P); identity while P is empty."""
        if self.p.shape[0] == 0:
            return g
        return g - (g @ self.p.T) @ self.p

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.copy(), "count": self.count, "p": self.p.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = np.array(state["buffer"], dtype=np.float64)
        self.count = int(state["count"])
        self.p = np.array(state["p"], dtype=np.float64).reshape(-1, self.buffer.shape[1])


# ---------------------------------------------------------------- the optimizer ------

@dataclass
class StepPlan:
    """What the caller evaluates: losses at ``thetas`` for timestep t and the noise/image
    drawn from ``noise_seed`` (the same for all n + 1 rows: common random numbers)."""

    step: int
    t: int
    noise_seed: int
    directions: np.ndarray  # [n, d]
    thetas: np.ndarray  # [n + 1, d]; row 0 is the current theta


@dataclass
class StepRecord:
    step: int
    t: int
    noise_seed: int
    losses: np.ndarray  # (n + 1,)
    g: np.ndarray  # the projected gradient estimate that Adam consumed
    theta: np.ndarray  # theta after the update

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; Python's float repr round-trips float64 exactly."""
        return {"step": self.step, "t": self.t, "noise_seed": self.noise_seed,
                "losses": self.losses.tolist(), "g": self.g.tolist(), "theta": self.theta.tolist()}

    @classmethod
    def from_dict(cls, r: dict[str, Any]) -> StepRecord:
        return cls(int(r["step"]), int(r["t"]), int(r["noise_seed"]),
                   np.array(r["losses"], dtype=np.float64), np.array(r["g"], dtype=np.float64),
                   np.array(r["theta"], dtype=np.float64))


class ZOOptimizer:
    """ZOODiP for one token vector. ``propose`` -> evaluate losses -> ``update``."""

    def __init__(self, theta0: np.ndarray, config: ZOConfig, seed: int, prior: np.ndarray | None = None):
        """``prior``: the guiding directions of ``guide_vocab`` (orthonormal rows, e.g. ``vocabulary_basis``);
        ``guide_encoder``'s are the caller's to set (``set_prior``) before a step, as the token moves."""
        self.config = config
        if config.guide_vocab and (prior is None or prior.ndim != 2 or prior.shape[1] != np.size(theta0)):
            raise ValueError(f"guide_vocab = {config.guide_vocab} needs prior directions of the token's size")
        self.set_prior(prior if config.guide_vocab else None)
        self.theta = np.array(theta0, dtype=np.float64).reshape(-1)
        self.adam = ZOAdam(self.theta.size, config.lr, config.beta1, config.beta2, config.eps)
        self.sg = SubspaceGradient(self.theta.size, config.tau, config.nu)
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.history = np.zeros((config.guide_k, self.theta.size))  # last k estimates (guided directions)
        self.step_index = 0
        self._pending: StepPlan | None = None
        self._rng_before_pending: dict[str, Any] | None = None

    def set_prior(self, prior: np.ndarray | None) -> None:
        """Guiding directions (rows), orthonormalized once here rather than at every step."""
        self.prior = prior
        self._prior_basis = None if prior is None else np.linalg.qr(prior.T)[0].T

    def propose(self) -> StepPlan:
        """Draw t, noise seed and directions for the next step (idempotent until ``update``)."""
        if self._pending is not None:
            return self._pending
        # a checkpoint taken before update() must redraw this same step on resume
        self._rng_before_pending = self.rng.bit_generator.state
        c = self.config
        t = puts_sample(self.rng, c.t_low, c.t_high)
        noise_seed = int(self.rng.integers(0, 2**32))
        directions = self._guide(perturbation_directions(self.rng, c.n, self.theta.size))
        self._pending = StepPlan(self.step_index, t, noise_seed, directions,
                                 perturbed_thetas(self.theta, directions, c.mu))
        return self._pending

    def _guide(self, z: np.ndarray) -> np.ndarray:
        """The directions of a guided lever from the step's N(0, I) draws (unchanged when off)."""
        c = self.config
        if c.guide_encoder and self.prior is None:
            raise ValueError("guide_encoder needs its directions (set_prior) before a step")
        if c.guide_k or self.prior is not None:
            filled = min(self.step_index, c.guide_k)
            if filled:  # recent estimates change every step: the basis with them too
                basis = np.concatenate([self.history[:filled]] + ([self.prior] if self.prior is not None else []))
                basis = np.linalg.qr(basis.T)[0].T
            else:
                basis = self._prior_basis if self.prior is not None else np.zeros((0, z.shape[1]))
            # its own stream, keyed by step: resumes and replays draw the same
            extra = np.random.Generator(np.random.PCG64([self.seed, self.step_index]))
            z = guided_directions(z, basis, c.guide_alpha, extra)
        if c.guide_momentum:
            m = along(self.adam.m)
            if m is not None:
                z = z.copy()
                z[0] = m
        return z

    def update(self, plan: StepPlan, losses: np.ndarray) -> StepRecord:
        """RGE -> SG projection -> ZOAdam -> push theta into the SG buffer. OutOfRange, with
        nothing changed, if the new theta would not fit float32."""
        if plan is not self._pending:
            raise ValueError("update() needs the plan from the latest propose()")
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if losses.shape != (self.config.n + 1,) or not np.all(np.isfinite(losses)):
            raise ValueError(f"expected {self.config.n + 1} finite losses, got {losses!r}")
        use_sg = self.config.subspace
        p_rows = self.sg.p.shape[0] if use_sg else 0
        g = rge_estimate(losses, plan.directions, self.config.mu, p_rows)
        if use_sg:
            g = self.sg.project(g)
        theta, moments = self.adam.proposal(self.theta, g)
        if not fits_float32(theta):  # refused before anything changes: no state to undo
            raise OutOfRange(f"step {plan.step + 1} would take the token outside the float32 range")
        if self.config.guide_k:
            self.history[self.step_index % self.config.guide_k] = g
        self.theta = theta
        self.adam.commit(moments)
        if use_sg:
            self.sg.push(self.theta)
        self._pending, self._rng_before_pending = None, None
        self.step_index += 1
        return StepRecord(plan.step, plan.t, plan.noise_seed, losses, g, self.theta.copy())

    def step(self, loss_fn: Callable[[np.ndarray, StepPlan], np.ndarray]) -> StepRecord:
        """One full step with ``loss_fn(thetas [n+1, d], plan) -> losses (n+1,)``."""
        plan = self.propose()
        return self.update(plan, loss_fn(plan.thetas, plan))

    def state_dict(self) -> dict[str, Any]:
        rng_state = self._rng_before_pending or self.rng.bit_generator.state
        return {"theta": self.theta.copy(), "step": self.step_index, "rng": rng_state,
                "adam": self.adam.state_dict(), "sg": self.sg.state_dict(), "history": self.history.copy(),
                **({"prior": self.prior.copy()} if self.prior is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta, self.step_index = np.array(state["theta"], dtype=np.float64), int(state["step"])
        self.rng.bit_generator.state = state["rng"]
        self.adam.load_state_dict(state["adam"])
        self.sg.load_state_dict(state["sg"])
        if "history" in state:
            self.history = np.array(state["history"], dtype=np.float64).reshape(self.history.shape)
        if "prior" in state:  # guide_encoder's directions, as read at the token of their last reading
            self.set_prior(np.array(state["prior"], dtype=np.float64).reshape(-1, self.theta.size))
        self._pending, self._rng_before_pending = None, None


def replay(theta0: np.ndarray, config: ZOConfig,
           records: Iterable[StepRecord | dict[str, Any]]) -> np.ndarray:
    """theta after applying ZOAdam to the logged (already projected) gradients; no losses needed."""
    theta = np.array(theta0, dtype=np.float64).reshape(-1)
    adam = ZOAdam(theta.size, config.lr, config.beta1, config.beta2, config.eps)
    for r in records:
        g = r.g if isinstance(r, StepRecord) else np.array(r["g"], dtype=np.float64)
        theta = adam.step(theta, g)
    return theta
