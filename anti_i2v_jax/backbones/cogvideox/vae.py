"""Flax port of diffusers' ``AutoencoderKLCogVideoX`` (encoder and decoder), channels last.

Layout inside: ``(B, T, H, W, C)``. Causal 3-D convolutions pad time by repeating frame 0 on the first
chunk and by the previous chunk's last ``k - 1`` (padded) frames afterwards (the conv cache); space is
zero-padded. GroupNorm statistics are taken over (T, H, W, C/G) of the current chunk, which is why the
frame batching of diffusers (8 pixel frames per encoder chunk, 2 latent frames per decoder chunk, the
first chunk taking the remainder) is reproduced exactly.

Every module returns ``(output, cache)``; caches are plain dicts keyed like the upstream ones.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.backbones.cogvideox.config import VAEConfig
from anti_i2v_jax.nn.conv import Conv, conv_general_dilated

Cache = dict[str, Any] | None


def _group_norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
    # Two-pass variance as torch; statistics over every non-batch axis (T included).
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


def _conv2d(x, w):
    """VALID 2-D convolution of (N, H, W, C) by (kh, kw, C, O)."""
    return conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv3dAs2d(nn.Module):
    """A VALID 3-D convolution computed as a sum over the temporal taps of 2-D convolutions.

    Parameters are those of ``nn.Conv`` with a (kT, kH, kW) kernel (``kernel`` THWIO, ``bias``), so the
    checkpoint layout is unchanged. The sum is exactly the 3-D convolution; XLA runs 2-D convolutions
    several times faster than 3-D ones on CPU. ``repeated_front`` says how many leading frames of the
    input are copies of the next one (the causal padding of a first chunk): for a single frame the
    temporal taps then collapse into one 2-D convolution with the kernel summed over time.

    With ``summed`` the kernel is stored with its temporal taps already summed, ``(1, kH, kW, I, O)``
    (:func:`image_encoder_params`): it serves single-frame, first-chunk inputs only.
    """

    features: int
    kernel_size: tuple[int, int, int]
    summed: bool = False

    @nn.compact
    def __call__(self, x, repeated_front: int = 0):  # (B, T, H, W, C), already padded
        kt, kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1 if self.summed else kt, kh, kw, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        # Promote like nn.Conv does (e.g. bfloat16 weights with float32 activations compute in float32).
        dtype = jnp.result_type(x, kernel)
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        b, t = x.shape[:2]
        t_out = t - kt + 1
        if self.summed and kt > 1:
            if t_out != 1 or repeated_front != kt - 1:
                raise ValueError("image-only VAE parameters (temporal taps summed) can only encode single images")
            return _conv2d(x[:, -1], kernel[0])[:, None] + bias
        if t_out == 1 and repeated_front == kt - 1:
            # an explicit sum: XLA on CPU reduces a leading axis of a large kernel ~10x slower
            y = _conv2d(x[:, -1], sum(kernel[k] for k in range(kt)))[:, None]
        else:
            # (B, T_out, H, W, C) per temporal tap -> (B*T_out, H, W, C)
            y = sum(
                _conv2d(x[:, k : k + t_out].reshape(b * t_out, *x.shape[2:]), kernel[k]) for k in range(kt)
            )
            y = y.reshape(b, t_out, *y.shape[1:])
        return y + bias


class CausalConv3d(nn.Module):
    """``CogVideoXCausalConv3d`` with ``pad_mode="first"``: (output, new cache)."""

    features: int
    kernel: int = 3
    image_only: bool = False

    @nn.compact
    def __call__(self, x, cache=None):  # (B, T, H, W, C)
        k = self.kernel
        repeated = 0
        if k > 1:
            if cache is None:
                front, repeated = jnp.repeat(x[:, :1], k - 1, axis=1), k - 1
            else:
                front = cache
            x = jnp.concatenate([front, x], axis=1)
            new_cache = x[:, -(k - 1) :]
        else:
            new_cache = None
        p = (k - 1) // 2
        x = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
        return Conv3dAs2d(self.features, (k, k, k), self.image_only, name="conv")(x, repeated), new_cache


class SpatialNorm3D(nn.Module):
    """``CogVideoXSpatialNorm3D``: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f."""

    features: int
    groups: int

    @nn.compact
    def __call__(self, f, zq, cache=None):
        cache = cache or {}
        t = f.shape[1]
        if t > 1 and t % 2 == 1:
            # frame 0 and the rest are resized separately, as upstream
            zq = jnp.concatenate(
                [_nearest(zq[:, :1], (1, *f.shape[2:4])), _nearest(zq[:, 1:], (t - 1, *f.shape[2:4]))], axis=1
            )
        else:
            zq = _nearest(zq, f.shape[1:4])
        y, cy = CausalConv3d(self.features, 1, name="conv_y")(zq, cache.get("conv_y"))
        b, cb = CausalConv3d(self.features, 1, name="conv_b")(zq, cache.get("conv_b"))
        norm = _group_norm(self.groups, 1e-6, "norm_layer")(f)
        return norm * y + b, {"conv_y": cy, "conv_b": cb}


def _nearest(x, size):
    """torch ``F.interpolate(mode="nearest", size=...)`` over (T, H, W) of (B, T, H, W, C)."""
    for axis, out in zip((1, 2, 3), size):
        n = x.shape[axis]
        if n != out:
            idx = np.minimum(np.floor(np.arange(out) * (n / out)).astype(np.int64), n - 1)
            x = jnp.take(x, idx, axis=axis)
    return x


class ResnetBlock3D(nn.Module):
    """``CogVideoXResnetBlock3D`` (encoder: GroupNorm; decoder: SpatialNorm3D on the latent ``zq``)."""

    in_channels: int
    out_channels: int
    groups: int
    eps: float
    spatial_norm: bool = False
    image_only: bool = False

    @nn.compact
    def __call__(self, x, zq=None, cache=None):
        cache = cache or {}
        new = {}
        h = x
        if self.spatial_norm:
            h, new["norm1"] = SpatialNorm3D(self.in_channels, self.groups, name="norm1")(h, zq, cache.get("norm1"))
        else:
            h = _group_norm(self.groups, self.eps, "norm1")(h)
        h, new["conv1"] = CausalConv3d(self.out_channels, image_only=self.image_only, name="conv1")(
            nn.silu(h), cache.get("conv1")
        )
        if self.spatial_norm:
            h, new["norm2"] = SpatialNorm3D(self.out_channels, self.groups, name="norm2")(h, zq, cache.get("norm2"))
        else:
            h = _group_norm(self.groups, self.eps, "norm2")(h)
        h, new["conv2"] = CausalConv3d(self.out_channels, image_only=self.image_only, name="conv2")(
            nn.silu(h), cache.get("conv2")
        )
        if self.in_channels != self.out_channels:
            x = Conv3dAs2d(self.out_channels, (1, 1, 1), name="conv_shortcut")(x)
        return h + x, new


class Downsample3D(nn.Module):
    """``CogVideoXDownsample3D``: optional temporal average pooling, then a stride-2 3x3 conv per frame."""

    features: int
    compress_time: bool

    @nn.compact
    def __call__(self, x):  # (B, T, H, W, C)
        if self.compress_time:
            t = x.shape[1]
            if t % 2 == 1:
                rest = x[:, 1:]
                # (B, T-1, ...) -> (B, (T-1)/2, 2, ...) -> mean over pairs
                rest = rest.reshape(rest.shape[0], -1, 2, *rest.shape[2:]).mean(axis=2)
                x = jnp.concatenate([x[:, :1], rest], axis=1)
            else:
                x = x.reshape(x.shape[0], -1, 2, *x.shape[2:]).mean(axis=2)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
        b, t = x.shape[:2]
        # (B, T, H, W, C) -> (B*T, H, W, C): a 2-D conv per frame
        y = Conv(self.features, (3, 3), strides=(2, 2), padding="VALID", name="conv")(x.reshape(b * t, *x.shape[2:]))
        return y.reshape(b, t, *y.shape[1:])


class Upsample3D(nn.Module):
    """``CogVideoXUpsample3D``: nearest x2 (in time too with ``compress_time``, frame 0 kept single), 3x3 conv."""

    features: int
    compress_time: bool

    @nn.compact
    def __call__(self, x):  # (B, T, H, W, C)
        up2 = lambda v, axes: _repeat2(v, axes)  # noqa: E731
        t = x.shape[1]
        if self.compress_time and t > 1 and t % 2 == 1:
            x = jnp.concatenate([up2(x[:, :1], (2, 3)), up2(x[:, 1:], (1, 2, 3))], axis=1)
        elif self.compress_time and t > 1:
            x = up2(x, (1, 2, 3))
        else:
            x = up2(x, (2, 3))
        b, t = x.shape[:2]
        y = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x.reshape(b * t, *x.shape[2:]))
        return y.reshape(b, t, *y.shape[1:])


def _repeat2(x, axes):
    for a in axes:
        x = jnp.repeat(x, 2, axis=a)
    return x


class DownBlock3D(nn.Module):
    """``CogVideoXDownBlock3D``: resnets, then an optional downsampler."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    eps: float
    add_downsample: bool
    compress_time: bool
    image_only: bool = False

    @nn.compact
    def __call__(self, h, cache=None):
        cache, new = cache or {}, {}
        for j in range(self.num_layers):
            c_in = self.in_channels if j == 0 else self.out_channels
            h, new[f"resnet_{j}"] = ResnetBlock3D(
                c_in, self.out_channels, self.groups, self.eps, image_only=self.image_only, name=f"resnets_{j}"
            )(h, cache=cache.get(f"resnet_{j}"))
        if self.add_downsample:
            h = Downsample3D(self.out_channels, self.compress_time, name="downsamplers_0")(h)
        return h, new


class MidBlock3D(nn.Module):
    """``CogVideoXMidBlock3D``: two resnets (with SpatialNorm3D in the decoder)."""

    channels: int
    groups: int
    eps: float
    spatial_norm: bool = False
    image_only: bool = False

    @nn.compact
    def __call__(self, h, zq=None, cache=None):
        cache, new = cache or {}, {}
        for j in range(2):
            h, new[f"resnet_{j}"] = ResnetBlock3D(
                self.channels, self.channels, self.groups, self.eps, self.spatial_norm, self.image_only,
                name=f"resnets_{j}",
            )(h, zq, cache.get(f"resnet_{j}"))
        return h, new


class UpBlock3D(nn.Module):
    """``CogVideoXUpBlock3D``: resnets with SpatialNorm3D, then an optional upsampler."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    eps: float
    add_upsample: bool
    compress_time: bool

    @nn.compact
    def __call__(self, h, zq, cache=None):
        cache, new = cache or {}, {}
        for j in range(self.num_layers):
            c_in = self.in_channels if j == 0 else self.out_channels
            h, new[f"resnet_{j}"] = ResnetBlock3D(
                c_in, self.out_channels, self.groups, self.eps, spatial_norm=True, name=f"resnets_{j}"
            )(h, zq, cache.get(f"resnet_{j}"))
        if self.add_upsample:
            h = Upsample3D(self.out_channels, self.compress_time, name="upsamplers_0")(h)
        return h, new


class Encoder3D(nn.Module):
    """``CogVideoXEncoder3D``; taps (opt-in): conv_in, down_blocks.i, mid_block, conv_out."""

    config: VAEConfig
    taps: tuple[str, ...] = ()
    image_only: bool = False  # parameters from image_encoder_params (temporal taps summed)

    def _sow(self, name, value):
        if name in self.taps:
            self.sow("intermediates", f"tap:{name}", value)  # prefixed: sow names share the module namespace

    @nn.compact
    def __call__(self, x, cache=None):  # (B, T, H, W, 3) -> (B, T', H/8, W/8, 2 * latent)
        cfg = self.config
        cache, new = cache or {}, {}
        levels = int(math.log2(cfg.temporal_compression_ratio))
        widths = cfg.block_out_channels
        io = self.image_only
        h, new["conv_in"] = CausalConv3d(widths[0], image_only=io, name="conv_in")(x, cache.get("conv_in"))
        self._sow("conv_in", h)
        for i, width in enumerate(widths):
            h, new[f"down_block_{i}"] = DownBlock3D(
                widths[max(i - 1, 0)], width, cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps,
                add_downsample=i < len(widths) - 1, compress_time=i < levels, image_only=io, name=f"down_blocks_{i}",
            )(h, cache.get(f"down_block_{i}"))
            self._sow(f"down_blocks.{i}", h)
        h, new["mid_block"] = MidBlock3D(
            widths[-1], cfg.norm_num_groups, cfg.norm_eps, image_only=io, name="mid_block"
        )(h, cache=cache.get("mid_block"))
        self._sow("mid_block", h)
        h = nn.silu(_group_norm(cfg.norm_num_groups, 1e-6, "norm_out")(h))
        h, new["conv_out"] = CausalConv3d(2 * cfg.latent_channels, image_only=io, name="conv_out")(
            h, cache.get("conv_out")
        )
        self._sow("conv_out", h)
        return h, new


class Decoder3D(nn.Module):
    """``CogVideoXDecoder3D``: latent ``z`` (B, T, h, w, latent) -> video (B, T', 8h, 8w, 3)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z, cache=None):
        cfg = self.config
        cache, new = cache or {}, {}
        widths = tuple(reversed(cfg.block_out_channels))
        levels = int(math.log2(cfg.temporal_compression_ratio))
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        h, new["conv_in"] = CausalConv3d(widths[0], name="conv_in")(z, cache.get("conv_in"))
        h, new["mid_block"] = MidBlock3D(widths[0], g, eps, spatial_norm=True, name="mid_block")(
            h, z, cache.get("mid_block")
        )
        for i, width in enumerate(widths):
            h, new[f"up_block_{i}"] = UpBlock3D(
                widths[max(i - 1, 0)], width, cfg.layers_per_block + 1, g, eps,
                add_upsample=i < len(widths) - 1, compress_time=i < levels, name=f"up_blocks_{i}",
            )(h, z, cache.get(f"up_block_{i}"))
        h, new["norm_out"] = SpatialNorm3D(widths[-1], g, name="norm_out")(h, z, cache.get("norm_out"))
        h, new["conv_out"] = CausalConv3d(cfg.out_channels, name="conv_out")(nn.silu(h), cache.get("conv_out"))
        return h, new


def _chunks(n: int, per_chunk: int) -> list[tuple[int, int]]:
    """diffusers' frame batching: max(n // k, 1) chunks, the first taking the n % k remainder."""
    rem = n % per_chunk
    count = max(n // per_chunk, 1)
    return [(0 if i == 0 else per_chunk * i + rem, per_chunk * (i + 1) + rem) for i in range(count)]


class AutoencoderKLCogVideoX(nn.Module):
    """The CogVideoX VAE. ``encode`` gives the posterior moments, ``decode`` the video; both chunk like diffusers."""

    config: VAEConfig
    taps: tuple[str, ...] = ()
    image_only: bool = False  # encode single images with image_encoder_params; no decoder

    def setup(self):
        self.encoder = Encoder3D(self.config, taps=self.taps, image_only=self.image_only)
        self.decoder = Decoder3D(self.config)

    def encode(self, x):
        """(B, T, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, T', H/8, W/8, latent); logvar clamped."""
        if self.image_only and x.shape[1] != 1:
            raise ValueError(f"image-only VAE parameters encode single frames, got {x.shape[1]}")
        outs, cache = [], None
        for start, end in _chunks(x.shape[1], self.config.encode_frames_per_chunk):
            h, cache = self.encoder(x[:, start:end], cache)
            outs.append(h)
        moments = jnp.concatenate(outs, axis=1)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """(B, T, h, w, latent) -> (B, T', 8h, 8w, 3); ``z`` raw (the caller divides by the scaling factor)."""
        outs, cache = [], None
        for start, end in _chunks(z.shape[1], self.config.decode_frames_per_chunk):
            h, cache = self.decoder(z[:, start:end], cache)
            outs.append(h)
        return jnp.concatenate(outs, axis=1)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


def image_encoder_params(vae_params: dict) -> dict:
    """The encoder's parameters for single images: every causal 3-D kernel summed over its temporal taps.

    With the first-frame causal padding, all taps of a 1-frame input see the same frame, so the sum is the
    exact kernel of the equivalent 2-D convolution. A third of the encoder's weights, no decoder, and no
    per-step kernel sums: what the image attack holds. Videos need the full parameters.
    """

    def collapse(tree):
        if isinstance(tree, dict):
            out = {k: collapse(v) for k, v in tree.items()}
            kernel = out.get("kernel")
            if kernel is not None and getattr(kernel, "ndim", 0) == 5 and kernel.shape[0] > 1:
                out["kernel"] = sum(kernel[k] for k in range(kernel.shape[0]))[None]
            return out
        return tree

    return {"encoder": collapse(dict(vae_params["encoder"]))}


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array | None) -> jax.Array:
    """The posterior mean (``key`` None) or a sample ``mean + exp(logvar / 2) * eps``."""
    if key is None:
        return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
