"""``CogVideoXDDIMScheduler`` as pure functions: the schedule in float64, noising, velocity, DDIM steps.

Scaled-linear betas (float64) -> alphas_cumprod -> SNR shift ``a / (s + (1 - s) a)`` -> zero-terminal-SNR
rescale. ``add_noise``/``get_velocity`` use the table cast to float32 first, as diffusers does; DDIM
coefficients are computed on the host in float64 and applied to float32 latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.backbones.cogvideox.config import SchedulerConfig


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """The cumulative alpha table, ``(num_train_timesteps,)`` float64."""
    betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    s = cfg.snr_shift_scale
    ac = ac / (s + (1.0 - s) * ac)
    if cfg.rescale_betas_zero_snr:
        root = np.sqrt(ac)
        first, last = root[0], root[-1]
        root = (root - last) * (first / (first - last))
        ac = root**2
    return ac


def _coefs(ac: np.ndarray, t: jax.Array):
    a = jnp.asarray(ac, jnp.float32)[t]
    return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def add_noise(ac: np.ndarray, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (scalar ``t``)."""
    sa, sb = _coefs(ac, t)
    return sa * x0 + sb * noise


def get_velocity(ac: np.ndarray, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target ``sqrt(a_t) noise - sqrt(1 - a_t) x0``."""
    sa, sb = _coefs(ac, t)
    return sa * noise - sb * x0


def timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """``set_timesteps``: the inference timesteps, int64, in sampling order."""
    n, total = num_inference_steps, cfg.num_train_timesteps
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    if cfg.timestep_spacing == "leading":
        return (np.arange(n) * (total // n)).round()[::-1].astype(np.int64) + cfg.steps_offset
    return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)


def ddim_coefficients(ac: np.ndarray, cfg: SchedulerConfig, t: int, num_inference_steps: int):
    """(sqrt a_t, sqrt(1 - a_t), a, b) in float64 for ``x_prev = a x + b x0_hat`` at timestep ``t``.

    As diffusers: the previous timestep is ``t - T // n`` (not the next list entry), and
    ``alpha_prev = 1`` past the start when ``set_alpha_to_one``.
    """
    prev = t - cfg.num_train_timesteps // num_inference_steps
    alpha = ac[t]
    alpha_prev = ac[prev] if prev >= 0 else (1.0 if cfg.set_alpha_to_one else ac[0])
    a = np.sqrt((1.0 - alpha_prev) / (1.0 - alpha))
    b = np.sqrt(alpha_prev) - np.sqrt(alpha) * a
    return np.sqrt(alpha), np.sqrt(1.0 - alpha), a, b


def ddim_step(v: jax.Array, x: jax.Array, coefs) -> jax.Array:
    """One deterministic DDIM step from the v-prediction ``v`` (eta is ignored, as upstream)."""
    sa, sb, a, b = (jnp.float32(c) for c in coefs)
    x0_hat = sa * x - sb * v
    return a * x + b * x0_hat
