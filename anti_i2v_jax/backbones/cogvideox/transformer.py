"""Flax port of diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX-5B-I2V and 1.5), channels last.

Input ``hidden_states`` is ``(B, F, H, W, C)`` (noisy latents then image latents on C), text is
``(B, L, text_dim)``; the output is the v-prediction ``(B, F, H, W, out_channels)``. Every block sows
its video and text outputs when its index is in ``taps``; with ``scan_layers`` the block stack is a
``nn.scan`` whose taps come back stacked per layer (the same values as the looped stack).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.backbones.cogvideox.config import TransformerConfig
from anti_i2v_jax.nn.attention import attention
from anti_i2v_jax.nn.conv import Conv
from anti_i2v_jax.nn.embeddings import (
    apply_interleaved_rope,
    sincos_1d,
    timestep_embedding,
)
from anti_i2v_jax.nn.remat import maybe_remat, stack_layers


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


# ------------------------------------------------------------------------- positions (host, numpy)


def resize_crop_region_for_grid(src: tuple[int, int], tgt_width: int, tgt_height: int):
    """diffusers ``get_resize_crop_region_for_grid``: the crop box of a (h, w) grid in the base grid."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        rh, rw = tgt_height, int(round(tgt_height / h * w))
    else:
        rw, rh = tgt_width, int(round(tgt_width / w * h))
    top, left = int(round((tgt_height - rh) / 2.0)), int(round((tgt_width - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rotary_embedding(config: TransformerConfig, frames: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """3-D RoPE (cos, sin), each ``(frames' * grid_h * grid_w, head_dim)``, as the I2V pipelines build it.

    v1.0 (``linspace``): positions from the crop box of the grid in the base grid (fractional away from
    the native size). v1.5 (``slice``): integer positions, ``ceil(frames / patch_size_t)`` time steps.
    ``frames`` is the number of latent frames; ``grid_h``/``grid_w`` are the patch grid.
    """
    dim = config.attention_head_dim
    dims = (dim // 4, dim // 8 * 3, dim // 8 * 3)  # t, h, w
    p = config.patch_size
    if config.patch_size_t is None:
        (top, left), (bottom, right) = resize_crop_region_for_grid(
            (grid_h, grid_w), config.sample_width // p, config.sample_height // p
        )
        pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
        pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
        pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
    else:
        frames = -(-frames // config.patch_size_t)
        pos_t = np.arange(frames, dtype=np.float32)
        pos_h = np.arange(grid_h, dtype=np.float32)
        pos_w = np.arange(grid_w, dtype=np.float32)

    def axis(d, pos):
        freqs = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
        angles = np.outer(pos, freqs).astype(np.float32)
        return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)

    tables = [axis(d, pos) for d, pos in zip(dims, (pos_t, pos_h, pos_w))]

    def combine(i):
        t, h, w = (tab[i] for tab in tables)
        # (T, h, w, d_t + d_h + d_w), tokens in (t, h, w) order
        full = np.concatenate(
            [
                np.broadcast_to(t[:, None, None], (frames, grid_h, grid_w, t.shape[-1])),
                np.broadcast_to(h[None, :, None], (frames, grid_h, grid_w, h.shape[-1])),
                np.broadcast_to(w[None, None, :], (frames, grid_h, grid_w, w.shape[-1])),
            ],
            axis=-1,
        )
        return full.reshape(frames * grid_h * grid_w, -1)

    return combine(0), combine(1)


def sincos_pos_embedding(config: TransformerConfig, frames: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The 3-D sincos table (text rows zero), ``(1, L + frames*h*w, D)`` float64, as ``CogVideoXPatchEmbed``."""
    d = config.inner_dim
    spatial_d, temporal_d = 3 * d // 4, d // 4
    ww, hh = np.meshgrid(np.arange(grid_w) / config.spatial_interpolation_scale,
                         np.arange(grid_h) / config.spatial_interpolation_scale)  # "xy": w first
    spatial = np.concatenate([sincos_1d(spatial_d // 2, ww), sincos_1d(spatial_d // 2, hh)], axis=1)
    temporal = sincos_1d(temporal_d, np.arange(frames) / config.temporal_interpolation_scale)
    table = np.concatenate(
        [np.repeat(temporal[:, None], grid_h * grid_w, axis=1), np.repeat(spatial[None], frames, axis=0)], axis=-1
    ).reshape(frames * grid_h * grid_w, d)
    return np.concatenate([np.zeros((config.max_text_seq_length, d)), table])[None]


# ----------------------------------------------------------------------------------------- modules


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="linear_2")(nn.silu(nn.Dense(self.features, name="linear_1")(x)))


class PatchEmbed(nn.Module):
    """``CogVideoXPatchEmbed``: text projection, video patches, optional absolute position table."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, text, video):  # (B, L, text_dim), (B, F, H, W, C) -> (B, L + N, D)
        cfg = self.config
        p, d = cfg.patch_size, cfg.inner_dim
        b, f, h, w, c = video.shape
        text = nn.Dense(d, name="text_proj")(text)
        if cfg.patch_size_t is None:
            # (B*F, H, W, C) -> (B*F, H/p, W/p, D) -> (B, F*h*w, D)
            x = Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.patch_bias, name="proj")(
                video.reshape(b * f, h, w, c)
            )
            x = x.reshape(b, -1, d)
        else:
            pt = cfg.patch_size_t
            # (B, F, H, W, C) -> (B, F/pt, h, w, C, pt, p, p): one vector per patch, ordered (c, t, i, j)
            x = video.reshape(b, f // pt, pt, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
            x = nn.Dense(d, name="proj")(x.reshape(b, -1, c * pt * p * p))
        x = jnp.concatenate([text, x], axis=1)
        if cfg.use_learned_positional_embeddings or not cfg.use_rotary_positional_embeddings:
            if cfg.use_learned_positional_embeddings and (h != cfg.sample_height or w != cfg.sample_width):
                raise ValueError(
                    f"learned positional embeddings need latents of {cfg.sample_height}x{cfg.sample_width}, "
                    f"got {h}x{w} (use the model's native resolution)"
                )
            pixel_frames = (f - 1) * cfg.temporal_compression_ratio + 1
            native = (h, w, pixel_frames) == (cfg.sample_height, cfg.sample_width, cfg.sample_frames)
            if cfg.use_learned_positional_embeddings:
                grid = (cfg.sample_height // p, cfg.sample_width // p)
                native_tokens = ((cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1) * grid[0] * grid[1]
                # Initialised as upstream (sincos video rows, zero text rows); trained values come from the checkpoint.
                init = lambda _, shape: jnp.asarray(  # noqa: E731
                    sincos_pos_embedding(cfg, native_tokens // (grid[0] * grid[1]), *grid), jnp.float32
                ).reshape(shape)
                table = self.param("pos_embedding", init, (1, cfg.max_text_seq_length + native_tokens, d))
            if not (cfg.use_learned_positional_embeddings and native):
                # diffusers silently recomputes a sincos table when the frame count is not the native one
                table = jnp.asarray(sincos_pos_embedding(cfg, f, h // p, w // p), jnp.float32)
            x = x + table.astype(x.dtype)
        return x


class Attention(nn.Module):
    """Joint text+video self-attention with QK LayerNorm and 3-D RoPE on video tokens only."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, rope, text_len):  # (B, L + N, D)
        cfg = self.config
        heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
        b, n, _ = x.shape
        dense = lambda name: nn.Dense(cfg.inner_dim, use_bias=cfg.attention_bias, name=name)  # noqa: E731
        # (B, N, D) -> (B, N, heads, head_dim)
        q, k, v = (dense(nm)(x).reshape(b, n, heads, hd) for nm in ("to_q", "to_k", "to_v"))
        q = _layer_norm(1e-6, "norm_q")(q)
        k = _layer_norm(1e-6, "norm_k")(k)
        if rope is not None:
            cos, sin = (r[:, None, :] for r in rope)  # (N_video, 1, head_dim)
            q = jnp.concatenate([q[:, :text_len], apply_interleaved_rope(q[:, text_len:], cos, sin)], axis=1)
            k = jnp.concatenate([k[:, :text_len], apply_interleaved_rope(k[:, text_len:], cos, sin)], axis=1)
        out = attention(q, k, v, scale=1.0 / math.sqrt(hd))
        return nn.Dense(cfg.inner_dim, use_bias=True, name="to_out_0")(out.reshape(b, n, heads * hd))


class LayerNormZero(nn.Module):
    """``CogVideoXLayerNormZero``: one LayerNorm, separate (shift, scale, gate) for video and text."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, text, emb):
        d = self.config.inner_dim
        mod = nn.Dense(6 * d, name="linear")(nn.silu(emb))[:, None, :]  # (B, 1, 6D)
        shift, scale, gate, e_shift, e_scale, e_gate = jnp.split(mod, 6, axis=-1)
        norm = _layer_norm(self.config.norm_eps, "norm")
        return norm(x) * (1 + scale) + shift, norm(text) * (1 + e_scale) + e_shift, gate, e_gate


class GELUProj(nn.Module):
    """diffusers ``GELU(approximate="tanh")`` activation module: ``proj`` then GELU."""

    features: int

    @nn.compact
    def __call__(self, x):
        return nn.gelu(nn.Dense(self.features, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
    """diffusers ``FeedForward``: ``net.0`` (GELU projection to 4D) -> ``net.2``."""

    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.dim, name="net_2")(GELUProj(4 * self.dim, name="net_0")(x))


class Block(nn.Module):
    """``CogVideoXBlock``: LayerNormZero -> joint attention -> gated residual, twice (attention, then FF)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, text, emb, rope):
        text_len = text.shape[1]
        nx, nt, g, g_t = LayerNormZero(self.config, name="norm1")(x, text, emb)
        attn = Attention(self.config, name="attn1")(jnp.concatenate([nt, nx], axis=1), rope, text_len)
        x, text = x + g * attn[:, text_len:], text + g_t * attn[:, :text_len]
        nx, nt, g, g_t = LayerNormZero(self.config, name="norm2")(x, text, emb)
        ff = FeedForward(self.config.inner_dim, name="ff")(jnp.concatenate([nt, nx], axis=1))
        return x + g * ff[:, text_len:], text + g_t * ff[:, :text_len]


class _ScanBlock(nn.Module):
    """The scan body: one block; returns its outputs as the scan's per-layer ``ys`` when taps are wanted."""

    config: TransformerConfig
    emit: bool

    @nn.compact
    def __call__(self, carry, emb, rope):
        x, text = Block(self.config, name="block")(*carry, emb, rope)
        return (x, text), ((x, text) if self.emit else None)


class CogVideoXTransformer3DModel(nn.Module):
    """The CogVideoX denoiser; ``taps`` selects the blocks whose (video, text) outputs are sown."""

    config: TransformerConfig
    taps: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, hidden_states, text, timestep, rope=None, ofs=None):
        cfg = self.config
        b, f, h, w, _ = hidden_states.shape
        t_emb = timestep_embedding(
            jnp.broadcast_to(timestep, (b,)), cfg.inner_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift,
        ).astype(hidden_states.dtype)
        emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding")(t_emb)
        if cfg.ofs_embed_dim is not None:
            if ofs is None:
                raise ValueError("this transformer has an ofs embedding: pass ofs (2.0 in the I2V pipeline)")
            o = timestep_embedding(
                jnp.broadcast_to(ofs, (b,)), cfg.ofs_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
                downscale_freq_shift=cfg.freq_shift,
            ).astype(hidden_states.dtype)
            emb = emb + TimestepEmbedding(cfg.ofs_embed_dim, name="ofs_embedding")(o)

        tokens = PatchEmbed(cfg, name="patch_embed")(text, hidden_states)
        text_len = text.shape[1]
        e, x = tokens[:, :text_len], tokens[:, text_len:]
        if cfg.use_rotary_positional_embeddings and rope is None:
            p = cfg.patch_size
            rope = tuple(jnp.asarray(r) for r in rotary_embedding(cfg, f, h // p, w // p))
        if not cfg.use_rotary_positional_embeddings:
            rope = None

        block_cls = maybe_remat(Block, cfg.remat, cfg.remat_policy)
        if cfg.scan_layers:
            body = maybe_remat(_ScanBlock, cfg.remat, cfg.remat_policy, prevent_cse=False)
            stack = nn.scan(
                body,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
            )(cfg, bool(self.taps), name="transformer_blocks")
            (x, e), ys = stack((x, e), emb, rope)
            for i in self.taps:
                self.sow("intermediates", f"video.{i}", ys[0][i])
                self.sow("intermediates", f"text.{i}", ys[1][i])
        else:
            for i in range(cfg.num_layers):
                x, e = block_cls(cfg, name=f"transformer_blocks_{i}")(x, e, emb, rope)
                if i in self.taps:
                    self.sow("intermediates", f"video.{i}", x)
                    self.sow("intermediates", f"text.{i}", e)

        x = _layer_norm(cfg.norm_eps, "norm_final")(x)
        x = _AdaLayerNorm(cfg, name="norm_out")(x, emb)
        x = nn.Dense(self._patch_dim(), name="proj_out")(x)
        return self._unpatchify(x, f, h, w)

    def _patch_dim(self) -> int:
        cfg = self.config
        return (cfg.patch_size_t or 1) * cfg.patch_size**2 * cfg.out_channels

    def _unpatchify(self, x, f, h, w):
        cfg = self.config
        p, c, b = cfg.patch_size, cfg.out_channels, x.shape[0]
        if cfg.patch_size_t is None:
            # (B, F*h*w, C*p*p) -> (B, F, h, w, C, p, p) -> (B, F, h, p, w, p, C) -> (B, F, H, W, C)
            x = x.reshape(b, f, h // p, w // p, c, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
            return x.reshape(b, f, h, w, c)
        pt = cfg.patch_size_t
        # (B, F/pt*h*w, C*pt*p*p) -> (B, F/pt, h, w, C, pt, p, p) -> (B, F/pt, pt, h, p, w, p, C)
        x = x.reshape(b, -1, h // p, w // p, c, pt, p, p).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, -1, h, w, c)


class _AdaLayerNorm(nn.Module):
    """diffusers ``AdaLayerNorm`` (chunk_dim=1): (shift, scale) from SiLU(emb), shift first."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, emb):
        d = self.config.inner_dim
        shift, scale = jnp.split(nn.Dense(2 * d, name="linear")(nn.silu(emb))[:, None, :], 2, axis=-1)
        return _layer_norm(self.config.norm_eps, "norm")(x) * (1 + scale) + shift


def stack_blocks(params: dict, num_layers: int) -> dict:
    """Looped transformer parameters (``transformer_blocks_i``) -> the ``scan_layers`` layout (a leading
    layer axis under ``transformer_blocks/block``); converted checkpoints are stored looped."""
    rest, stacked = stack_layers(params, "transformer_blocks", num_layers)
    return {**rest, "transformer_blocks": {"block": stacked}}


def block_taps(state: dict, layers: Sequence[int]) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
    """(video taps, text taps) by block index from the ``intermediates`` of an ``apply``."""
    inter = state.get("intermediates", {})
    return ({i: inter[f"video.{i}"][0] for i in layers}, {i: inter[f"text.{i}"][0] for i in layers})
