"""DINO ViT (Hugging Face ``ViTModel`` folder, e.g. ``facebook/dino-vits16``) -> the Flax ViT of
:mod:`anti_i2v_jax.eval.dino`, for the DINO-similarity metric.

The Flax model reuses the project's OpenCLIP-style transformer, whose attention takes one packed
``in_proj_weight`` (q | k | v); the checkpoint's separate ``query``/``key``/``value`` tensors are presented
to the rule table as that packed tensor by :class:`PackedQKV`. Every other key maps by rule; the pooler (a
classification head the CLS similarity never uses) is the only key set aside, and anything else unused or
missing is an error.
"""

from __future__ import annotations

import re

import numpy as np

from weights_convert.core import Rule

_QKV = re.compile(r"(encoder\.layer\.\d+\.attention\.attention)\.(query|key|value)\.(weight|bias)")

DINO_RULES = [
    Rule(r"embeddings\.cls_token", "cls_token"),
    Rule(r"embeddings\.position_embeddings", "position_embeddings"),
    Rule(r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed/kernel", "conv2d"),
    Rule(r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed/bias"),
    Rule(r"encoder\.layer\.(\d+)\.attention\.attention\.in_proj_(weight|bias)", r"transformer/resblocks_\1/attn/in_proj_\2"),
    Rule(r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", r"transformer/resblocks_\1/attn/out_proj/kernel", "linear"),
    Rule(r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"transformer/resblocks_\1/attn/out_proj/bias"),
    Rule(r"encoder\.layer\.(\d+)\.layernorm_before\.weight", r"transformer/resblocks_\1/ln_1/scale"),
    Rule(r"encoder\.layer\.(\d+)\.layernorm_before\.bias", r"transformer/resblocks_\1/ln_1/bias"),
    Rule(r"encoder\.layer\.(\d+)\.layernorm_after\.weight", r"transformer/resblocks_\1/ln_2/scale"),
    Rule(r"encoder\.layer\.(\d+)\.layernorm_after\.bias", r"transformer/resblocks_\1/ln_2/bias"),
    Rule(r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight", r"transformer/resblocks_\1/mlp/c_fc/kernel", "linear"),
    Rule(r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias", r"transformer/resblocks_\1/mlp/c_fc/bias"),
    Rule(r"encoder\.layer\.(\d+)\.output\.dense\.weight", r"transformer/resblocks_\1/mlp/c_proj/kernel", "linear"),
    Rule(r"encoder\.layer\.(\d+)\.output\.dense\.bias", r"transformer/resblocks_\1/mlp/c_proj/bias"),
    Rule(r"layernorm\.weight", "norm/scale"),
    Rule(r"layernorm\.bias", "norm/bias"),
]
DINO_IGNORE = [r"pooler\.dense\.(weight|bias)"]


class PackedQKV:
    """A source whose ``...attention.attention.{query,key,value}.{weight,bias}`` triples read as one
    ``...attention.attention.in_proj_{weight,bias}`` (rows q | k | v, PyTorch's packed layout)."""

    def __init__(self, source):
        self.source, self.path = source, getattr(source, "path", "<source>")
        self._packed: dict[str, list[str]] = {}
        self._plain: list[str] = []
        for key in source.keys():
            m = _QKV.fullmatch(key)
            if m is None:
                self._plain.append(key)
                continue
            self._packed.setdefault(f"{m.group(1)}.in_proj_{m.group(3)}", []).append(key)
        for packed, parts in self._packed.items():
            if len(parts) != 3:
                raise KeyError(f"{self.path}: {packed} needs query, key and value; found only {sorted(parts)}")
            parts.sort(key=lambda k: ("query", "key", "value").index(k.split(".")[-2]))

    def keys(self) -> list[str]:
        return self._plain + list(self._packed)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._packed:
            return tuple(self.source.shape(key))
        shapes = [tuple(self.source.shape(k)) for k in self._packed[key]]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def load(self, key: str) -> np.ndarray:
        if key not in self._packed:
            return self.source.load(key)
        return np.concatenate([np.asarray(self.source.load(k)) for k in self._packed[key]], axis=0)
