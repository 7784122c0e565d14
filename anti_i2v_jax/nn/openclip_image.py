"""An OpenCLIP image encoder read from a local open_clip checkpoint, for the CLIP terms of the attack (Anti-I2V's
auxiliary loss, VGMShield) on backbones that have no CLIP image tower of their own (CogVideoX, Open-Sora).

The network is the one DynamiCrafter's image path uses (``VisionTower``, checked against open_clip there) plus
open_clip's image head (``ln_post`` on the class token, ``@ proj``); the preprocessing is the V2 embedder's
(kornia bicubic resize to 224 x 224, the OpenAI mean and std), as VGMShield's SVD embedder does it. Weights come
from the file a user already has (``open_clip_pytorch_model.bin`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, or
its ``.safetensors``), never downloaded; the text half of the checkpoint is set aside, every other tensor is
mapped and shape-checked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from anti_i2v_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class CLIPImageModel:
    """A loaded OpenCLIP image encoder: ``model(params, x)`` with ``x`` (H, W, 3) in [0, 1] -> (embed_dim,)."""

    config: Any  # VisionConfig
    params: Any  # {"tower": ..., "head": ...}
    source: str

    def __call__(self, params, x):
        from anti_i2v_jax.backbones.dynamicrafter.image_encoder import (
            ImageHead,
            VisionTower,
            clip_preprocess,
        )

        img = clip_preprocess((2.0 * x - 1.0)[None])
        tokens = VisionTower(self.config).apply({"params": params["tower"]}, img.astype(x.dtype))
        return ImageHead(self.config).apply({"params": params["head"]}, tokens)[0].astype(jnp.float32)


def abstract_params(config) -> dict:
    from anti_i2v_jax.backbones.dynamicrafter.image_encoder import (
        ImageHead,
        VisionTower,
    )

    key, img = jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3))
    tower = jax.eval_shape(VisionTower(config).init, key, img)["params"]
    tokens = jnp.zeros((1, 1 + (config.image_size // config.patch_size) ** 2, config.width))
    return {"tower": tower, "head": jax.eval_shape(ImageHead(config).init, key, tokens)["params"]}


def load(path: str | Path, arch: dict | None = None) -> CLIPImageModel:
    """An open_clip checkpoint (a state dict: ``visual.*`` and the text half) as :class:`CLIPImageModel`. ``arch``:
    the open_clip model config (``embed_dim``, ``vision_cfg``); default ViT-H-14."""
    import numpy as np

    from anti_i2v_jax.backbones.dynamicrafter.config import VIT_H_14
    from anti_i2v_jax.backbones.dynamicrafter.image_encoder import VisionConfig
    from anti_i2v_jax.configs import parse_config
    from weights_convert.core import convert
    from weights_convert.dynamicrafter import (
        _prefixed,
        checkpoint_source,
        clip_head_rules,
        clip_vision_rules,
    )

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file (an open_clip checkpoint, e.g. open_clip_pytorch_model.bin of "
                        f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    arch = arch or VIT_H_14
    config = dataclasses.replace(parse_config(VisionConfig, arch["vision_cfg"], frozenset(), "vision_cfg"),
                                 embed_dim=int(arch.get("embed_dim", 1024)))
    tower_rules, unused = clip_vision_rules(prefix="")
    rules = _prefixed(tower_rules, "tower") + _prefixed(clip_head_rules(prefix=""), "head")
    params, _ = convert(checkpoint_source(path), rules, abstract_params(config), ignore=unused, dtype=np.float32,
                        what=f"OpenCLIP image encoder from {path}")
    return CLIPImageModel(config=config, params=params, source=str(path))
