"""OpenCLIP ViT (``open_clip.VisionTransformer`` 2.22) as DynamiCrafter's ``FrozenOpenCLIPImageEmbedderV2``
uses it: patch tokens after the transformer, with no ``ln_post`` and no ``proj``.

Channels last: images ``(B, 224, 224, 3)`` already preprocessed; output ``(B, 1 + (224/14)^2, width)``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from anti_i2v_jax.nn.clip import Transformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """open_clip ``vision_cfg`` (ViT-H-14: 32 layers, width 1280, head width 80, patch 14)."""

    image_size: int = 224
    layers: int = 32
    width: int = 1280
    head_width: int = 80
    patch_size: int = 14
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width


class VisionTower(nn.Module):
    config: VisionConfig
    taps: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x):  # (B, H, W, 3) -> (B, 1 + g*g, W)
        cfg = self.config
        p = cfg.patch_size
        x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="conv1")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.width)  # (B, g*g, W), row-major patches
        cls = self.param("class_embedding", nn.initializers.normal(cfg.width**-0.5), (cfg.width,))
        pos = self.param("positional_embedding", nn.initializers.normal(cfg.width**-0.5), (x.shape[1] + 1, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.width)).astype(x.dtype), x], axis=1) + pos
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln_pre")(x)
        return Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, taps=self.taps, name="transformer")(x)
