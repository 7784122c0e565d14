"""Image-to-video sampling with classifier-free guidance, as ``CogVideoXImageToVideoPipeline.__call__``.

Each step: the transformer sees ``cat([latents, image_latents])`` for the unconditional (negative
prompt) and conditional branches in one batch, ``v = u + s (c - u)`` (optionally the dynamic-CFG
schedule), then a DDIM step. The decoder turns the final latents (divided by the scaling factor) into
frames.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.backbones.cogvideox import scheduler


def denoise_latents(
    backbone,
    params,
    image_latents: jax.Array,
    text: jax.Array,
    negative_text: jax.Array,
    noise: jax.Array,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 6.0,
    use_dynamic_cfg: bool = False,
    stop_after: int | None = None,
) -> jax.Array:
    """Run the sampler from ``noise`` (F, h, w, C); returns the latents after all (or ``stop_after``) steps."""
    cfg = backbone.config.scheduler
    ac = scheduler.alphas_cumprod(cfg)
    steps = scheduler.timesteps(cfg, num_inference_steps)

    @jax.jit
    def step(latents, t, coefs, scale):
        z = jnp.stack([latents, latents])  # batch order [uncond, cond]
        img = jnp.stack([image_latents, image_latents])
        v, _ = backbone.transformer_apply(params, z, img, jnp.stack([negative_text, text]), jnp.full((2,), t))
        v = v[0] + scale * (v[1] - v[0])
        return scheduler.ddim_step(v.astype(jnp.float32), latents, coefs)

    latents = noise
    for i, t in enumerate(steps[: stop_after if stop_after is not None else len(steps)]):
        scale = guidance_scale
        if use_dynamic_cfg:
            n = cfg.num_train_timesteps
            scale = 1 + guidance_scale * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)
        latents = step(latents, int(t), scheduler.ddim_coefficients(ac, cfg, int(t), num_inference_steps), scale)
    return latents


def decode_latents(backbone, params, latents: jax.Array) -> np.ndarray:
    """(F, h, w, C) latents -> (T, H, W, 3) uint8 frames (latents divided by the scaling factor first)."""
    from anti_i2v_jax.backbones.cogvideox.vae import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX(backbone.config.vae)
    video = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(
        params["vae"], (latents / backbone.config.vae.scaling_factor)[None]
    )[0]
    return np.asarray(jnp.clip(jnp.rint((video + 1.0) * 127.5), 0, 255)).astype(np.uint8)
