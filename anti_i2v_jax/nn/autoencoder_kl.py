"""Flax port of diffusers' ``AutoencoderKL`` (the SD / SDXL 2-D KL autoencoder), channels last.

Shared by the backbones that use an SD-family VAE (Open-Sora's spatial VAE, DynamiCrafter's first stage);
each maps its own checkpoint names onto these diffusers-style module names. Images are ``(N, H, W, C)``.
Taps (opt-in): ``conv_in``, ``down_blocks.i``, ``mid_block``, ``conv_out`` of the encoder, and
``quant_conv`` (the posterior moments).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from anti_i2v_jax.configs import parse_config
from anti_i2v_jax.nn.attention import attention
from anti_i2v_jax.nn.conv import Conv


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderKLConfig:
    """diffusers ``AutoencoderKL`` config (the fields that change the maths)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    IGNORED = frozenset(
        {
            "act_fn", "down_block_types", "up_block_types", "sample_size", "scaling_factor", "shift_factor",
            "force_upcast", "latents_mean", "latents_std",
        }
    )

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any], where: str = "vae/config.json") -> AutoencoderKLConfig:
        """Parse a diffusers AutoencoderKL config (act_fn must be silu; block types the standard ones)."""
        from anti_i2v_jax.errors import UserError

        if raw.get("act_fn", "silu") != "silu":
            raise UserError(f"{where}: act_fn {raw['act_fn']!r} is not supported")
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != kind for t in raw.get(key, [])):
                raise UserError(f"{where}: {key} must all be {kind}")
        return parse_config(cls, raw, cls.IGNORED, where)


def _group_norm(groups: int, name: str, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding: Any = "SAME_TORCH") -> Conv:
    pad = ((kernel // 2, kernel // 2),) * 2 if padding == "SAME_TORCH" else padding
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding: GN-SiLU-conv twice, 1x1 shortcut when widths differ."""

    in_channels: int
    out_channels: int
    groups: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, 3, "conv1")(nn.silu(_group_norm(self.groups, "norm1", self.eps)(x)))
        h = _conv(self.out_channels, 3, "conv2")(nn.silu(_group_norm(self.groups, "norm2", self.eps)(h)))
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", padding="VALID")(x)
        return x + h


class AttentionBlock(nn.Module):
    """The single-head spatial self-attention of the VAE mid block (GroupNorm, q/k/v, out, residual)."""

    channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        t = _group_norm(self.groups, "group_norm")(x).reshape(n, h * w, c)  # (N, HW, C)
        q, k, v = (nn.Dense(c, name=name)(t) for name in ("to_q", "to_k", "to_v"))
        # (N, HW, C) -> (N, HW, 1, C): one head
        out = attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0 / math.sqrt(c))[:, :, 0]
        return x + nn.Dense(c, name="to_out_0")(out).reshape(n, h, w, c)


class MidBlock2D(nn.Module):
    channels: int
    groups: int
    add_attention: bool = True

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.channels, self.groups, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.channels, self.groups, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.channels, self.groups, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if j == 0 else self.out_channels, self.out_channels, self.groups,
                              name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # right/bottom only, then a VALID stride-2 conv
            x = _Downsample(self.out_channels, name="downsamplers_0")(x)
        return x


class _Downsample(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return _conv(self.features, 3, "conv", stride=2, padding="VALID")(x)


class _Upsample(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        return _conv(self.features, 3, "conv")(x)


class UpDecoderBlock2D(nn.Module):
    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if j == 0 else self.out_channels, self.out_channels, self.groups,
                              name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = _Upsample(self.out_channels, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: AutoencoderKLConfig
    taps: tuple[str, ...] = ()

    def _sow(self, name, value):
        if name in self.taps:
            self.sow("intermediates", f"tap:{name}", value)

    @nn.compact
    def __call__(self, x):  # (N, H, W, 3) -> (N, H/f, W/f, 2 * latent)
        cfg = self.config
        widths = cfg.block_out_channels
        h = _conv(widths[0], 3, "conv_in")(x)
        self._sow("conv_in", h)
        for i, width in enumerate(widths):
            h = DownEncoderBlock2D(widths[max(i - 1, 0)], width, cfg.layers_per_block, cfg.norm_num_groups,
                                   add_downsample=i < len(widths) - 1, name=f"down_blocks_{i}")(h)
            self._sow(f"down_blocks.{i}", h)
        h = MidBlock2D(widths[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block")(h)
        self._sow("mid_block", h)
        h = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(h))
        h = _conv(2 * cfg.latent_channels, 3, "conv_out")(h)
        self._sow("conv_out", h)
        return h


class Decoder(nn.Module):
    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z):  # (N, h, w, latent) -> (N, H, W, 3)
        cfg = self.config
        widths = tuple(reversed(cfg.block_out_channels))
        h = _conv(widths[0], 3, "conv_in")(z)
        h = MidBlock2D(widths[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block")(h)
        for i, width in enumerate(widths):
            h = UpDecoderBlock2D(widths[max(i - 1, 0)], width, cfg.layers_per_block + 1, cfg.norm_num_groups,
                                 add_upsample=i < len(widths) - 1, name=f"up_blocks_{i}")(h)
        h = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(h))
        return _conv(cfg.out_channels, 3, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """``encode`` -> posterior (mean, logvar) with logvar clamped to [-30, 20]; ``decode`` -> image."""

    config: AutoencoderKLConfig
    taps: tuple[str, ...] = ()

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, taps=self.taps)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, (1, 1), name="quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, (1, 1), name="post_quant_conv")

    def encode(self, x):
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        if "quant_conv" in self.taps:
            self.sow("intermediates", "tap:quant_conv", h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])
