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


def _at(tables, name: str, t, x: jax.Array) -> jax.Array:
    """``tables[name][t]`` shaped to broadcast against ``x``: one timestep (a scalar) for the whole array, or one
    per sample (``t`` of shape (B,)) along ``x``'s leading batch axis, as upstream's ``extract_into_tensor``."""
    v = jnp.asarray(tables[name])[t]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def rescale_x0(tables, x0: jax.Array, t: jax.Array) -> jax.Array:
    """Dynamic rescale of the clean latents (identity when disabled)."""
    return x0 * _at(tables, "scale_arr", t, x0)


def q_sample(tables, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    return _at(tables, "sqrt_alphas_cumprod", t, x0) * x0 + _at(tables, "sqrt_one_minus_alphas_cumprod", t, x0) * noise


def target(cfg: DiffusionConfig, tables, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The training target: ``noise`` (eps) or ``v = sqrt(a) noise - sqrt(1 - a) x0``."""
    if cfg.parameterization == "eps":
        return noise
    return _at(tables, "sqrt_alphas_cumprod", t, x0) * noise - _at(tables, "sqrt_one_minus_alphas_cumprod", t, x0) * x0


def ddim_timesteps(cfg: DiffusionConfig, steps: int, spacing: str = "uniform_trailing") -> np.ndarray:
    """Ascending DDIM timesteps: ``uniform_trailing`` (512/1024: ..., 999) or ``uniform`` (256: 1, 21, ...)."""
    n = cfg.timesteps
    if spacing == "uniform_trailing":
        return np.flip(np.round(np.arange(n, 0, -n / steps))).astype(np.int64) - 1
    if spacing == "uniform":
        return np.asarray(list(range(0, n, n // steps))) + 1
    raise ValueError(f"unknown timestep spacing {spacing!r}")


def rescale_guidance(guided: jax.Array, cond: jax.Array, r: float) -> jax.Array:
    """``rescale_noise_cfg``: match the guided prediction's std (per sample, unbiased) to the conditional one."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True, ddof=1) / jnp.std(guided, axis=axes, keepdims=True, ddof=1))
    return r * rescaled + (1.0 - r) * guided


def ddim_sample(model_fn, x_T, cfg: DiffusionConfig, tables, *, steps: int, guidance_scale: float,
                guidance_rescale: float = 0.0, spacing: str = "uniform_trailing", stop_after: int | None = None):
    """Deterministic DDIM (eta 0) with classifier-free guidance, as ``DDIMSampler.sample`` for DynamiCrafter.

    ``model_fn(x, t, conditional: bool)`` returns the model output (v or eps) for latents ``x``.
    """
    ts = ddim_timesteps(cfg, steps, spacing)
    ac, sa, sb, scale = (np.asarray(tables[k]) for k in ("alphas_cumprod", "sqrt_alphas_cumprod",
                                                         "sqrt_one_minus_alphas_cumprod", "scale_arr"))
    x = x_T
    order = list(range(len(ts)))[::-1]
    for n, i in enumerate(order[: stop_after if stop_after is not None else len(order)]):
        t = int(ts[i])
        prev = int(ts[i - 1]) if i > 0 else None
        c, u = model_fn(x, t, True), model_fn(x, t, False)
        out = u + guidance_scale * (c - u)
        if guidance_rescale > 0.0:
            out = rescale_guidance(out, c, guidance_rescale)
        if cfg.parameterization == "v":
            e_t = sa[t] * out + sb[t] * x
            pred_x0 = sa[t] * x - sb[t] * out
        else:
            e_t = out
            pred_x0 = (x - np.sqrt(np.float32(1.0) - ac[t]) * e_t) / np.sqrt(ac[t])
        if cfg.use_dynamic_rescale:
            pred_x0 = pred_x0 * (scale[ts[i - 1] if i > 0 else ts[0]] / scale[t])
        a_prev = ac[prev] if prev is not None else ac[0]
        x = np.sqrt(a_prev) * pred_x0 + np.sqrt(np.float32(1.0) - a_prev) * e_t
    return x
