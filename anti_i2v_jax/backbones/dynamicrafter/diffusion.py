"""DynamiCrafter's diffusion (``lvdm/models/ddpm3d.py``) as pure functions.

Linear betas ``linspace(sqrt(b0), sqrt(b1), T)**2`` in float64, optionally rescaled to zero terminal SNR,
stored as float32 tables as the checkpoint's buffers are. eps or v parameterisation; the 512/1024 models
rescale x0 by ``scale_arr[t]`` (``linspace(1, base_scale, 400)`` then ``base_scale``: 1400 entries) before
noising ("dynamic rescale").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    rescale_betas_zero_snr: bool = True
    parameterization: str = "v"  # "eps" for the 256 model
    use_dynamic_rescale: bool = True
    base_scale: float = 0.7
    scale_factor: float = 0.18215


def schedule(cfg: DiffusionConfig) -> dict[str, np.ndarray]:
    """The float32 tables (``alphas_cumprod``, ``sqrt_alphas_cumprod``, ...) and ``scale_arr``."""
    betas = np.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=np.float64) ** 2
    if cfg.rescale_betas_zero_snr:
        root = np.sqrt(np.cumprod(1.0 - betas))
        first, last = root[0], root[-1]
        root = (root - last) * first / (first - last)
        alphas_bar = root**2
        alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
        betas = 1.0 - alphas
    ac = np.cumprod(1.0 - betas)
    tables = {
        "betas": betas,
        "alphas_cumprod": ac,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
    }
    scale = np.concatenate([np.linspace(1.0, cfg.base_scale, 400), np.full(cfg.timesteps, cfg.base_scale)])
    tables["scale_arr"] = scale if cfg.use_dynamic_rescale else np.ones_like(scale)
    return {k: v.astype(np.float32) for k, v in tables.items()}


def rescale_x0(tables, x0: jax.Array, t: jax.Array) -> jax.Array:
    """Dynamic rescale of the clean latents (identity when disabled)."""
    return x0 * jnp.asarray(tables["scale_arr"])[t]


def q_sample(tables, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    return jnp.asarray(tables["sqrt_alphas_cumprod"])[t] * x0 + jnp.asarray(tables["sqrt_one_minus_alphas_cumprod"])[t] * noise


def target(cfg: DiffusionConfig, tables, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The training target: ``noise`` (eps) or ``v = sqrt(a) noise - sqrt(1 - a) x0``."""
    if cfg.parameterization == "eps":
        return noise
    return jnp.asarray(tables["sqrt_alphas_cumprod"])[t] * noise - jnp.asarray(tables["sqrt_one_minus_alphas_cumprod"])[t] * x0
