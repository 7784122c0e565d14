"""Open-Sora 1.2's rectified flow (``RFlowScheduler`` / ``RFLOW``) as pure functions.

t is continuous in [0, 1000] (1000 = pure noise): ``x_t = (1 - t/1000) x0 + (t/1000) eps``; the model
predicts the velocity ``x0 - eps``; the loss is a mean over the generated frames only (``x_mask``).
Training t is logit-normal, then moved toward noise for larger videos by the resolution/frame transform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``RFlowScheduler.add_noise`` for one sample (scalar t), with upstream's order of float32 operations."""
    keep = 1.0 - jnp.asarray(t, jnp.float32) / NUM_TIMESTEPS
    return keep * x0 + (1.0 - keep) * noise


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The rectified-flow target ``x0 - eps``."""
    return x0 - noise


def masked_loss(prediction: jax.Array, target: jax.Array, x_mask: jax.Array) -> jax.Array:
    """``mean_flat(..., mask)`` for one sample ``(T, H, W, C)``: the mean over the frames where ``x_mask`` is True."""
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_frame = err.reshape(err.shape[0], -1).sum(axis=1)  # (T,)
    m = jnp.asarray(x_mask, jnp.float32)
    return jnp.sum(per_frame * m) / (jnp.sum(m) * err[0].size)


def timestep_transform(t, height, width, num_frames, *, scale: float = 1.0):
    """Resolution/length transform (float32, as upstream): ratio = sqrt(HW / 512^2) * sqrt(F'), F' = 1 for an
    image else ``num_frames // 17 * 5``; t' = ratio t / (1 + (ratio - 1) t) on t / 1000."""
    xp = jnp if isinstance(t, jax.Array) else np
    f32 = lambda v: xp.asarray(v, xp.float32)  # noqa: E731
    t = f32(t) / NUM_TIMESTEPS
    ratio_space = xp.sqrt(f32(height) * f32(width) / f32(512 * 512))
    frames = f32(1.0) if int(num_frames) == 1 else f32(int(num_frames) // 17 * 5)
    ratio = ratio_space * xp.sqrt(frames) * f32(scale)
    return ratio * t / (1 + (ratio - 1) * t) * NUM_TIMESTEPS


def sample_training_t(key: jax.Array, height: int, width: int, num_frames: int) -> jax.Array:
    """Logit-normal t (sigmoid of N(0, 1), times 1000) with the timestep transform (v1.2 train configs)."""
    t = jax.nn.sigmoid(jax.random.normal(key, ())) * NUM_TIMESTEPS
    return timestep_transform(t, height, width, num_frames)


def sampling_timesteps(num_steps: int, height: int, width: int, num_frames: int) -> np.ndarray:
    """``RFLOW.sample``'s timesteps: (1 - i/n) * 1000, each transformed, float32 ``(num_steps,)``."""
    base = [np.float32((1.0 - i / num_steps) * NUM_TIMESTEPS) for i in range(num_steps)]
    return np.asarray([timestep_transform(np.float32(t), height, width, num_frames) for t in base], np.float32)
