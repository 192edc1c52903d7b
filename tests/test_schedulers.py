"""The NumPy samplers against diffusers' schedulers, loop for loop, with a deterministic fake UNet."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from zoodip_edge.errors import UserError
from zoodip_edge.runtime.schedulers import SAMPLERS, make_sampler
from zoodip_edge.schedule import alphas_cumprod

from conftest import BLOCK_TORCH

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

# diffusers' own set_timesteps trips NumPy 2's __array__ copy-keyword deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

DIFFUSERS = {"ddim": schedulers.DDIMScheduler, "dpm++": schedulers.DPMSolverMultistepScheduler,
             "euler": schedulers.EulerDiscreteScheduler}

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# As stored in SD1.x / SD2.x model repos (PNDM configs; skip_prk_steps is read by none of ours).
SD1 = {**SD_BETAS, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
       "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}
SD2V = {**SD1, "prediction_type": "v_prediction"}
SD2V_TRAILING = {**SD2V, "timestep_spacing": "trailing"}
CONFIGS = {"sd1": SD1, "sd2v": SD2V, "sd2v-trailing": SD2V_TRAILING}

# Further options, each for one sampler (or all: None).
VARIANTS = [
    (None, "class-defaults", dict(SD_BETAS)),  # DDIM: leading, clip_sample; DPM++/Euler: linspace
    (None, "linspace-v", {**SD2V, "timestep_spacing": "linspace"}),
    (None, "linear-betas", {"beta_schedule": "linear", "timestep_spacing": "trailing"}),
    (None, "cosine-betas-v", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
    ("ddim", "set-alpha-to-one", {**SD1, "set_alpha_to_one": True, "clip_sample": True,
                                  "clip_sample_range": 1.5}),
    ("dpm++", "heun", {**SD1, "solver_type": "heun"}),
    ("dpm++", "order-1", {**SD2V, "solver_order": 1}),
    ("dpm++", "sigma-min", {**SD1, "final_sigmas_type": "sigma_min"}),
    ("dpm++", "sigma-min-no-lof", {**SD2V, "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpm++", "euler-at-final", {**SD2V, "final_sigmas_type": "sigma_min", "euler_at_final": True}),
    ("dpm++", "lambda-clipped", {**SD2V_TRAILING, "lambda_min_clipped": -2.0}),
    ("dpm++", "lambda-clipped-linspace", {**SD1, "timestep_spacing": "linspace", "lambda_min_clipped": -2.0}),
    ("dpm++", "unipc-names", {**SD1, "solver_type": "bh2"}),
    ("euler", "sigma-min", {**SD2V_TRAILING, "final_sigmas_type": "sigma_min"}),
]

SHAPE = (1, 4, 8, 8)
TARGET = np.sin(np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE) * 0.37).astype(np.float32)


def fake_unet(config: dict):
    """A smooth, nonlinear 'denoiser' that believes x0 ≈ 0.7·TARGET + 0.3·tanh(x) (works at fractional t)."""
    abar = alphas_cumprod(config)
    v = config.get("prediction_type", "epsilon") == "v_prediction"

    def model(x: np.ndarray, t: float) -> np.ndarray:
        a = float(np.interp(t, np.arange(len(abar)), abar))
        x = x.astype(np.float64)
        x0 = 0.7 * TARGET + 0.3 * np.tanh(x)
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        return (a**0.5 * eps - (1 - a) ** 0.5 * x0 if v else eps).astype(np.float32)

    return model


def run_diffusers(name: str, config: dict, n: int, noise: np.ndarray):
    sched = DIFFUSERS[name].from_config(config)
    sched.set_timesteps(n)
    model = fake_unet(config)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    samples = []
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t).numpy(), float(t))
        x = sched.step(torch.from_numpy(out), t, x).prev_sample
        samples.append(x.numpy().copy())
    return sched, samples


def run_ours(sampler, config: dict, noise: np.ndarray, forced: list | None = None):
    """Our loop; with `forced`, step i starts from forced[i] (diffusers' own trajectory) instead."""
    model = fake_unet(config)
    x = noise * sampler.init_noise_sigma
    samples = []
    for i, t in enumerate(sampler.timesteps):
        x = x if forced is None else forced[i]
        x = sampler.step(model(sampler.scale_model_input(x, i), float(t)), i, x)
        samples.append(x)
    return samples


def check_matches_diffusers(name: str, config: dict, n: int):
    noise = np.random.default_rng(n).standard_normal(SHAPE).astype(np.float32)
    sched, theirs = run_diffusers(name, config, n, noise)
    ours_sampler = make_sampler(name, config, n)
    if name == "euler":
        assert ours_sampler.timesteps.dtype == np.float32
        np.testing.assert_allclose(ours_sampler.timesteps, sched.timesteps.numpy(), rtol=0, atol=1e-4)
    else:
        assert ours_sampler.timesteps.dtype == np.int64
        np.testing.assert_array_equal(ours_sampler.timesteps, sched.timesteps.numpy())
    assert ours_sampler.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
    inputs = [noise * ours_sampler.init_noise_sigma] + theirs[:-1]
    assert len(theirs) == len(ours_sampler.timesteps)
    # Step by step from diffusers' trajectory: each step (and DPM++'s history) agrees to float32 noise.
    # A step computes x + (something), so the rounding of x itself is the floor of agreement (it
    # matters for Euler's first step under a cosine schedule, where σ_max ≈ 2e4).
    for i, (a, b, x) in enumerate(zip(run_ours(ours_sampler, config, noise, inputs), theirs, inputs)):
        assert a.dtype == np.float32, i
        atol = 1e-5 + 1e-6 * float(np.abs(x).max())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=f"{name} forced step {i}")
    # Free-running, every intermediate sample and the final one. σ_max ≈ 2e4 leaves diffusers' own
    # float32 result uncertain to ~1e-3 after the first step, hence the looser bound there.
    ours = run_ours(ours_sampler, config, noise)
    tol = 1e-2 if ours_sampler.init_noise_sigma > 1e3 else None
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, rtol=tol or 1e-4, atol=tol or 1e-5, err_msg=f"{name} step {i}")
    # The loop really denoises towards the fake model's fixed point, not to something degenerate.
    assert np.isfinite(ours[-1]).all() and np.abs(ours[-1]).max() < 5
    return ours


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_matches_diffusers_on_sd_configs(name, config, n):
    check_matches_diffusers(name, CONFIGS[config], n)


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("name,config",
                         [(s, v) for only, v, _ in VARIANTS for s in SAMPLERS if only in (None, s)], ids=str)
def test_matches_diffusers_on_other_options(name, config, n):
    check_matches_diffusers(name, next(c for _, v, c in VARIANTS if v == config), n)


@pytest.mark.parametrize("n", [14, 15])
def test_dpm_second_order_final_step_from_15_steps_with_sigma_min(n):
    # With final_sigmas_type sigma_min, lower_order_final only applies below 15 steps.
    check_matches_diffusers("dpm++", {**SD1, "final_sigmas_type": "sigma_min"}, n)


@pytest.mark.parametrize("name", SAMPLERS)
def test_one_step_and_all_train_steps_schedules(name):
    for n in (1, 1000):
        ours = make_sampler(name, SD2V_TRAILING, n)
        sched = DIFFUSERS[name].from_config(SD2V_TRAILING)
        sched.set_timesteps(n)
        np.testing.assert_allclose(ours.timesteps, sched.timesteps.numpy(), rtol=0, atol=1e-4)
    check_matches_diffusers(name, SD1, 1)


@pytest.mark.parametrize("name", SAMPLERS)
def test_trailing_drops_diffusers_spurious_last_timestep(name):
    # Deviation: diffusers' float arange gives 62 timesteps for 61 steps, the last one -1.
    ours = make_sampler(name, SD2V_TRAILING, 61)
    sched = DIFFUSERS[name].from_config(SD2V_TRAILING)
    sched.set_timesteps(61)
    theirs = sched.timesteps.numpy()
    assert len(theirs) == 62 and theirs[-1] == -1
    assert len(ours.timesteps) == 61 and ours.timesteps.min() >= 0
    np.testing.assert_allclose(ours.timesteps, theirs[:61], rtol=0, atol=1e-4)


def test_dpm_sampler_can_be_reused_and_steps_in_order():
    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    s = make_sampler("dpm++", SD1, 10)
    first, again = run_ours(s, SD1, noise), run_ours(s, SD1, noise)
    np.testing.assert_array_equal(first[-1], again[-1])
    with pytest.raises(ValueError, match="in order"):
        s.step(noise, 5, noise)


# ------------------------------------------------------------------------ user errors ----

def _one_line_error(fn, *args, match: str):
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)


def test_unknown_sampler_and_bad_step_counts():
    _one_line_error(make_sampler, "pndm", SD1, 10, match="ddim, dpm\\+\\+, euler")
    for bad in (0, -3, 1001, 2.5, True, "10", None):
        _one_line_error(make_sampler, "ddim", SD1, bad, match="sampling steps")
    _one_line_error(make_sampler, "euler", {**SD1, "num_train_timesteps": 500}, 501, match="1 to 500")


@pytest.mark.parametrize("name,option,value", [
    ("ddim", "thresholding", True),
    ("ddim", "prediction_type", "sample"),
    ("ddim", "timestep_spacing", "karras"),
    ("dpm++", "use_karras_sigmas", True),
    ("dpm++", "use_lu_lambdas", True),
    ("dpm++", "solver_order", 3),
    ("dpm++", "algorithm_type", "sde-dpmsolver++"),
    ("dpm++", "algorithm_type", "dpmsolver"),
    ("dpm++", "variance_type", "learned_range"),
    ("dpm++", "thresholding", True),
    ("dpm++", "prediction_type", "flow_prediction"),
    ("euler", "use_karras_sigmas", True),
    ("euler", "use_exponential_sigmas", True),
    ("euler", "interpolation_type", "log_linear"),
    ("euler", "final_sigmas_type", "sigma_max"),
] + [(s, "rescale_betas_zero_snr", True) for s in SAMPLERS])
def test_unsupported_options_are_refused(name, option, value):
    _one_line_error(make_sampler, name, {**SD1, option: value}, 10, match=option)


def test_other_refusals_and_ignored_keys():
    _one_line_error(make_sampler, "euler", {**SD2V, "timestep_type": "continuous"}, 10, match="timestep_type")
    make_sampler("euler", {**SD1, "timestep_type": "continuous"}, 10)  # no effect with epsilon in diffusers
    _one_line_error(make_sampler, "ddim", {**SD1, "beta_schedule": "sigmoid"}, 10, match="sigmoid")
    # Options a diffusers class does not read are ignored, as from_config ignores them.
    make_sampler("ddim", {**SD1, "use_karras_sigmas": True, "solver_order": 3}, 10)
    make_sampler("dpm++", {**SD1, "use_karras_sigmas": None, "thresholding": False}, 10)


# ---------------------------------------------------------------------------- imports ----

SAMPLE_WITHOUT_TORCH = BLOCK_TORCH + """
import numpy as np
from zoodip_edge.runtime.schedulers import make_sampler
for name in ('ddim', 'dpm++', 'euler'):
    s = make_sampler(name, {'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'beta_end': 0.012}, 4)
    x = np.ones((1, 4, 2, 2), np.float32) * s.init_noise_sigma
    for i in range(len(s.timesteps)):
        x = s.step(0.5 * s.scale_model_input(x, i), i, x)
    assert np.isfinite(x).all()
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]
assert not bad, bad
"""


def test_schedulers_module_never_imports_torch_diffusers_transformers():
    r = subprocess.run([sys.executable, "-c", SAMPLE_WITHOUT_TORCH], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ddpm_variance_type_is_ignored_like_diffusers():
    """Bundles carry the training scheduler's config (DDPM: variance_type fixed_small); DPM++ ignores it."""
    a = make_sampler("dpm++", {**SD1, "variance_type": "fixed_small"}, 10)
    b = make_sampler("dpm++", SD1, 10)
    assert np.array_equal(a.timesteps, b.timesteps)
