"""OpenCLIP ViT (``open_clip.VisionTransformer`` 2.22) as DynamiCrafter's ``FrozenOpenCLIPImageEmbedderV2``
uses it: patch tokens after the transformer, with no ``ln_post`` and no ``proj``.

Channels last: images ``(B, 224, 224, 3)`` already preprocessed; output ``(B, 1 + (224/14)^2, width)``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.nn.clip import Transformer
from anti_i2v_jax.nn.conv import Conv


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """open_clip ``vision_cfg`` (ViT-H-14: 32 layers, width 1280, head width 80, patch 14)."""

    image_size: int = 224
    layers: int = 32
    width: int = 1280
    head_width: int = 80
    patch_size: int = 14
    mlp_ratio: float = 4.0
    embed_dim: int = 1024  # the open_clip model's embed_dim: the output width of ``visual.proj`` (ImageHead)
    # Execution: the 32 blocks as one scanned block (parameters in the stacked layout, nn.clip.stack_resblocks);
    # on for real-size runs, where the tower is about a third of the step's compile time.
    scan_layers: bool = False

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
        x = Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="conv1")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.width)  # (B, g*g, W), row-major patches
        cls = self.param("class_embedding", nn.initializers.normal(cfg.width**-0.5), (cfg.width,))
        pos = self.param("positional_embedding", nn.initializers.normal(cfg.width**-0.5), (x.shape[1] + 1, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.width)).astype(x.dtype), x], axis=1) + pos
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln_pre")(x)
        return Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, taps=self.taps, scan=cfg.scan_layers,
                           name="transformer")(x)


class ImageHead(nn.Module):
    """open_clip's image embedding from the tower's tokens: ``ln_post`` on the class token, then ``@ proj``
    (``VisionTransformer`` with ``tok`` pooling, as ViT-H-14). DynamiCrafter's image path never uses it (it feeds the
    Resampler the tokens); the CLIP terms of the attack do."""

    config: VisionConfig

    @nn.compact
    def __call__(self, tokens):  # (B, 1 + g*g, W) -> (B, embed_dim)
        cfg = self.config
        pooled = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln_post")(tokens[:, 0])
        proj = self.param("proj", nn.initializers.normal(cfg.width**-0.5), (cfg.width, cfg.embed_dim))
        return pooled @ proj.astype(pooled.dtype)


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    n = np.arange(size, dtype=np.float64) - size // 2
    taps = np.exp(-(n**2) / (2.0 * sigma**2))
    return (taps / taps.sum()).astype(np.float32)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(
        t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1, np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0)
    )


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of torch's bicubic interpolation (A = -0.75) with ``align_corners=True``;
    taps outside the image are clamped to the border, as torch does."""
    src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    base = np.floor(src).astype(np.int64)
    t = src - base
    m = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        np.add.at(m, (np.arange(n_out), np.clip(base + k, 0, n_in - 1)), _cubic(t - k))
    return m.astype(np.float32)


def clip_preprocess(x: jax.Array, size: int = 224) -> jax.Array:
    """``FrozenOpenCLIPImageEmbedderV2.preprocess``: (B, H, W, 3) in [-1, 1] -> (B, size, size, 3) normalised.

    kornia ``resize(..., interpolation="bicubic", align_corners=True, antialias=True)`` (when any side shrinks, a
    Gaussian blur with reflect borders first: sigma = max((in/out - 1)/2, 0.001), odd kernel
    ``int(max(4 sigma, 3))``), then ``(x + 1) / 2`` and the OpenAI CLIP mean/std. The image is squashed, not
    cropped. ``jax.image.resize`` has neither the align-corners grid nor this filter, hence the matrices.
    """
    h, w = x.shape[1:3]
    factors = (h / size, w / size)
    if max(factors) > 1:
        for axis, f, n in ((1, factors[0], h), (2, factors[1], w)):
            sigma = max((f - 1.0) / 2.0, 0.001)
            k = int(max(4.0 * sigma, 3))
            k = 1 if n == 1 else (k if k % 2 else k + 1)
            taps = jnp.asarray(_gaussian_taps(k, sigma))
            pad = [(0, 0)] * 4
            pad[axis] = (k // 2, k // 2)
            xp = jnp.pad(x, pad, mode="reflect")
            x = sum(taps[i] * jax.lax.slice_in_dim(xp, i, i + n, axis=axis) for i in range(k))
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(bicubic_matrix(h, size)), x)
    x = jnp.einsum("pw,bowc->bopc", jnp.asarray(bicubic_matrix(w, size)), x)
    x = (x + 1.0) / 2.0
    return (x - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)
