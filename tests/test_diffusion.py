"""Parity of idfuse_jax.diffusion with diffusers' DDPM, DDIM and DPM-Solver++ schedulers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from idfuse_jax import diffusion as dif
from idfuse_jax.errors import WeightsError

ATOL = 1e-5
# diffusers' own numpy-2 deprecation noise.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SHAPE = (2, 4, 4, 4)  # NHWC latents; one shape for every jitted test keeps compiles few
NUM_STEPS = 6
# Stable Diffusion 1.x's scheduler config, as its pipeline ships it (PNDMScheduler).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
BETA_CONFIGS = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": list(np.linspace(1e-4, 0.03, 1000))},
}

_rng = np.random.default_rng(0)
W = np.eye(SHAPE[-1]) + 0.1 * _rng.standard_normal((SHAPE[-1], SHAPE[-1]))
B = 0.05 * _rng.standard_normal(SHAPE[-1])


def sd_config(**overrides) -> dict:
    return {**SD_CONFIG, **overrides}


def ref(cls, config: dict):
    """The diffusers scheduler for `config`, with its quiet handling of foreign keys."""
    return cls.from_config(config)


def max_err(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))


def toy_denoise_np(x, t):
    """A fixed linear map of x and t, standing in for a UNet (numpy or torch float64)."""
    scale = 0.3 + 0.7 * float(t) / 1000.0
    if isinstance(x, torch.Tensor):
        return (x @ torch.from_numpy(W)) * scale + torch.from_numpy(B)
    return (x @ W) * scale + B


def toy_denoise_jax(x, t):
    scale = 0.3 + 0.7 * t.astype(jnp.float32) / 1000.0
    return (x @ jnp.asarray(W, jnp.float32)) * scale + jnp.asarray(B, jnp.float32)


def data(seed: int = 1, n: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE) for _ in range(n)]


def t64(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float64))


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", list(BETA_CONFIGS))
def test_alphas_cumprod_match_diffusers(name):
    config = BETA_CONFIGS[name]
    ours = dif.Schedule.from_config(config)
    theirs = ref(DDPMScheduler, config).alphas_cumprod.numpy()
    err = max_err(ours.alphas_cumprod, theirs)
    print(f"alphas_cumprod[{name}] max abs err {err:.2e}")
    assert ours.alphas_cumprod.shape == (1000,)
    assert err < ATOL


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_add_noise_velocity_and_target(name):
    config = {**BETA_CONFIGS[name], "prediction_type": "v_prediction"}
    ours = dif.Schedule.from_config(config)
    theirs = ref(DDPMScheduler, config)
    x0, noise = data(n=2)
    t = np.array([0, 999])
    want_xt = theirs.add_noise(t64(x0), t64(noise), torch.from_numpy(t))
    want_v = theirs.get_velocity(t64(x0), t64(noise), torch.from_numpy(t))
    x0j, nj = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
    err_xt = max_err(dif.add_noise(ours, x0j, nj, jnp.asarray(t)), want_xt)
    err_v = max_err(dif.velocity(ours, x0j, nj, jnp.asarray(t)), want_v)
    print(f"add_noise[{name}] {err_xt:.2e}, velocity {err_v:.2e}")
    assert err_xt < ATOL and err_v < ATOL
    np.testing.assert_array_equal(
        dif.training_target(ours, x0j, nj, 500), dif.velocity(ours, x0j, nj, 500)
    )
    eps_schedule = dif.Schedule.from_config(BETA_CONFIGS[name])
    np.testing.assert_array_equal(dif.training_target(eps_schedule, x0j, nj, 500), nj)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_and_eps_inverts_the_training_target(prediction_type):
    schedule = dif.Schedule.from_config(sd_config(prediction_type=prediction_type))
    x0, noise = (jnp.asarray(a, jnp.float32) for a in data(n=2))
    t = jnp.array([10, 700])
    x_t = dif.add_noise(schedule, x0, noise, t)
    got_x0, got_eps = dif.predict_x0_and_eps(
        schedule, dif.training_target(schedule, x0, noise, t), x_t, t
    )
    assert max_err(got_x0, x0) < 1e-4 and max_err(got_eps, noise) < 1e-4


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    config = sd_config() if spacing is None else sd_config(timestep_spacing=spacing)
    schedule = dif.Schedule.from_config(config)
    for kind, cls in (("ddim", DDIMScheduler), ("dpm_solver", DPMSolverMultistepScheduler)):
        theirs = ref(cls, config)
        for n in (1, 6, 7, 50, 999):
            theirs.set_timesteps(n)
            np.testing.assert_array_equal(
                dif.timesteps(schedule, n, kind), theirs.timesteps.numpy(), err_msg=f"{kind} {n}"
            )


def test_timesteps_reject_bad_step_counts():
    schedule = dif.Schedule.from_config(SD_CONFIG)
    with pytest.raises(ValueError, match="num_steps=0"):
        dif.timesteps(schedule, 0)
    with pytest.raises(ValueError, match="num_steps=1001"):
        dif.timesteps(schedule, 1001)
    with pytest.raises(ValueError, match="kind='euler'"):
        dif.timesteps(schedule, 10, "euler")


# ----------------------------------------------------------------------------- config handling


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("clip_sample", True),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("use_karras_sigmas", True),
        ("solver_order", 3),
        ("algorithm_type", "sde-dpmsolver++"),
        ("variance_type", "learned_range"),
        ("some_new_option", 1),
        ("prediction_type", "sample"),
        ("beta_schedule", "sigmoid"),
        ("timestep_spacing", "karras"),
        ("num_train_timesteps", 0),
        ("trained_betas", [0.1, 0.2]),
        ("steps_offset", 0.5),
        ("set_alpha_to_one", "yes"),
    ],
)
def test_unsupported_config_is_refused_by_name(key, value):
    with pytest.raises(WeightsError, match=key):
        dif.Schedule.from_config(sd_config(**{key: value}))


def test_real_configs_are_accepted(tmp_path):
    # A DPMSolverMultistepScheduler config as diffusers saves it: every option at its default.
    dpm = ref(DPMSolverMultistepScheduler, sd_config(prediction_type="v_prediction"))
    dpm.save_config(tmp_path / "dpm")
    schedule = dif.load_schedule(tmp_path / "dpm")
    assert schedule.prediction_type == "v_prediction"
    assert schedule.timestep_spacing == "linspace" and schedule.steps_offset == 1

    # A pipeline folder: model_index.json plus scheduler/scheduler_config.json.
    pipe = tmp_path / "pipe"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_CONFIG))
    schedule = dif.load_schedule(pipe)
    assert schedule.timestep_spacing is None and schedule.prediction_type == "epsilon"
    # set_alpha_to_one=False: DDIM's last step lands on alpha-bar_0, not 1.
    assert float(schedule.final_alpha_cumprod) == pytest.approx(1 - 0.00085, rel=1e-6)

    with pytest.raises(ValueError, match=r"scheduler_config\.json"):
        dif.load_schedule(tmp_path / "dpm" / "..")


# ----------------------------------------------------------------------------- single steps


def realistic_outputs(schedule, ts, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """x_T = noised x0, and per-step model outputs = the true target plus 10% error.

    Raw random outputs would make eps-prediction's x0 = (x - sigma eps) / alpha reach ~50,
    where float32 itself (ours and diffusers' alike) is off by ~1e-5.
    """
    x0, eps, *errors = data(seed=seed, n=2 + len(ts))
    a = np.asarray(schedule.alphas_cumprod, np.float64)

    def target(t):
        if schedule.prediction_type == "v_prediction":
            return np.sqrt(a[t]) * eps - np.sqrt(1 - a[t]) * x0
        return eps

    x_T = np.sqrt(a[ts[0]]) * x0 + np.sqrt(1 - a[ts[0]]) * eps
    return x_T, [target(t) + 0.1 * e for t, e in zip(ts, errors)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    config = sd_config(prediction_type=prediction_type)
    schedule = dif.Schedule.from_config(config)
    theirs = ref(DDIMScheduler, config)
    theirs.set_timesteps(NUM_STEPS)
    (noise,) = data(seed=8)
    ts = dif.timesteps(schedule, NUM_STEPS)
    errs = []
    # A middle step, and the last (to final_alpha_cumprod).
    for t in (int(ts[1]), int(ts[-1])):
        x, (out,) = realistic_outputs(schedule, [t], seed=t)
        want = theirs.step(t64(out), t, t64(x), eta=eta, variance_noise=t64(noise))
        got, got_x0 = dif.ddim_step(
            schedule,
            jnp.asarray(out, jnp.float32),
            jnp.asarray(x, jnp.float32),
            t,
            t - 1000 // NUM_STEPS,
            eta=eta,
            noise=jnp.asarray(noise, jnp.float32),
        )
        errs += [max_err(got, want.prev_sample), max_err(got_x0, want.pred_original_sample)]
    print(f"ddim_step[{prediction_type}, eta={eta}] max abs err {max(errs):.2e}")
    assert max(errs) < ATOL


def test_ddim_step_needs_noise_for_eta():
    schedule = dif.Schedule.from_config(SD_CONFIG)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        dif.ddim_step(schedule, x, x, 500, 300, eta=0.5)
    with pytest.raises(ValueError, match=r"eta=1\.5"):
        dif.ddim_step(schedule, x, x, 500, 300, eta=1.5, noise=x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_steps_match_diffusers(prediction_type):
    """Every step of a 6-step solve: 1st order, then 2nd order (needs the carried output), and
    the 1st-order final step to sigma 0."""
    config = sd_config(prediction_type=prediction_type)
    schedule = dif.Schedule.from_config(config)
    theirs = ref(DPMSolverMultistepScheduler, config)
    theirs.set_timesteps(NUM_STEPS)
    ts = [*dif.timesteps(schedule, NUM_STEPS, "dpm_solver"), -1]
    x_T, outs = realistic_outputs(schedule, ts[:-1], seed=2)
    x_ref, x_ours = t64(x_T), jnp.asarray(x_T, jnp.float32)
    state = dif.dpm_solver_pp_init(x_ours)
    errs = []
    for i, out in enumerate(outs):
        x_ref = theirs.step(t64(out), int(ts[i]), x_ref).prev_sample
        x_ours, state = dif.dpm_solver_pp_step(
            schedule, jnp.asarray(out, jnp.float32), x_ours, ts[i], ts[i + 1], state
        )
        errs.append(max_err(x_ours, x_ref))
    print(f"dpm_solver_pp_step[{prediction_type}] max abs err per step {np.array(errs)}")
    assert max(errs) < ATOL
    assert int(state.prev_t) == ts[-2]


# ----------------------------------------------------------------------------- full loops


def run_reference(scheduler, x_T: np.ndarray, noises=None, eta: float = 0.0) -> torch.Tensor:
    scheduler.set_timesteps(NUM_STEPS)
    x = t64(x_T)
    for i, t in enumerate(scheduler.timesteps):
        out = toy_denoise_np(x, t)
        kwargs = {} if noises is None else {"eta": eta, "variance_noise": t64(noises[i])}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("sampler", "cls"),
    [(dif.ddim_sample, DDIMScheduler), (dif.dpm_solver_pp_sample, DPMSolverMultistepScheduler)],
)
def test_sampling_loop_matches_diffusers(sampler, cls, prediction_type):
    config = sd_config(prediction_type=prediction_type)
    schedule = dif.Schedule.from_config(config)
    x_T = data(seed=4)[0]
    want = run_reference(ref(cls, config), x_T)
    # The schedule goes in as a jit argument: it is a pytree with static options.
    run = jax.jit(lambda s, x: sampler(toy_denoise_jax, s, x, NUM_STEPS))
    got = run(schedule, jnp.asarray(x_T, jnp.float32))
    err = max_err(got, want)
    print(f"{sampler.__name__}[{prediction_type}] 6-step loop max abs err {err:.2e}")
    assert got.shape == SHAPE and got.dtype == jnp.float32
    assert err < ATOL
    # Guard against a vacuous comparison: the loop must have moved x a long way.
    assert max_err(want, x_T) > 0.5


def test_dpm_solver_loop_trailing_and_final_step_options():
    # lower_order_final / euler_at_final are accepted as harmless: check that claim.
    config = sd_config(timestep_spacing="trailing", lower_order_final=False, euler_at_final=True)
    x_T = data(seed=5)[0]
    want = run_reference(ref(DPMSolverMultistepScheduler, config), x_T)
    schedule = dif.Schedule.from_config(config)
    run = jax.jit(lambda s, x: dif.dpm_solver_pp_sample(toy_denoise_jax, s, x, NUM_STEPS))
    err = max_err(run(schedule, jnp.asarray(x_T, jnp.float32)), want)
    print(f"dpm_solver_pp_sample[trailing] max abs err {err:.2e}")
    assert err < ATOL


def test_ddim_loop_with_eta_matches_diffusers_given_the_same_noise():
    config = sd_config(prediction_type="epsilon")
    schedule = dif.Schedule.from_config(config)
    key = jax.random.key(7)
    x_T = data(seed=6)[0]
    # The noise ddim_sample draws at step i, handed to diffusers as variance_noise.
    noises = [
        np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32))
        for i in range(NUM_STEPS)
    ]
    want = run_reference(ref(DDIMScheduler, config), x_T, noises, eta=0.5)
    run = jax.jit(
        lambda k, x: dif.ddim_sample(toy_denoise_jax, schedule, x, NUM_STEPS, eta=0.5, key=k)
    )
    got = run(key, jnp.asarray(x_T, jnp.float32))
    err = max_err(got, want)
    print(f"ddim_sample[eta=0.5] max abs err {err:.2e}")
    assert err < ATOL
    with pytest.raises(ValueError, match="key"):
        dif.ddim_sample(toy_denoise_jax, schedule, got, NUM_STEPS, eta=0.5)
