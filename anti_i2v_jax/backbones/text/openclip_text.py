"""OpenCLIP's text tower as DynamiCrafter's ``FrozenOpenCLIPEmbedder`` uses it ("penultimate"): token +
positional embeddings, the first L - 1 residual blocks with the causal mask, then ``ln_final``; no
``text_projection``. Ids ``(B, 77)`` -> context ``(B, 77, width)``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.nn.clip import Transformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
    """open_clip ``text_cfg`` (ViT-H-14: width 1024, 16 heads, 24 layers, 77 tokens, 49408 ids)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    skip_last: int = 1  # "penultimate": the last block is not run


class TextTower(nn.Module):
    config: TextConfig
    taps: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, ids):  # (B, L) int
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding")(ids)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width))
        x = x + pos[: ids.shape[1]]
        n = ids.shape[1]
        causal = jnp.asarray(np.triu(np.full((n, n), -np.inf, np.float32), 1))
        x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, taps=self.taps, name="transformer")(
            x, causal, run=cfg.layers - cfg.skip_last
        )
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln_final")(x)
