"""Flax port of Open-Sora 1.2's VAE: ``VAE_Temporal`` (MAGVIT-v2-style causal 3-D CNN) and the
``VideoAutoencoderPipeline`` that stacks it on the SDXL 2-D KL autoencoder. Channels last ``(B, T, H, W, C)``.

Temporal causal convolutions zero-pad time at the front by ``k - 1 + (1 - stride)`` and space
symmetrically by ``k // 2``; GroupNorm uses torch's default eps 1e-5 and takes statistics over (T, H, W),
so the 17-frame chunking and its front zero padding are reproduced exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anti_i2v_jax.configs import parse_config
from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from anti_i2v_jax.nn.conv import Conv

SPATIAL_SCALE = 0.18215  # hard-coded by Open-Sora (the SDXL config's 0.13025 is ignored)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemporalVAEConfig:
    """``VAE_Temporal`` arguments (``VAE_Temporal_SD`` = the defaults)."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32
    activation_fn: str = "swish"

    @classmethod
    def from_opensora(cls, raw: dict[str, Any], where: str = "vae/config.json[vae_temporal]") -> TemporalVAEConfig:
        from anti_i2v_jax.errors import UserError

        kind = raw.get("type", "VAE_Temporal_SD")
        if kind == "VAE_Temporal_SD":
            raw = {k: v for k, v in raw.items() if k in ("type", "from_pretrained")}
        elif kind != "VAE_Temporal":
            raise UserError(f"{where}: unknown temporal VAE type {kind!r}")
        if raw.get("activation_fn", "swish") != "swish":
            raise UserError(f"{where}: only the swish activation is supported")
        return parse_config(cls, raw, frozenset({"type", "from_pretrained"}), where)

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoVAEConfig:
    """``VideoAutoencoderPipeline``: the spatial VAE, the temporal VAE, chunking and the latent normalisation."""

    spatial: AutoencoderKLConfig = AutoencoderKLConfig()
    temporal: TemporalVAEConfig = TemporalVAEConfig()
    micro_frame_size: int = 17
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    @property
    def micro_z_frame_size(self) -> int:
        t = self.temporal.time_factor
        return (self.micro_frame_size + (t - self.micro_frame_size % t) % t) // t


def _gn(groups: int, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False, name=name)


class CausalConv3d(nn.Module):
    """Open-Sora's ``CausalConv3d``: front zero padding in time, symmetric zero padding in space."""

    features: int
    kernel: int = 3
    stride: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):  # (B, T, H, W, C)
        k = self.kernel
        tp, sp = k - 1 + (1 - self.stride), k // 2
        x = jnp.pad(x, ((0, 0), (tp, 0), (sp, sp), (sp, sp), (0, 0)))
        return Conv(self.features, (k, k, k), strides=(self.stride, 1, 1), padding="VALID",
                    use_bias=self.use_bias, name="conv")(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv(no bias) twice, plus a 1x1x1 no-bias shortcut (``conv3``) when widths differ."""

    in_channels: int
    filters: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = CausalConv3d(self.filters, use_bias=False, name="conv1")(nn.silu(_gn(self.groups, "norm1")(x)))
        h = CausalConv3d(self.filters, use_bias=False, name="conv2")(nn.silu(_gn(self.groups, "norm2")(h)))
        if self.in_channels != self.filters:
            x = CausalConv3d(self.filters, 1, use_bias=False, name="conv3")(x)
        return x + h


class TemporalEncoder(nn.Module):
    config: TemporalVAEConfig
    taps: tuple[str, ...] = ()

    def _sow(self, name, value):
        if name in self.taps:
            self.sow("intermediates", f"tap:{name}", value)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        n = len(cfg.channel_multipliers)
        x = CausalConv3d(cfg.filters, use_bias=False, name="conv_in")(x)
        self._sow("conv_in", x)
        prev = cfg.filters
        for i, mult in enumerate(cfg.channel_multipliers):
            filters = cfg.filters * mult
            for j in range(cfg.num_res_blocks):
                x = ResBlock(prev, filters, cfg.num_groups, name=f"block_res_blocks_{i}_{j}")(x)
                prev = filters
            self._sow(f"block_res_blocks.{i}", x)
            if i < n - 1 and cfg.temporal_downsample[i]:
                x = CausalConv3d(filters, 3, stride=2, name=f"conv_blocks_{i}")(x)
                self._sow(f"conv_blocks.{i}", x)
        for j in range(cfg.num_res_blocks):
            x = ResBlock(prev, prev, cfg.num_groups, name=f"res_blocks_{j}")(x)
        self._sow("res_blocks", x)
        x = CausalConv3d(2 * cfg.latent_embed_dim, 1, name="conv2")(nn.silu(_gn(cfg.num_groups, "norm1")(x)))
        self._sow("conv2", x)
        return x


class TemporalDecoder(nn.Module):
    config: TemporalVAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        top = cfg.filters * cfg.channel_multipliers[-1]
        x = CausalConv3d(top, name="conv1")(z)
        for j in range(cfg.num_res_blocks):
            x = ResBlock(top, top, cfg.num_groups, name=f"res_blocks_{j}")(x)
        prev = top
        for i in reversed(range(len(cfg.channel_multipliers))):
            filters = cfg.filters * cfg.channel_multipliers[i]
            for j in range(cfg.num_res_blocks):
                x = ResBlock(prev, filters, cfg.num_groups, name=f"block_res_blocks_{i}_{j}")(x)
                prev = filters
            if i > 0 and cfg.temporal_downsample[i - 1]:
                x = CausalConv3d(prev * 2, name=f"conv_blocks_{i - 1}")(x)
                # depth to time, "B (C ts) T H W -> B C (T ts) H W": channel c*2 + s goes to frame t*2 + s
                b, t, h, w, c2 = x.shape
                x = x.reshape(b, t, h, w, c2 // 2, 2).transpose(0, 1, 5, 2, 3, 4).reshape(b, t * 2, h, w, c2 // 2)
        x = nn.silu(_gn(cfg.num_groups, "norm1")(x))
        return CausalConv3d(cfg.in_out_channels, name="conv_out")(x)


class TemporalVAE(nn.Module):
    """``VAE_Temporal``: encode pads the front of time to a multiple of the time factor."""

    config: TemporalVAEConfig
    taps: tuple[str, ...] = ()

    def setup(self):
        cfg = self.config
        self.encoder = TemporalEncoder(cfg, taps=self.taps)
        self.decoder = TemporalDecoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.latent_embed_dim, 1)

    def encode(self, x):
        """(B, T, h, w, C) -> (mean, logvar), each (B, ceil(T / 4), h, w, embed)."""
        f = self.config.time_factor
        x = jnp.pad(x, ((0, 0), ((f - x.shape[1] % f) % f, 0), (0, 0), (0, 0), (0, 0)))
        moments = self.quant_conv(self.encoder(x))
        if "quant_conv" in self.taps:
            self.sow("intermediates", "tap:quant_conv", moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z, num_frames: int):
        f = self.config.time_factor
        x = self.decoder(self.post_quant_conv(z))
        return x[:, (f - num_frames % f) % f :]

    def __call__(self, x):
        return self.decode(self.encode(x)[0], x.shape[1])


def _posterior(mean, logvar, key):
    return mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


class VideoAutoencoder(nn.Module):
    """``VideoAutoencoderPipeline``: pixels (B, T, H, W, 3) in [-1, 1] <-> normalised latents (B, T', h, w, 4).

    ``encode(x, key)`` uses the posterior means with ``key=None`` (deterministic) and samples both
    posteriors with a key, as Open-Sora does. Taps are named ``spatial.<tap>`` and ``temporal.<tap>``.
    """

    config: VideoVAEConfig
    taps: tuple[str, ...] = ()

    def setup(self):
        cfg = self.config
        pick = lambda prefix: tuple(t[len(prefix):] for t in self.taps if t.startswith(prefix))  # noqa: E731
        self.spatial_vae = AutoencoderKL(cfg.spatial, taps=pick("spatial."))
        self.temporal_vae = TemporalVAE(cfg.temporal, taps=pick("temporal."))

    def encode(self, x, key=None):
        cfg = self.config
        b, t = x.shape[:2]
        ks, kt = jax.random.split(key) if key is not None else (None, None)
        mean, logvar = self.spatial_vae.encode(x.reshape(b * t, *x.shape[2:]))  # frames independently
        x_z = (_posterior(mean, logvar, ks) * SPATIAL_SCALE).reshape(b, t, *mean.shape[1:])
        chunks = []
        for i, start in enumerate(range(0, t, cfg.micro_frame_size)):
            m, lv = self.temporal_vae.encode(x_z[:, start : start + cfg.micro_frame_size])
            chunks.append(_posterior(m, lv, None if kt is None else jax.random.fold_in(kt, i)))
        z = jnp.concatenate(chunks, axis=1)
        return (z - jnp.asarray(cfg.shift)) / jnp.asarray(cfg.scale)

    def decode(self, z, num_frames: int):
        cfg = self.config
        z = z * jnp.asarray(cfg.scale) + jnp.asarray(cfg.shift)
        parts, remaining = [], num_frames
        for start in range(0, z.shape[1], cfg.micro_z_frame_size):
            parts.append(self.temporal_vae.decode(z[:, start : start + cfg.micro_z_frame_size],
                                                  min(cfg.micro_frame_size, remaining)))
            remaining -= cfg.micro_frame_size
        x_z = jnp.concatenate(parts, axis=1)
        b, t = x_z.shape[:2]
        x = self.spatial_vae.decode(x_z.reshape(b * t, *x_z.shape[2:]) / SPATIAL_SCALE)
        return x.reshape(b, t, *x.shape[1:])

    def __call__(self, x):
        return self.decode(self.encode(x), x.shape[1])
