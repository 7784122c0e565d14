"""A small Flax test double of an I2V backbone (tests only; never registered in the library).

It has the structure the attack relies on: a convolutional VAE encoder with taps, an image latent
concatenated on channels with a noisy video latent, a stack of denoiser blocks that sow their output,
a text embedding and an eps-prediction diffusion loss over a linear DDPM schedule.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.backbones.base import (
    LayerDefaults,
    Noisy,
    resize_center_crop,
    to_signed,
)

FRAMES = 3
LATENT_CHANNELS = 4
TEXT_DIM = 8
NUM_TIMESTEPS = 1000


class TinyEncoder(nn.Module):
    taps: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x):  # (1, H, W, 3) -> (1, H/4, W/4, 4)
        h = nn.Conv(8, (3, 3), strides=2, name="conv1")(x)
        if "conv_in" in self.taps:
            self.sow("intermediates", "conv_in", h)
        h = nn.Conv(8, (3, 3), strides=2, name="conv2")(nn.silu(h))
        if "down_0" in self.taps:
            self.sow("intermediates", "down_0", h)
        return nn.Conv(LATENT_CHANNELS, (1, 1), name="conv_out")(nn.silu(h))


class TinyDenoiser(nn.Module):
    num_layers: int = 4
    width: int = 16
    taps: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, z_t, image_cond, t, text):  # (F, h, w, C) x2, (), (TEXT_DIM,)
        h = nn.Dense(self.width, name="proj_in")(jnp.concatenate([z_t, image_cond], -1))
        freqs = jnp.exp(-jnp.arange(self.width // 2) * (np.log(1000.0) / (self.width // 2)))
        t_emb = jnp.concatenate([jnp.cos(t * freqs), jnp.sin(t * freqs)])
        emb = nn.Dense(self.width, name="time")(t_emb) + nn.Dense(self.width, name="text")(text)
        for i in range(self.num_layers):
            u = nn.LayerNorm(name=f"norm_{i}")(h) + emb
            u = nn.Conv(self.width, (1, 3, 3), padding="SAME", name=f"conv_{i}")(nn.silu(u)[None])[0]
            h = h + u
            if i in self.taps:
                self.sow("intermediates", f"block_{i}", h)
        return nn.Dense(LATENT_CHANNELS, name="proj_out")(h)


def _taps(state, prefix: str = "") -> dict:
    inter = state.get("intermediates", {})
    return {k[len(prefix) :] if prefix else k: v[0] for k, v in inter.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class TinyBackbone:
    """The test double: 32x32 model input, 4 denoiser blocks, 3 latent frames."""

    params: Any
    name: str = "test-double"
    model_size: tuple[int, int] = (32, 32)
    min_input_side: int = 16
    layers: LayerDefaults = LayerDefaults(
        num_layers=4, irc_early=1, irc_deep=(2, 3), ira_layers=(0, 1, 2, 3),
        vae_layers=("conv_in", "down_0", "latent"),
    )
    nan_loss: bool = False  # diffusion loss is NaN (for error-path tests)
    nan_grad: bool = False  # diffusion loss finite but its gradient is not
    lpips: Any = None  # LPIPS-VGG, as the adapters carry it (with_lpips)

    def with_lpips(self, model) -> TinyBackbone:
        return dataclasses.replace(self, lpips=model)

    @property
    def attack_params(self):
        return {**self.params, **({} if self.lpips is None else {"lpips": self.lpips.params})}

    def perceptual_features(self, params, y):
        return self.lpips.features(params["lpips"], y)

    def perceptual_distance(self, params, x, y_features):
        return self.lpips.distance_to(params["lpips"], x, y_features)

    @classmethod
    def create(cls, seed: int = 0, **kw) -> TinyBackbone:
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        h, w = 32 // 4, 32 // 4
        vae = TinyEncoder().init(k1, jnp.zeros((1, 32, 32, 3)))["params"]
        den = TinyDenoiser().init(
            k2, jnp.zeros((FRAMES, h, w, 4)), jnp.zeros((FRAMES, h, w, 4)), 0.0, jnp.zeros(TEXT_DIM)
        )["params"]
        return cls(params={"vae": vae, "denoiser": den}, **kw)

    def encode_text(self, params, prompt: str):
        rng = np.random.default_rng(zlib.crc32(prompt.encode()))
        return jnp.asarray(rng.standard_normal(TEXT_DIM), jnp.float32)

    def condition(self, params, x, key, *, vae_layers: Sequence[str] = ()):
        x = to_signed(resize_center_crop(x, self.model_size))
        latent, state = TinyEncoder(taps=tuple(vae_layers)).apply(
            {"params": params["vae"]}, x[None], mutable=["intermediates"]
        )
        if key is not None:  # a stand-in for posterior sampling
            latent = latent + 0.01 * jax.random.normal(key, latent.shape)
        taps = _taps(state)
        if "latent" in vae_layers:
            taps["latent"] = latent
        # The image latent is frame 0 of an otherwise zero video: (F, h, w, C).
        cond = jnp.concatenate([latent, jnp.zeros((FRAMES - 1, *latent.shape[1:]))], 0)
        return cond, taps

    def add_noise(self, params, cond, key, *, t=None):
        k_t, k_eps = jax.random.split(key)
        x0 = jnp.repeat(cond[:1], FRAMES, axis=0)
        t = jax.random.randint(k_t, (), 0, NUM_TIMESTEPS) if t is None else jnp.asarray(t, jnp.int32)
        alpha_bar = jnp.cumprod(1.0 - jnp.linspace(1e-4, 0.02, NUM_TIMESTEPS))[t]
        eps = jax.random.normal(k_eps, x0.shape)
        z_t = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * eps
        return Noisy(x0=x0, z_t=z_t, t=t, target=eps)

    def denoise(self, params, noisy, cond, text, *, taps: Sequence[int] = ()):
        pred, state = TinyDenoiser(taps=tuple(taps)).apply(
            {"params": params["denoiser"]}, noisy.z_t, cond, noisy.t.astype(jnp.float32), text,
            mutable=["intermediates"],
        )
        return pred, {int(k.split("_")[1]): v for k, v in _taps(state).items()}

    def eps_residual(self, prediction, noisy):
        return prediction - noisy.target  # eps-prediction

    def diffusion_loss(self, prediction, noisy):
        loss = jnp.mean(jnp.square(prediction - noisy.target))
        if self.nan_loss:
            loss = loss * jnp.nan
        if self.nan_grad:
            loss = loss + jnp.sqrt(jnp.sum(jnp.square(prediction - prediction)))  # value 0, gradient NaN
        return loss
