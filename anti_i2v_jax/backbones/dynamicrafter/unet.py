"""Flax port of DynamiCrafter's 3-D U-Net (``lvdm/modules/networks/openaimodel3d.py`` + ``attention.py``).

Frames are folded into the batch, ``(B*T, H, W, C)`` channels last, frames contiguous per sample; the
temporal modules unfold them. Module names mirror the upstream keys after the generic rename
(``input_blocks.1.0.in_layers.0`` -> ``input_blocks_1_0/in_layers_0``). Taps (opt-in): ``time_embed``,
``fps_embedding``, ``input_blocks.i``, ``init_attn``, ``middle_block``, ``output_blocks.i``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from anti_i2v_jax.configs import parse_config
from anti_i2v_jax.nn.attention import attention
from anti_i2v_jax.nn.conv import Conv
from anti_i2v_jax.nn.embeddings import timestep_embedding
from anti_i2v_jax.nn.remat import maybe_remat

TEXT_TOKENS = 77
IMAGE_TOKENS_PER_FRAME = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """``UNetModel`` params of the DynamiCrafter configs (the fields that change the maths)."""

    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear: bool = True
    temporal_conv: bool = True
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    addition_attention: bool = True
    image_cross_attention: bool = True
    image_cross_attention_scale_learnable: bool = False
    default_fs: int = 24
    fs_condition: bool = True
    temporal_length: int = 16
    # Execution switches (not upstream): rematerialise every ResBlock, spatial and temporal transformer.
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps (anti_i2v_jax.nn.remat)

    IGNORED = frozenset({"dropout", "use_checkpoint", "use_relative_position", "use_causal_attention"})

    @classmethod
    def from_ldm(cls, raw: dict[str, Any], where: str = "unet_config.params") -> UNetConfig:
        from anti_i2v_jax.errors import UserError

        for key in ("use_relative_position", "use_causal_attention"):
            if raw.get(key):
                raise UserError(f"{where}: {key} is not supported (no DynamiCrafter checkpoint uses it)")
        for key in ("use_linear", "temporal_selfatt_only"):
            if raw.get(key, True) is False:
                raise UserError(f"{where}: {key}: false is not supported (every DynamiCrafter checkpoint has true)")
        return parse_config(cls, raw, cls.IGNORED, where)


def _gn(name: str, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, epsilon=eps, use_fast_variance=False, name=name)


def _conv(features: int, name: str, stride: int = 1) -> Conv:
    return Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), name=name)


def _frames(x, b):  # (B*T, H, W, C) -> (B, T, H, W, C)
    return x.reshape(b, x.shape[0] // b, *x.shape[1:])


class TemporalConvBlock(nn.Module):
    """Four GN-SiLU-Conv3d(3, 1, 1) stages over time (GroupNorm statistics over every frame), residual."""

    channels: int

    @nn.compact
    def __call__(self, x, b):  # (B*T, H, W, C)
        h = _frames(x, b)
        for i, (gn, conv) in enumerate((("0", "2"), ("0", "3"), ("0", "3"), ("0", "3")), start=1):
            h = nn.silu(_gn(f"conv{i}_{gn}", 1e-5)(h))
            h = jnp.pad(h, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
            h = Conv(self.channels, (3, 1, 1), padding="VALID", name=f"conv{i}_{conv}")(h)
        return x + h.reshape(x.shape)


class ResBlock(nn.Module):
    in_channels: int
    out_channels: int
    temporal_conv: bool
    batch: int  # B of the (B*T, ...) frames, for the temporal convolution

    @nn.compact
    def __call__(self, x, emb):
        b = self.batch
        h = _conv(self.out_channels, "in_layers_2")(nn.silu(_gn("in_layers_0", 1e-5)(x)))
        h = h + nn.Dense(self.out_channels, name="emb_layers_1")(nn.silu(emb))[:, None, None, :]
        h = _conv(self.out_channels, "out_layers_3")(nn.silu(_gn("out_layers_0", 1e-5)(h)))
        if self.in_channels != self.out_channels:
            x = Conv(self.out_channels, (1, 1), name="skip_connection")(x)
        h = x + h
        if self.temporal_conv:
            h = TemporalConvBlock(self.out_channels, name="temopral_conv")(h, b)
        return h


class CrossAttention(nn.Module):
    """q/k/v without bias, ``to_out.0`` with; with ``image_cross_attention`` the context's image tokens get
    their own keys/values and softmax, added with weight 1 (or ``tanh(alpha) + 1`` when learnable)."""

    heads: int
    dim_head: int
    query_dim: int
    image_cross_attention: bool = False
    learnable_scale: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        inner = self.heads * self.dim_head
        dense = lambda name: nn.Dense(inner, use_bias=False, name=name)  # noqa: E731
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)  # noqa: E731
        q = split(dense("to_q")(x))

        def attend(k, v):
            return attention(q, split(k), split(v), scale=self.dim_head**-0.5)

        if context is None:
            out = attend(dense("to_k")(x), dense("to_v")(x))
        else:
            text = context[:, :TEXT_TOKENS]
            out = attend(dense("to_k")(text), dense("to_v")(text))
            if self.image_cross_attention:
                image = context[:, TEXT_TOKENS:]
                out_ip = attend(dense("to_k_ip")(image), dense("to_v_ip")(image))
                scale = 1.0
                if self.learnable_scale:
                    scale = jnp.tanh(self.param("alpha", nn.initializers.zeros, ())) + 1.0
                out = out + scale * out_ip
        out = out.reshape(*out.shape[:2], inner)
        return nn.Dense(self.query_dim, name="to_out_0")(out)


class _GEGLUProj(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.features, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.dim, name="net_2")(_GEGLUProj(4 * self.dim, name="net_0")(x))


class BasicTransformerBlock(nn.Module):
    heads: int
    dim_head: int
    cross: bool  # attn2 attends to the context (spatial) or to itself (temporal)
    image_cross_attention: bool = False
    learnable_scale: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        dim = self.heads * self.dim_head
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)  # noqa: E731
        x = CrossAttention(self.heads, self.dim_head, dim, name="attn1")(ln("norm1")(x)) + x
        x = CrossAttention(self.heads, self.dim_head, dim, self.image_cross_attention and self.cross,
                           self.learnable_scale, name="attn2")(ln("norm2")(x), context if self.cross else None) + x
        return FeedForward(dim, name="ff")(ln("norm3")(x)) + x


class SpatialTransformer(nn.Module):
    """Per frame: GroupNorm(eps 1e-6) -> proj_in -> ``depth`` blocks (self, then text + image cross-attention) ->
    proj_out."""

    channels: int
    heads: int
    dim_head: int
    image_cross_attention: bool
    learnable_scale: bool
    depth: int = 1  # transformer_depth

    @nn.compact
    def __call__(self, x, context):  # (N, H, W, C), (N, L, ctx)
        n, h, w, c = x.shape
        inner = self.heads * self.dim_head
        t = nn.Dense(inner, name="proj_in")(_gn("norm", 1e-6)(x).reshape(n, h * w, c))
        for d in range(self.depth):
            t = BasicTransformerBlock(self.heads, self.dim_head, True, self.image_cross_attention, self.learnable_scale,
                                      name=f"transformer_blocks_{d}")(t, context)
        return x + nn.Dense(c, name="proj_out")(t).reshape(n, h, w, c)


class TemporalTransformer(nn.Module):
    """GroupNorm(eps 1e-6) over (T, H, W) of each sample -> ``depth`` blocks of self-attention over the frames at
    each position."""

    channels: int
    heads: int
    dim_head: int
    depth: int = 1  # transformer_depth

    @nn.compact
    def __call__(self, x, b):  # (B*T, H, W, C)
        f = _frames(x, b)
        _, t, h, w, c = f.shape
        inner = self.heads * self.dim_head
        y = _gn("norm", 1e-6)(f)
        # (B, T, H, W, C) -> (B*H*W, T, C)
        y = y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
        y = nn.Dense(inner, name="proj_in")(y)
        for d in range(self.depth):
            y = BasicTransformerBlock(self.heads, self.dim_head, False, name=f"transformer_blocks_{d}")(y)
        y = nn.Dense(c, name="proj_out")(y)
        y = y.reshape(b, h, w, t, c).transpose(0, 3, 1, 2, 4)
        return x + y.reshape(x.shape)


class _Resample(nn.Module):
    """``Downsample`` (conv 3x3, stride 2, padding 1: ``op``) or ``Upsample`` (nearest x2, conv 3x3: ``conv``)."""

    channels: int
    down: bool

    @nn.compact
    def __call__(self, x):
        if self.down:
            return _conv(self.channels, "op", stride=2)(x)
        return _conv(self.channels, "conv")(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class UNetModel(nn.Module):
    """``UNetModel.forward(x (B, T, h, w, 8), t (B,), context (B, L, ctx), fs (B,))`` -> (B, T, h, w, 4)."""

    config: UNetConfig
    taps: tuple[str, ...] = ()

    def _sow(self, name, value):
        if name in self.taps:
            self.sow("intermediates", f"tap:{name}", value)

    @nn.compact
    def __call__(self, x, timesteps, context, fs=None):
        cfg = self.config
        b, t = x.shape[:2]
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        # float32 frequency tables, cast to the compute dtype (x's) before the MLPs
        emb = timestep_embedding(timesteps, mc, flip_sin_to_cos=True, downscale_freq_shift=0.0).astype(x.dtype)
        emb = nn.Dense(emb_dim, name="time_embed_2")(nn.silu(nn.Dense(emb_dim, name="time_embed_0")(emb)))
        self._sow("time_embed", emb)
        # Per-frame context: text repeated, image tokens split by frame, when the length says so (upstream's rule).
        if context.shape[1] == TEXT_TOKENS + t * IMAGE_TOKENS_PER_FRAME:
            text = jnp.repeat(context[:, :TEXT_TOKENS], t, axis=0)
            image = context[:, TEXT_TOKENS:].reshape(b * t, IMAGE_TOKENS_PER_FRAME, context.shape[-1])
            context = jnp.concatenate([text, image], axis=1)
        else:
            context = jnp.repeat(context, t, axis=0)
        emb = jnp.repeat(emb, t, axis=0)
        if cfg.fs_condition:
            fs = jnp.full((b,), cfg.default_fs) if fs is None else fs
            f = timestep_embedding(fs, mc, flip_sin_to_cos=True, downscale_freq_shift=0.0).astype(x.dtype)
            f = nn.Dense(emb_dim, name="fps_embedding_2")(nn.silu(nn.Dense(emb_dim, name="fps_embedding_0")(f)))
            self._sow("fps_embedding", f)
            emb = emb + jnp.repeat(f, t, axis=0)

        res = maybe_remat(ResBlock, cfg.remat, cfg.remat_policy)
        heads_of = lambda ch: (ch // cfg.num_head_channels, cfg.num_head_channels)  # noqa: E731
        h = x.reshape(b * t, *x.shape[2:])  # (B*T, h, w, C)
        h = Conv(mc, (3, 3), padding=((1, 1), (1, 1)), name="input_blocks_0_0")(h)
        self._sow("input_blocks.0", h)
        if cfg.addition_attention:
            h = self._temporal(mc, 8, cfg.num_head_channels, name="init_attn_0")(h, b)
            self._sow("init_attn", h)
        hs, chans = [h], [mc]
        ch, ds, idx = mc, 1, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out_ch = mult * mc
                h = res(ch, out_ch, cfg.temporal_conv, b, name=f"input_blocks_{idx}_0")(h, emb)
                ch = out_ch
                if ds in cfg.attention_resolutions:
                    h = self._attention(h, context, b, ch, heads_of(ch), f"input_blocks_{idx}")
                self._sow(f"input_blocks.{idx}", h)
                hs.append(h)
                chans.append(ch)
                idx += 1
            if level != len(cfg.channel_mult) - 1:
                h = _Resample(ch, down=True, name=f"input_blocks_{idx}_0")(h)
                self._sow(f"input_blocks.{idx}", h)
                hs.append(h)
                chans.append(ch)
                idx += 1
                ds *= 2

        h = res(ch, ch, cfg.temporal_conv, b, name="middle_block_0")(h, emb)
        h = self._attention(h, context, b, ch, heads_of(ch), "middle_block", first=1)
        h = res(ch, ch, cfg.temporal_conv, b, name=f"middle_block_{3 if cfg.temporal_attention else 2}")(h, emb)
        self._sow("middle_block", h)

        idx = 0
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                in_ch = ch + chans.pop()
                ch = mc * mult
                h = res(in_ch, ch, cfg.temporal_conv, b, name=f"output_blocks_{idx}_0")(h, emb)
                n_layers = 1
                if ds in cfg.attention_resolutions:
                    h = self._attention(h, context, b, ch, heads_of(ch), f"output_blocks_{idx}")
                    n_layers += 2 if cfg.temporal_attention else 1
                if level and i == cfg.num_res_blocks:
                    h = _Resample(ch, down=False, name=f"output_blocks_{idx}_{n_layers}")(h)
                    ds //= 2
                self._sow(f"output_blocks.{idx}", h)
                idx += 1

        h = Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="out_2")(nn.silu(_gn("out_0", 1e-5)(h)))
        return h.reshape(b, t, *h.shape[1:])

    def _attention(self, h, context, b, ch, heads, prefix, first=1):
        cfg = self.config
        n_heads, dim_head = heads
        spatial = maybe_remat(SpatialTransformer, cfg.remat, cfg.remat_policy)
        h = spatial(ch, n_heads, dim_head, cfg.image_cross_attention,
                    cfg.image_cross_attention_scale_learnable, cfg.transformer_depth, name=f"{prefix}_{first}")(h, context)
        if cfg.temporal_attention:
            h = self._temporal(ch, n_heads, dim_head, name=f"{prefix}_{first + 1}")(h, b)
        return h

    def _temporal(self, *args, **kwargs):
        # the batch size ``b`` (argument 2, after self and x) shapes reshapes: static under remat
        cls = maybe_remat(TemporalTransformer, self.config.remat, self.config.remat_policy, static_argnums=(2,))
        return cls(*args, depth=self.config.transformer_depth, **kwargs)
