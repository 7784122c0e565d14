"""DynamiCrafter's ``Resampler`` (``lvdm/modules/encoders/resampler.py``): a Perceiver in the IP-Adapter style.

Learned latents (``num_queries * video_length`` of them, frame-major) attend to ``proj_in(clip_tokens)``
concatenated with themselves; each layer is PerceiverAttention then a bias-free LN-Linear-GELU-Linear FF,
both residual; then ``proj_out`` and ``norm_out``. Attention scales q and k each by ``dim_head**-0.25``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from anti_i2v_jax.nn.attention import attention


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResamplerConfig:
    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4
    video_length: int | None = 16


def _ln(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


class PerceiverAttention(nn.Module):
    config: ResamplerConfig

    @nn.compact
    def __call__(self, x, latents):
        cfg = self.config
        inner = cfg.dim_head * cfg.heads
        x, latents = _ln("norm1")(x), _ln("norm2")(latents)
        b, n, _ = latents.shape
        q = nn.Dense(inner, use_bias=False, name="to_q")(latents)
        k, v = jnp.split(nn.Dense(2 * inner, use_bias=False, name="to_kv")(jnp.concatenate([x, latents], 1)), 2, -1)
        heads = lambda t: t.reshape(b, t.shape[1], cfg.heads, cfg.dim_head)  # noqa: E731  (B, L, H, d)
        s = cfg.dim_head**-0.25  # upstream scales q and k by d^-1/4 each
        out = attention(heads(q) * s, heads(k) * s, heads(v), scale=1.0).reshape(b, n, inner)
        return nn.Dense(cfg.dim, use_bias=False, name="to_out")(out)


class _FeedForward(nn.Module):
    """LayerNorm, bias-free Linear, exact GELU, bias-free Linear (upstream ``nn.Sequential`` items 0, 1, 3)."""

    config: ResamplerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = nn.Dense(cfg.dim * cfg.ff_mult, use_bias=False, name="fc1")(_ln("norm")(x))
        return nn.Dense(cfg.dim, use_bias=False, name="fc2")(nn.gelu(h, approximate=False))


class _Layer(nn.Module):
    """One upstream ``layers.i`` pair: ``attn`` (index 0) and ``ff`` (index 1)."""

    config: ResamplerConfig

    @nn.compact
    def __call__(self, x, latents):
        latents = PerceiverAttention(self.config, name="attn")(x, latents) + latents
        return _FeedForward(self.config, name="ff")(latents) + latents


class Resampler(nn.Module):
    config: ResamplerConfig

    @nn.compact
    def __call__(self, x):  # (B, N, embedding_dim) -> (B, num_queries * video_length, output_dim)
        cfg = self.config
        n = cfg.num_queries * (cfg.video_length or 1)
        latents = self.param("latents", nn.initializers.normal(cfg.dim**-0.5), (1, n, cfg.dim))
        latents = jnp.broadcast_to(latents, (x.shape[0], n, cfg.dim))
        x = nn.Dense(cfg.dim, name="proj_in")(x)
        for i in range(cfg.depth):
            latents = _Layer(cfg, name=f"layers_{i}")(x, latents)
        return _ln("norm_out")(nn.Dense(cfg.output_dim, name="proj_out")(latents))
