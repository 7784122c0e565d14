"""DINO similarity: cosine of DINO ViT-S/16 CLS features between two videos (or a video and a photo).

The network is Hugging Face's ``ViTModel`` in Flax on the project's transformer (``nn/clip.py``: the same
pre-LN block; ``layer_norm_eps`` from the config), read from a local model folder (``config.json`` +
``model.safetensors``, e.g. a download of ``facebook/dino-vits16``) by the converter's rule table, with every
key checked. Nothing is downloaded. The feature is ``last_hidden_state[:, 0]`` (CLS after the final
LayerNorm), as DreamBooth-style DINO scores use it.

Preprocessing (:data:`PREPROCESS`): each frame is resized whole to 224x224 (bicubic; no crop, so the whole
frame counts) and normalised with the ImageNet mean and std, as the DINO checkpoints were trained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.nn.clip import Transformer

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
PREPROCESS = {"size": 224, "resample": "bicubic", "crop": None, "mean": IMAGENET_MEAN.tolist(), "std": IMAGENET_STD.tolist()}

# Hugging Face ViT config keys: read, or known not to change the forward pass of a ViTModel.
_READ = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
         "num_channels", "layer_norm_eps", "hidden_act", "qkv_bias"}
_IGNORED = {"architectures", "attention_probs_dropout_prob", "hidden_dropout_prob", "dtype", "torch_dtype",
            "encoder_stride", "initializer_range", "model_type", "transformers_version", "pooler_act",
            "pooler_output_size", "_name_or_path", "id2label", "label2id", "problem_type", "output_attentions",
            "output_hidden_states", "return_dict", "use_mask_token", "chunk_size_feed_forward"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """A ViT encoder (``ViTModel``); :func:`dino_vits16` is the DINO ViT-S/16."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    patch: int
    image_size: int
    eps: float = 1e-12
    channels: int = 3

    @classmethod
    def from_hf(cls, config: dict, where: str = "config.json") -> ViTConfig:
        """Parse a Hugging Face ViT ``config.json``; any key that is neither read nor known to be inert is an
        error, so a different architecture is never built silently."""
        unknown = sorted(set(config) - _READ - _IGNORED)
        if unknown:
            raise UserError(f"{where}: unsupported ViT config keys {unknown}")
        if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
            raise UserError(f"{where}: only hidden_act 'gelu' with qkv_bias is supported")
        return cls(width=config["hidden_size"], layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                   mlp_dim=config["intermediate_size"], patch=config["patch_size"], image_size=config["image_size"],
                   eps=config.get("layer_norm_eps", 1e-12), channels=config.get("num_channels", 3))


def dino_vits16() -> ViTConfig:
    """``facebook/dino-vits16``: 12 layers, width 384, 6 heads, 16-px patches at 224."""
    return ViTConfig(width=384, layers=12, heads=6, mlp_dim=1536, patch=16, image_size=224, eps=1e-6)


class ViT(nn.Module):
    """Patch embedding + CLS token + learned positions -> pre-LN transformer -> final LayerNorm."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):  # (B, H, W, C) normalised, H = W = image_size
        cfg = self.config
        if x.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"ViT input must be {cfg.image_size}x{cfg.image_size}, got {x.shape[1:3]}")
        x = nn.Conv(cfg.width, (cfg.patch, cfg.patch), strides=cfg.patch, padding="VALID", name="patch_embed")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.width)  # (B, h, w, D) -> (B, h*w, D), row-major like PyTorch's flatten(2)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, cfg.width))
        pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, x.shape[1] + 1, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.width)), x], axis=1) + pos
        x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim / cfg.width, eps=cfg.eps, name="transformer")(x)
        return nn.LayerNorm(epsilon=cfg.eps, use_fast_variance=False, name="norm")(x)


def load(folder: str | Path) -> tuple[ViTConfig, dict]:
    """A ViT from a local Hugging Face model folder (``config.json`` + safetensors); every key checked."""
    from weights_convert.core import SafetensorsSource, abstract_params, convert
    from weights_convert.dino import DINO_IGNORE, DINO_RULES, PackedQKV

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a Hugging Face model folder (no config.json); give the folder of a "
                        "download of facebook/dino-vits16")
    config = ViTConfig.from_hf(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    model = ViT(config)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels))
    abstract = abstract_params(lambda: model.init(jax.random.key(0), dummy))
    params, _ = convert(PackedQKV(SafetensorsSource(folder)), DINO_RULES, abstract, ignore=DINO_IGNORE,
                        dtype=np.float32, what=str(folder))
    return config, params


def preprocess(frames: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, size, size, 3): whole-frame bicubic resize, ImageNet normalisation."""
    out = [np.asarray(Image.fromarray(f[..., :3]).resize((size, size), Image.BICUBIC), np.float32) / 255.0
           for f in frames]
    return ((np.stack(out) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


class Dino:
    """CLS features and similarities of a loaded DINO ViT."""

    def __init__(self, folder: str | Path | None = None, *, config: ViTConfig | None = None, params=None):
        if folder is not None:
            config, params = load(folder)
        if config is None or params is None:
            raise ValueError("give a model folder, or config and params")
        self.config, self.params = config, params
        self._apply = jax.jit(lambda p, x: ViT(config).apply({"params": p}, x)[:, 0])

    def features(self, frames: np.ndarray, batch: int = 16) -> np.ndarray:
        """CLS features (N, D) of uint8 frames (N, H, W, 3)."""
        x = preprocess(np.asarray(frames), self.config.image_size)
        return np.concatenate([np.asarray(self._apply(self.params, x[i : i + batch])) for i in range(0, len(x), batch)])

    def similarity(self, frames: np.ndarray, reference: np.ndarray) -> float:
        """Mean cosine between each frame and its reference: ``reference`` is a video of as many frames (paired
        frame by frame) or one photo (H, W, 3)."""
        f = _unit(self.features(frames))
        r = _unit(self.features(reference[None] if reference.ndim == 3 else reference))
        if len(r) not in (1, len(f)):
            raise ValueError(f"the reference has {len(r)} frames, the video {len(f)}")
        return float(np.mean(np.sum(f * r, axis=-1)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
