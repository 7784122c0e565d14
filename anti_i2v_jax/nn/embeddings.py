"""Positional and timestep embeddings shared by the backbones (float64 tables where upstream uses them)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def timestep_embedding(
    t: jax.Array, dim: int, *, flip_sin_to_cos: bool, downscale_freq_shift: float = 1.0, max_period: float = 10000.0
) -> jax.Array:
    """diffusers ``get_timestep_embedding``: ``(B,)`` -> ``(B, dim)`` float32 sinusoids."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE-style 1-D table ``[sin | cos]`` with omega = 1 / 10000^(2i/dim), in float64: ``(len(pos), dim)``."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def apply_interleaved_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (2i, 2i+1) of the last axis: ``x * cos + rot(x) * sin``, in float32.

    ``cos``/``sin`` broadcast against ``x`` (e.g. ``(N, 1, D)`` for ``x`` of ``(B, N, heads, D)``).
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    # rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i]
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos + rot * sin).astype(x.dtype)
