"""The DDPM noise schedule, training targets, and DDIM / DPM-Solver++(2M) samplers in pure JAX.

Everything matches diffusers numerically (its DDPMScheduler, DDIMScheduler and
DPMSolverMultistepScheduler with default solver options), but the samplers run entirely inside
`jax.jit`: timesteps are computed once in numpy, and the loop is a `lax.scan` over them.

A schedule comes from a diffusers `scheduler_config.json` (any scheduler class: SD 1.x ships
PNDMScheduler, SD 2.x DDIMScheduler; only the training noise schedule and the options below are
read). Config keys fall into four groups:

- read: `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule` (linear, scaled_linear,
  squaredcos_cap_v2), `trained_betas`, `prediction_type` (epsilon, v_prediction),
  `timestep_spacing` (leading, trailing, linspace), `steps_offset`, `set_alpha_to_one`;
- ignored as harmless (`IGNORED_KEYS`): metadata (every key starting with "_", which diffusers
  ignores too: `_class_name`, `_diffusers_version`, `_use_default_values`), options of samplers
  we do not run (`skip_prk_steps`), options that only act when a refused option is on
  (`clip_sample_range`, `dynamic_thresholding_ratio`, `sample_max_value`, `flow_shift`,
  `time_shift_type`), and DPM-Solver's `lower_order_final` and `euler_at_final`, which cannot
  change a 2nd-order solve whose final sigma is zero (diffusers takes a first-order final step
  then anyway);
- pinned (`PINNED_VALUES`): accepted only at the value we implement, e.g. `clip_sample` and
  `thresholding` must be false (a missing `clip_sample` counts as false, although
  DDIMScheduler's own default is true: clipping is wrong for latents, and SD configs set it);
- anything else is refused, since we cannot know that it leaves the maths alone.

Timesteps are integers in [0, num_train_timesteps); `t < 0` as a "next" timestep means the end
of sampling (DDIM: `final_alpha_cumprod`; DPM-Solver: sigma 0).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from idfuse_jax.errors import WeightsError
from idfuse_jax.formats import component_dir, read_json

SolverKind = Literal["ddim", "dpm_solver"]
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' default spacing when a config has no `timestep_spacing` key, per scheduler class.
DEFAULT_SPACING = {"ddim": "leading", "dpm_solver": "linspace"}

READ_KEYS = frozenset(
    {
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
        "set_alpha_to_one",
    }
)
IGNORED_KEYS = frozenset(
    {
        "skip_prk_steps",
        "clip_sample_range",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "flow_shift",
        "time_shift_type",
        "lower_order_final",
        "euler_at_final",
    }
)
_FALSE = (False,)
PINNED_VALUES: dict[str, tuple[Any, ...]] = {
    "clip_sample": _FALSE,
    "thresholding": _FALSE,
    "rescale_betas_zero_snr": _FALSE,
    # DPMSolverMultistepScheduler: we implement its defaults only.
    "solver_order": (2,),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",),
    "final_sigmas_type": ("zero",),
    "lambda_min_clipped": (-math.inf,),
    # DDPM's ancestral-variance choices do not touch DDIM/DPM-Solver; "learned*" would mean the
    # model outputs extra variance channels.
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "use_karras_sigmas": _FALSE,
    "use_exponential_sigmas": _FALSE,
    "use_beta_sigmas": _FALSE,
    "use_lu_lambdas": _FALSE,
    "use_flow_sigmas": _FALSE,
    "use_dynamic_shifting": _FALSE,
    # EulerDiscreteScheduler (SDXL-style configs).
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "sigma_min": (None,),
    "sigma_max": (None,),
}


def _pinned_ok(value: Any, allowed: tuple[Any, ...]) -> bool:
    # `type(value) is bool` keeps 0/1 from passing for False/True and vice versa.
    return any(value == a and (type(value) is bool) == (type(a) is bool) for a in allowed)


def check_config(config: Mapping[str, Any]) -> None:
    """Raise `WeightsError` naming the first key whose value we would not honour."""
    for key, value in config.items():
        if key in READ_KEYS or key in IGNORED_KEYS or key.startswith("_"):
            continue
        if key not in PINNED_VALUES:
            raise WeightsError(f"scheduler config key {key}={value!r} is not supported")
        if not _pinned_ok(value, PINNED_VALUES[key]):
            allowed = " or ".join(repr(a) for a in PINNED_VALUES[key])
            raise WeightsError(
                f"scheduler config {key}={value!r} is not supported (must be {allowed})"
            )


def _choice(config: Mapping[str, Any], key: str, choices: tuple[str, ...], default: Any) -> Any:
    value = config.get(key, default)
    if value is not None and value not in choices:
        raise WeightsError(
            f"scheduler config {key}={value!r} is not supported (one of {', '.join(choices)})"
        )
    return value


def _number(config: Mapping[str, Any], key: str, default: float, kind: type = float) -> Any:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightsError(f"scheduler config {key}={value!r} is not a number")
    if kind is int and value != int(value):
        raise WeightsError(f"scheduler config {key}={value!r} is not an integer")
    return kind(value)


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _betas(config: Mapping[str, Any], n: int) -> np.ndarray:
    """Betas in float64, by the formulas of diffusers' schedulers (which run them in float32)."""
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, np.float64)
        if betas.shape != (n,):
            raise WeightsError(
                f"scheduler config trained_betas has shape {betas.shape}, expected ({n},)"
            )
        return betas
    schedule = _choice(config, "beta_schedule", BETA_SCHEDULES, "linear")
    start = _number(config, "beta_start", 0.0001)
    end = _number(config, "beta_end", 0.02)
    if schedule == "linear":
        return np.linspace(start, end, n)
    if schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n) ** 2
    # squaredcos_cap_v2: the GLIDE cosine schedule, betas capped at 0.999.
    edges = [_alpha_bar_cosine(i / n) for i in range(n + 1)]
    return np.array([min(1 - edges[i + 1] / edges[i], 0.999) for i in range(n)])


@struct.dataclass
class Schedule:
    """A DDPM noise schedule: cumulative alphas plus the static options the samplers need."""

    alphas_cumprod: jax.Array  # [num_train_timesteps] float32, alpha-bar_t
    final_alpha_cumprod: jax.Array  # scalar: alpha-bar "before" t=0, for DDIM's last step
    num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    # None: the sampler's diffusers default (DEFAULT_SPACING), as from_config would give.
    timestep_spacing: str | None = struct.field(pytree_node=False, default=None)
    steps_offset: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """The schedule a diffusers `scheduler_config.json` (as a dict) describes."""
        check_config(config)
        n = _number(config, "num_train_timesteps", 1000, int)
        if n < 1:
            raise WeightsError(f"scheduler config num_train_timesteps={n} must be >= 1")
        # float64 here, float32 stored: closer to the exact schedule than diffusers' own float32.
        alphas_cumprod = np.cumprod(1.0 - _betas(config, n))
        set_alpha_to_one = config.get("set_alpha_to_one", True)
        if not isinstance(set_alpha_to_one, bool):
            raise WeightsError(
                f"scheduler config set_alpha_to_one={set_alpha_to_one!r} is not a boolean"
            )
        final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
        return cls(
            alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            num_train_timesteps=n,
            prediction_type=_choice(config, "prediction_type", PREDICTION_TYPES, "epsilon"),
            timestep_spacing=_choice(config, "timestep_spacing", TIMESTEP_SPACINGS, None),
            steps_offset=_number(config, "steps_offset", 0, int),
        )


def load_schedule(folder: str | pathlib.Path) -> Schedule:
    """The schedule of a diffusers pipeline folder, or of its `scheduler/` folder itself."""
    folder = component_dir(folder, "scheduler")
    return Schedule.from_config(read_json(folder / "scheduler_config.json"))


# ----------------------------------------------------------------------------- training side


def _alpha_bar(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
    """alpha-bar at timesteps `t` (scalar or [B]), shaped to broadcast against a rank-`ndim` x."""
    a = schedule.alphas_cumprod[jnp.asarray(t)]
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; `t` is a scalar or one timestep per batch row."""
    a = _alpha_bar(schedule, t, x0.ndim)
    return (jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise).astype(x0.dtype)


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    a = _alpha_bar(schedule, t, x0.ndim)
    return (jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0).astype(x0.dtype)


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model learns to output: the noise, or v, as `prediction_type` says."""
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return noise


def _x0_and_eps(
    prediction_type: str, model_output: jax.Array, x_t: jax.Array, a: jax.Array
) -> tuple[jax.Array, jax.Array]:
    sa, sb = jnp.sqrt(a), jnp.sqrt(1 - a)
    if prediction_type == "v_prediction":
        return sa * x_t - sb * model_output, sa * model_output + sb * x_t
    return (x_t - sb * model_output) / sa, model_output


def predict_x0_and_eps(
    schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(predicted x0, predicted noise) from the model's output at x_t, in float32."""
    a = _alpha_bar(schedule, t, x_t.ndim)
    return _x0_and_eps(
        schedule.prediction_type,
        model_output.astype(jnp.float32),
        x_t.astype(jnp.float32),
        a,
    )


# ----------------------------------------------------------------------------- timesteps


def timesteps(schedule: Schedule, num_steps: int, kind: SolverKind = "ddim") -> np.ndarray:
    """The descending timesteps diffusers' `set_timesteps(num_steps)` gives, as int64 numpy.

    DDIMScheduler and DPMSolverMultistepScheduler space "leading" and "linspace" differently
    (DPM-Solver lays out num_steps + 1 points and drops t=0), hence `kind`.
    """
    n = schedule.num_train_timesteps
    if kind not in DEFAULT_SPACING:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(DEFAULT_SPACING)}")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= n:
        raise ValueError(f"num_steps={num_steps!r} must be an integer in [1, {n}]")
    spacing = schedule.timestep_spacing or DEFAULT_SPACING[kind]
    points = num_steps + (kind == "dpm_solver")
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, points).round()[::-1][:num_steps]
    elif spacing == "leading":
        ratio = n // points
        ts = (np.arange(points) * ratio).round()[::-1][:num_steps] + schedule.steps_offset
    else:  # trailing
        ts = np.round(np.arange(n, 0, -n / num_steps)) - 1
    return ts.astype(np.int64)


# ----------------------------------------------------------------------------- DDIM


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    *,
    eta: float = 0.0,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update from timestep `t` to `t_prev` (< 0: the end); returns (x_prev, x0).

    eta=0 is deterministic; eta>0 adds eta * sigma_t * `noise` (standard normal, x's shape).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1]")
    if eta > 0 and noise is None:
        raise ValueError("ddim_step with eta > 0 needs `noise`")
    ndim = x_t.ndim
    a_t = _alpha_bar(schedule, t, ndim)
    t_prev = jnp.asarray(t_prev)
    a_prev = jnp.where(
        t_prev >= 0,
        _alpha_bar(schedule, jnp.maximum(t_prev, 0), ndim),
        schedule.final_alpha_cumprod,
    )
    x0, eps = predict_x0_and_eps(schedule, model_output, x_t, t)
    x_prev = jnp.sqrt(a_prev) * x0
    if eta > 0:
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * jnp.sqrt(variance)
        # max(., 0) only guards rounding; mathematically eta <= 1 keeps it non-negative.
        x_prev = x_prev + jnp.sqrt(jnp.maximum(1 - a_prev - std**2, 0.0)) * eps + std * noise
    else:
        x_prev = x_prev + jnp.sqrt(1 - a_prev) * eps
    return x_prev.astype(x_t.dtype), x0


def ddim_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    x_T: jax.Array,
    num_steps: int,
    *,
    eta: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Run DDIM from x_T (pure noise) to x_0 in `num_steps` model calls, as one `lax.scan`.

    `denoise_fn(x_t, t)` returns the model output (with CFG if any) for a scalar int32 t.
    Like diffusers, each step goes to t - num_train_timesteps // num_steps whatever the spacing.
    With eta > 0, step i draws its noise from `fold_in(key, i)`.
    """
    if eta > 0 and key is None:
        raise ValueError("ddim_sample with eta > 0 needs `key`")
    ts = timesteps(schedule, num_steps, "ddim")
    prev = ts - schedule.num_train_timesteps // num_steps

    def body(x: jax.Array, step: tuple[jax.Array, jax.Array, jax.Array]):
        i, t, t_prev = step
        noise = None
        if eta > 0:
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x, _ = ddim_step(schedule, denoise_fn(x, t), x, t, t_prev, eta=eta, noise=noise)
        return x, None

    steps = (jnp.arange(len(ts)), jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32))
    x, _ = jax.lax.scan(body, x_T, steps)
    return x


# ----------------------------------------------------------------------------- DPM-Solver++


class DPMSolverState(struct.PyTreeNode):
    """What DPM-Solver++(2M) carries between steps: the previous x0 prediction and its t."""

    prev_x0: jax.Array  # float32, x's shape
    prev_t: jax.Array  # int32 scalar; -1 before the first step


def dpm_solver_pp_init(x: jax.Array) -> DPMSolverState:
    """The state before the first step (which is therefore first order)."""
    return DPMSolverState(jnp.zeros(x.shape, jnp.float32), jnp.asarray(-1, jnp.int32))


def _log_snr(a: jax.Array) -> jax.Array:
    """lambda = log(alpha / sigma) = 0.5 log(a / (1 - a)) for alpha-bar a."""
    return 0.5 * (jnp.log(a) - jnp.log1p(-a))


def dpm_solver_pp_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_next: jax.Array,
    state: DPMSolverState,
) -> tuple[jax.Array, DPMSolverState]:
    """One DPM-Solver++(2M) (midpoint) update from `t` to `t_next` (< 0: sigma 0, the end).

    Second order when `state` holds a previous output and t_next is not the end; otherwise first
    order (DDIM-like), as diffusers does with its default `final_sigmas_type="zero"`.
    `t` and `t_next` are scalars (the whole batch shares one timestep while sampling).
    """
    ndim = x_t.ndim
    x0, _ = predict_x0_and_eps(schedule, model_output, x_t, t)
    t_next = jnp.asarray(t_next)
    final = t_next < 0
    a_s = _alpha_bar(schedule, t, ndim)
    a_n = jnp.where(final, 1.0, _alpha_bar(schedule, jnp.maximum(t_next, 0), ndim))
    alpha_s, sigma_s = jnp.sqrt(a_s), jnp.sqrt(1 - a_s)
    alpha_n, sigma_n = jnp.sqrt(a_n), jnp.sqrt(1 - a_n)
    # exp(-h) as a ratio of sigma/alpha, finite (zero) at the final step where h is infinite.
    exp_neg_h = (sigma_n * alpha_s) / (alpha_n * sigma_s)
    x_next = (sigma_n / sigma_s) * x_t.astype(jnp.float32) - alpha_n * (exp_neg_h - 1) * x0

    second = (state.prev_t >= 0) & ~final
    lam_s = _log_snr(a_s)
    h = jnp.where(second, _log_snr(a_n) - lam_s, 1.0)
    a_p = _alpha_bar(schedule, jnp.maximum(state.prev_t, 0), ndim)
    h_0 = jnp.where(second, lam_s - _log_snr(a_p), 1.0)
    # D1 = (h / h_0)(x0 - prev_x0) enters with weight -alpha_n (exp(-h) - 1) / 2.
    coef = jnp.where(second, -0.5 * alpha_n * (exp_neg_h - 1) * h / h_0, 0.0)
    x_next = x_next + coef * (x0 - state.prev_x0)
    new_state = DPMSolverState(x0, jnp.asarray(t, jnp.int32))
    return x_next.astype(x_t.dtype), new_state


def dpm_solver_pp_sample(
    denoise_fn: DenoiseFn, schedule: Schedule, x_T: jax.Array, num_steps: int
) -> jax.Array:
    """Run DPM-Solver++(2M) from x_T to x_0 in `num_steps` model calls, as one `lax.scan`.

    `denoise_fn(x_t, t)` returns the model output (with CFG if any) for a scalar int32 t.
    """
    ts = timesteps(schedule, num_steps, "dpm_solver")
    ts_next = np.append(ts[1:], -1)

    def body(carry: tuple[jax.Array, DPMSolverState], step: tuple[jax.Array, jax.Array]):
        x, state = carry
        t, t_next = step
        x, state = dpm_solver_pp_step(schedule, denoise_fn(x, t), x, t, t_next, state)
        return (x, state), None

    steps = (jnp.asarray(ts, jnp.int32), jnp.asarray(ts_next, jnp.int32))
    (x, _), _ = jax.lax.scan(body, (x_T, dpm_solver_pp_init(x_T)), steps)
    return x


# config.sample.sampler -> the sampler: f(denoise_fn, schedule, x_T, num_steps) -> x_0.
SAMPLERS: dict[str, Callable[[DenoiseFn, Schedule, jax.Array, int], jax.Array]] = {
    "dpm++": dpm_solver_pp_sample,
    "ddim": ddim_sample,
}
