"""OpenCLIP's transformer (``open_clip.transformer.Transformer``, v2.22) in Flax, batch first.

Pre-LN residual blocks: ``x + out_proj(MHA(ln_1 x))`` then ``x + c_proj(GELU(c_fc(ln_2 x)))``, LayerNorm eps
1e-5 (settable: a Hugging Face ``ViTModel`` is the same block with its own eps), exact GELU. The packed ``in_proj_weight`` (3W, W) keeps PyTorch's layout and name, so a checkpoint
loads by rename only. Block outputs are sown as ``tap:i`` when asked for.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from anti_i2v_jax.nn.attention import attention
from anti_i2v_jax.nn.remat import stack_layers


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (packed q/k/v projection, additive mask)."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask=None):  # (B, L, W)
        w, h = self.width, self.heads
        in_w = self.param("in_proj_weight", nn.initializers.lecun_normal(), (3 * w, w))
        in_b = self.param("in_proj_bias", nn.initializers.zeros, (3 * w,))
        b, n, _ = x.shape
        qkv = x @ in_w.T + in_b  # (B, L, 3W), [q | k | v]
        q, k, v = (t.reshape(b, n, h, w // h) for t in jnp.split(qkv, 3, axis=-1))
        out = attention(q, k, v, scale=1.0 / math.sqrt(w // h), bias=mask).reshape(b, n, w)
        return nn.Dense(w, name="out_proj")(out)


class Transformer(nn.Module):
    """``layers`` residual blocks; ``run`` of them are executed (the text tower's "penultimate" runs L - 1).

    ``scan``: one compiled block run by ``nn.scan`` over the layers (parameters under ``resblocks/block`` with a
    leading layer axis, :func:`stack_resblocks`), so a deep tower costs one block of compile time; otherwise
    ``resblocks_<i>``, the checkpoint's layout. Both give the same values and taps."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    taps: tuple[int, ...] = ()
    eps: float = 1e-5
    scan: bool = False

    @nn.compact
    def __call__(self, x, mask=None, run: int | None = None):
        if self.scan:
            if run not in (None, self.layers):
                raise ValueError(f"a scanned Transformer runs all its {self.layers} layers, not {run}")
            stack = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=self.layers)
            x, outs = stack(self.width, self.heads, self.mlp_ratio, self.eps, bool(self.taps), name="resblocks")(x, mask)
            for i in self.taps:
                self.sow("intermediates", f"tap:{i}", outs[i])
            return x
        for i in range(self.layers if run is None else run):
            x = _Block(self.width, self.heads, self.mlp_ratio, self.eps, name=f"resblocks_{i}")(x, mask)
            if i in self.taps:
                self.sow("intermediates", f"tap:{i}", x)
        return x


def stack_resblocks(params: dict, layers: int) -> dict:
    """A Transformer's looped parameters (``resblocks_<i>``) -> the ``scan`` layout (``resblocks/block`` with a
    leading layer axis); checkpoints are converted looped."""
    rest, stacked = stack_layers(params, "resblocks", layers)
    return {**rest, "resblocks": {"block": stacked}}


class _Block(nn.Module):
    width: int
    heads: int
    mlp_ratio: float
    eps: float

    @nn.compact
    def __call__(self, x, mask=None):
        ln = lambda name: nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, name=name)  # noqa: E731
        x = x + MultiheadAttention(self.width, self.heads, name="attn")(ln("ln_1")(x), mask)
        return x + _Mlp(self.width, self.mlp_ratio, name="mlp")(ln("ln_2")(x))


class _ScanBlock(nn.Module):
    """One layer of a scanned Transformer: ``(x, mask) -> (carry, the block's output if collected)``."""

    width: int
    heads: int
    mlp_ratio: float
    eps: float
    collect: bool

    @nn.compact
    def __call__(self, x, mask=None):
        x = _Block(self.width, self.heads, self.mlp_ratio, self.eps, name="block")(x, mask)
        return x, (x if self.collect else None)


class _Mlp(nn.Module):
    width: int
    mlp_ratio: float

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(int(self.width * self.mlp_ratio), name="c_fc")(x), approximate=False)
        return nn.Dense(self.width, name="c_proj")(h)
