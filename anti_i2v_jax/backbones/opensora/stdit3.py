"""Flax port of Open-Sora 1.2's ``STDiT3`` (``opensora/models/stdit/stdit3.py`` at v1.2.0), channels last.

Input latents ``(B, T, H, W, C)``; text ``y`` ``(B, L, caption_channels)`` with a per-sample token mask;
``x_mask`` ``(B, T)`` marks generated frames (True, timestep t) and conditioning frames (False, t = 0).
Tokens are T-major, then H, then W of the (right/bottom zero-padded) patch grid. Blocks run as
S0, T0, S1, T1, ...; every block can be sown (``spatial.i``, ``temporal.i``); "layer i" of the attack is the
output of temporal block i, i.e. of the (spatial, temporal) pair i.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.configs import parse_config
from anti_i2v_jax.nn.attention import attention
from anti_i2v_jax.nn.conv import Conv
from anti_i2v_jax.nn.embeddings import apply_interleaved_rope, timestep_embedding
from anti_i2v_jax.nn.remat import maybe_remat, stack_layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class STDiT3Config:
    """``STDiT3Config`` (the HF ``config.json`` of hpcai-tech/OpenSora-STDiT-v3), plus execution switches."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    input_sq_size: int = 512
    skip_y_embedder: bool = False
    # Execution switches (not upstream): scan the 28 (spatial, temporal) pairs; rematerialise each block.
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps (anti_i2v_jax.nn.remat)

    IGNORED = frozenset(
        {
            "architectures", "model_type", "torch_dtype", "transformers_version", "class_dropout_prob", "drop_path",
            "enable_flash_attn", "enable_layernorm_kernel", "enable_sequence_parallelism", "freeze_y_embedder",
            "only_train_temporal", "input_size",
        }
    )

    @classmethod
    def from_hf(cls, raw: dict[str, Any], where: str = "stdit3/config.json") -> STDiT3Config:
        """Parse the STDiT3 ``config.json``; unknown keys are errors."""
        from anti_i2v_jax.errors import UserError

        if raw.get("enable_sequence_parallelism"):
            raise UserError(f"{where}: sequence parallelism is a training setting; not supported")
        if raw.get("skip_y_embedder"):
            raise UserError(f"{where}: skip_y_embedder is not supported")
        return parse_config(cls, raw, cls.IGNORED, where)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels


def stdit3_xl_2() -> STDiT3Config:
    """STDiT3-XL/2 as released (hpcai-tech/OpenSora-STDiT-v3)."""
    return STDiT3Config()


def _ln(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False, name=name)


def modulate(x, shift, scale):
    """``t2i_modulate``: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def position_embedding_2d(dim: int, h: int, w: int, scale: float, base_size: int) -> np.ndarray:
    """``PositionEmbedding2D``: ``(h*w, dim)`` float32, [sin, cos] of the w coordinate then of the h coordinate."""
    inv_freq = 1.0 / (10000 ** (np.arange(0, dim // 2, 2, dtype=np.float32) / (dim // 2)))
    gh = np.arange(h, dtype=np.float32) / np.float32(scale) * np.float32(base_size / h)
    gw = np.arange(w, dtype=np.float32) / np.float32(scale) * np.float32(base_size / w)
    rows, cols = np.meshgrid(gh, gw, indexing="ij")  # (h, w): token n = r * w + c

    def emb(p):
        out = np.einsum("i,d->id", p.reshape(-1), inv_freq).astype(np.float32)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([emb(cols), emb(rows)], axis=-1).astype(np.float32)


def rope_tables(head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """rotary_embedding_torch ``RotaryEmbedding(head_dim)``: interleaved (cos, sin), each ``(length, head_dim)``."""
    freqs = 1.0 / (10000 ** (np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / head_dim))
    angles = np.outer(np.arange(length, dtype=np.float32), freqs).astype(np.float32)
    angles = np.repeat(angles, 2, axis=-1)
    return np.cos(angles), np.sin(angles)


class RMSNorm(nn.Module):
    """LlamaRMSNorm (eps 1e-6, variance in float32)."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return scale * (x.astype(jnp.float32) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


class Attention(nn.Module):
    """Self-attention with RMS qk-norm (before RoPE); RoPE only in temporal blocks."""

    config: STDiT3Config
    rope: bool

    @nn.compact
    def __call__(self, x):  # (B', N, C)
        cfg = self.config
        b, n, c = x.shape
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, n, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B', N, heads, hd)
        if cfg.qk_norm:
            q, k = RMSNorm(name="q_norm")(q), RMSNorm(name="k_norm")(k)
        if self.rope:
            cos, sin = (jnp.asarray(t)[:, None, :] for t in rope_tables(cfg.head_dim, n))
            q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        out = attention(q, k, v, scale=cfg.head_dim**-0.5)
        return nn.Dense(c, name="proj")(out.reshape(b, n, c))


class CrossAttention(nn.Module):
    """``MultiHeadCrossAttention``: each sample's tokens attend to its own valid text tokens only."""

    config: STDiT3Config

    @nn.compact
    def __call__(self, x, y, y_mask):  # (B, N, C), (B, L, C), (B, L) bool
        cfg = self.config
        b, n, c = x.shape
        q = nn.Dense(c, name="q_linear")(x).reshape(b, n, cfg.num_heads, cfg.head_dim)
        kv = nn.Dense(2 * c, name="kv_linear")(y).reshape(b, y.shape[1], 2, cfg.num_heads, cfg.head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        out = attention(q, k, v, scale=cfg.head_dim**-0.5, key_mask=y_mask)
        return nn.Dense(c, name="proj")(out.reshape(b, n, c))


class Mlp(nn.Module):
    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out, name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=True))


class STDiT3Block(nn.Module):
    """Modulated self-attention (spatial over S, or temporal over T with RoPE), cross-attention, MLP."""

    config: STDiT3Config
    temporal: bool
    shape: tuple[int, int]  # (T, S): frames and patches per frame of the token grid

    @nn.compact
    def __call__(self, x, y, y_mask, t_mlp, t0_mlp, x_mask):  # x (B, T*S, C)
        cfg = self.config
        t, s = self.shape
        b, _, c = x.shape
        table = self.param("scale_shift_table", nn.initializers.normal(c**-0.5), (6, c))
        # (B, T, 1, 6, C): per-frame modulation, t0 rows where x_mask is False
        mod = table + t_mlp.reshape(b, 1, 1, 6, c)
        if x_mask is not None:
            mod = jnp.where(x_mask[:, :, None, None, None], mod, table + t0_mlp.reshape(b, 1, 1, 6, c))
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = (mod[..., i, :] for i in range(6))  # (B, T?, 1, C)
        frames = lambda v: v.reshape(b, t, s, c)  # noqa: E731  (B, T*S, C) -> (B, T, S, C)
        h = modulate(frames(_ln("norm1")(x)), sh_msa, sc_msa)
        attn = Attention(cfg, rope=self.temporal, name="attn")
        if self.temporal:
            # (B, T, S, C) -> (B*S, T, C)
            h = attn(h.transpose(0, 2, 1, 3).reshape(b * s, t, c)).reshape(b, s, t, c).transpose(0, 2, 1, 3)
        else:
            h = attn(h.reshape(b * t, s, c)).reshape(b, t, s, c)
        x = x + (g_msa * h).reshape(b, t * s, c)
        x = x + CrossAttention(cfg, name="cross_attn")(x, y, y_mask)
        h = modulate(frames(_ln("norm2")(x)), sh_mlp, sc_mlp)
        h = Mlp(int(c * cfg.mlp_ratio), c, name="mlp")(h)
        return x + (g_mlp * h).reshape(b, t * s, c)


class _Embedder(nn.Module):
    """``TimestepEmbedder`` / ``SizeEmbedder``: [cos | sin] of 256 frequencies, Linear-SiLU-Linear."""

    hidden: int
    dtype: Any = jnp.float32  # the compute dtype: the float32 frequency table is cast to it

    @nn.compact
    def __call__(self, t):
        f = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0).astype(self.dtype)
        return nn.Dense(self.hidden, name="mlp_2")(nn.silu(nn.Dense(self.hidden, name="mlp_0")(f)))


class STDiT3(nn.Module):
    """The Open-Sora 1.2 denoiser; returns (B, T, H, W, out_channels) float32 (velocity = channels :4)."""

    config: STDiT3Config
    taps: tuple[str, ...] = ()  # "spatial.i", "temporal.i", and the embedder names

    def _sow(self, name, value):
        if name in self.taps:
            self.sow("intermediates", f"tap:{name}", value)

    @nn.compact
    def __call__(self, x, timestep, y, y_mask, x_mask=None, fps=None, height=None, width=None):
        cfg = self.config
        b, tx, hx, wx, _ = x.shape
        pt, ph, pw = cfg.patch_size
        c = cfg.hidden_size
        # PatchEmbed3D: pad W then H (then T) on the right to multiples of the patch, conv with kernel = stride
        x = jnp.pad(x, ((0, 0), (0, -tx % pt), (0, -hx % ph), (0, -wx % pw), (0, 0)))
        t_, h_, w_ = x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw
        s = h_ * w_
        tokens = _PatchEmbed(cfg, name="x_embedder")(x).reshape(b, t_ * s, c)
        self._sow("x_embedder", tokens)
        # The pos-emb scale comes from the pixel size of the first sample, as upstream.
        scale = math.sqrt(float(height[0]) * float(width[0])) / cfg.input_sq_size
        pos = position_embedding_2d(c, h_, w_, scale, round(s**0.5))
        tokens = (tokens.reshape(b, t_, s, c) + jnp.asarray(pos, tokens.dtype)).reshape(b, t_ * s, c)

        t_emb_mod = _Embedder(c, dtype=x.dtype, name="t_embedder")
        fps_emb = _Embedder(c, dtype=x.dtype, name="fps_embedder")(jnp.broadcast_to(jnp.asarray(fps, jnp.float32), (b,)))
        t_emb = t_emb_mod(jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,)))
        self._sow("t_embedder", t_emb)
        self._sow("fps_embedder", fps_emb)
        t = t_emb + fps_emb
        t_block = nn.Dense(6 * c, name="t_block_1")
        t_mlp = t_block(nn.silu(t))
        self._sow("t_block", t_mlp)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0_emb = t_emb_mod(jnp.zeros((b,), jnp.float32))
            self._sow("t0_embedder", t0_emb)
            t0 = t0_emb + fps_emb
            t0_mlp = t_block(nn.silu(t0))
            self._sow("t0_block", t0_mlp)

        y = _CaptionEmbedder(cfg, name="y_embedder")(y)
        self._sow("y_embedder", y)
        y_mask = jnp.asarray(y_mask).astype(bool)

        if cfg.scan_layers:
            # Parameters of the pairs stacked on a leading layer axis under blocks/pair/{spatial,temporal}.
            body = maybe_remat(_Pair, cfg.remat, cfg.remat_policy, prevent_cse=False)
            emit = any(t.startswith(("spatial.", "temporal.")) for t in self.taps)
            stack = nn.scan(
                body, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 5, length=cfg.depth,
            )(cfg, emit, (t_, s), name="blocks")
            h, ys = stack(tokens, y, y_mask, t_mlp, t0_mlp, x_mask)
            if ys is not None:  # taps of a scanned stack come back stacked per layer
                for i in range(cfg.depth):
                    self._sow(f"spatial.{i}", ys[0][i])
                    self._sow(f"temporal.{i}", ys[1][i])
        else:
            block = maybe_remat(STDiT3Block, cfg.remat, cfg.remat_policy)
            h = tokens
            for i in range(cfg.depth):
                h = block(cfg, False, (t_, s), name=f"spatial_blocks_{i}")(h, y, y_mask, t_mlp, t0_mlp, x_mask)
                self._sow(f"spatial.{i}", h)
                h = block(cfg, True, (t_, s), name=f"temporal_blocks_{i}")(h, y, y_mask, t_mlp, t0_mlp, x_mask)
                self._sow(f"temporal.{i}", h)

        out = _FinalLayer(cfg, name="final_layer")(h, t, t0, x_mask, (t_, s))
        # unpatchify "B (Nt Nh Nw) (Tp Hp Wp C) -> B (Nt Tp) (Nh Hp) (Nw Wp) C", then crop the padding
        co = cfg.out_channels
        out = out.reshape(b, t_, h_, w_, pt, ph, pw, co).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        out = out.reshape(b, t_ * pt, h_ * ph, w_ * pw, co)[:, :tx, :hx, :wx]
        return out.astype(jnp.float32)


class _Pair(nn.Module):
    """One (spatial, temporal) pair: the body of the scanned stack; emits both outputs when taps are wanted."""

    config: STDiT3Config
    emit: bool
    shape: tuple[int, int]

    @nn.compact
    def __call__(self, h, y, y_mask, t_mlp, t0_mlp, x_mask):
        hs = STDiT3Block(self.config, False, self.shape, name="spatial")(h, y, y_mask, t_mlp, t0_mlp, x_mask)
        ht = STDiT3Block(self.config, True, self.shape, name="temporal")(hs, y, y_mask, t_mlp, t0_mlp, x_mask)
        return ht, ((hs, ht) if self.emit else None)


def stack_pairs(params: dict, depth: int) -> dict:
    """Looped STDiT3 parameters (``spatial_blocks_i``/``temporal_blocks_i``) -> the ``scan_layers`` layout."""
    rest, spatial = stack_layers(params, "spatial_blocks", depth)
    rest, temporal = stack_layers(rest, "temporal_blocks", depth)
    return {**rest, "blocks": {"spatial": spatial, "temporal": temporal}}


class _PatchEmbed(nn.Module):
    config: STDiT3Config

    @nn.compact
    def __call__(self, x):
        p = self.config.patch_size
        return Conv(self.config.hidden_size, p, strides=p, padding="VALID", name="proj")(x)


class _CaptionEmbedder(nn.Module):
    """``y_proj`` (Linear-GELU(tanh)-Linear) and the learned null caption ``y_embedding`` (a buffer upstream)."""

    config: STDiT3Config

    def setup(self):
        cfg = self.config
        self.y_proj = Mlp(cfg.hidden_size, cfg.hidden_size)
        self.y_embedding = self.param(
            "y_embedding", nn.initializers.normal(cfg.caption_channels**-0.5), (cfg.model_max_length, cfg.caption_channels)
        )

    def __call__(self, y):
        return self.y_proj(y)

    def null(self):
        return self.y_embedding


class _FinalLayer(nn.Module):
    """``T2IFinalLayer``, including its quirk: conditioning frames are modulated twice (LN of the modulated x)."""

    config: STDiT3Config

    @nn.compact
    def __call__(self, x, t, t0, x_mask, shape):
        cfg = self.config
        tt, s = shape
        b, _, c = x.shape
        table = self.param("scale_shift_table", nn.initializers.normal(c**-0.5), (2, c))
        norm = _ln("norm_final")
        shift, scale = table[0] + t[:, None], table[1] + t[:, None]  # (B, 1, C)
        x = modulate(norm(x), shift, scale)
        if x_mask is not None:
            x_zero = modulate(norm(x), table[0] + t0[:, None], table[1] + t0[:, None])
            frames = lambda v: v.reshape(b, tt, s, c)  # noqa: E731
            x = jnp.where(x_mask[:, :, None, None], frames(x), frames(x_zero)).reshape(b, tt * s, c)
        return nn.Dense(int(np.prod(cfg.patch_size)) * cfg.out_channels, name="linear")(x)


def null_caption(params: dict) -> jax.Array:
    """The learned null caption (model_max_length, caption_channels) from STDiT3 parameters."""
    return params["y_embedder"]["y_embedding"]
