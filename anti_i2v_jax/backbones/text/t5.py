"""Flax port of the T5 v1.1 encoder (transformers ``T5EncoderModel``), shared by CogVideoX and Open-Sora.

Pre-norm RMSNorm blocks (eps from the config, variance in float32), self-attention without 1/sqrt(d)
scaling plus a bidirectional relative-position bias computed in block 0 and reused by every block,
gated-GELU (tanh) feed-forward, no biases anywhere. Taps: ``embeddings`` and the output of each block.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.configs import parse_config
from anti_i2v_jax.errors import UserError
from anti_i2v_jax.nn.attention import attention


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """The encoder half of a transformers ``T5Config``."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1

    HANDLED_ELSEWHERE = frozenset(
        {
            "architectures", "classifier_dropout", "decoder_start_token_id", "dropout_rate", "dtype", "torch_dtype",
            "initializer_factor", "is_decoder", "is_encoder_decoder", "model_type", "num_decoder_layers",
            "tie_word_embeddings", "transformers_version", "use_cache", "dense_act_fn", "is_gated_act",
            "output_past", "n_positions", "task_specific_params", "scale_decoder_outputs",
        }
    )

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], where: str = "text_encoder/config.json") -> T5Config:
        """Parse a transformers T5 ``config.json``; only the v1.1 gated-GELU encoder is supported."""
        if raw.get("feed_forward_proj", "gated-gelu") != "gated-gelu" or raw.get("dense_act_fn", "gelu_new") != "gelu_new":
            raise UserError(f"{where}: only T5 v1.1 (feed_forward_proj gated-gelu, gelu_new) is supported")
        return parse_config(cls, raw, cls.HANDLED_ELSEWHERE, where)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


def t5_v1_1_xxl() -> T5Config:
    """google/t5-v1_1-xxl (the text encoder of CogVideoX and Open-Sora)."""
    return T5Config()


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets: half the buckets per direction, exact below n/4, log-spaced up to max_distance."""
    n = num_buckets // 2
    bucket = (relative_position > 0).astype(np.int64) * n
    rp = np.abs(relative_position)
    max_exact = n // 2
    safe = np.maximum(rp, 1).astype(np.float32)
    large = max_exact + (
        np.log(safe / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, n - 1)
    return bucket + np.where(rp < max_exact, rp, large)


class RMSNorm(nn.Module):
    """T5LayerNorm: ``x / sqrt(mean(x^2) + eps) * weight`` with the variance in float32."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return (x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * scale


class SelfAttention(nn.Module):
    config: T5Config
    has_relative_bias: bool

    @nn.compact
    def __call__(self, x, bias, mask):  # (B, L, d), (1, H, L, L) or None, (B, L)
        cfg = self.config
        b, n, _ = x.shape
        proj = lambda name: nn.Dense(cfg.inner_dim, use_bias=False, name=name)(x).reshape(b, n, cfg.num_heads, cfg.d_kv)  # noqa: E731
        q, k, v = proj("q"), proj("k"), proj("v")
        if self.has_relative_bias:
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, name="relative_attention_bias")
            pos = np.arange(n)
            buckets = relative_position_bucket(
                pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )
            bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # (1, H, Lq, Lk)
        # (B, H, Lq, Lk); no 1/sqrt(d_kv) scaling in T5
        if mask is not None:  # HF adds finfo.min on padded keys (all-padded rows then average every key)
            bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        out = attention(q, k, v, scale=1.0, bias=bias).reshape(b, n, cfg.inner_dim)
        return nn.Dense(cfg.d_model, use_bias=False, name="o")(out), bias


class _AttentionLayer(nn.Module):
    config: T5Config
    has_relative_bias: bool

    @nn.compact
    def __call__(self, x, bias, mask):
        h, bias = SelfAttention(self.config, self.has_relative_bias, name="SelfAttention")(
            RMSNorm(self.config.layer_norm_epsilon, name="layer_norm")(x), bias, mask
        )
        return x + h, bias


class _DenseGatedGeluDense(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = nn.gelu(nn.Dense(cfg.d_ff, use_bias=False, name="wi_0")(x), approximate=True)
        return nn.Dense(cfg.d_model, use_bias=False, name="wo")(gate * nn.Dense(cfg.d_ff, use_bias=False, name="wi_1")(x))


class _FFLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x):
        return x + _DenseGatedGeluDense(self.config, name="DenseReluDense")(
            RMSNorm(self.config.layer_norm_epsilon, name="layer_norm")(x)
        )


class _Block(nn.Module):
    config: T5Config
    has_relative_bias: bool

    @nn.compact
    def __call__(self, x, bias, mask):
        x, bias = _AttentionLayer(self.config, self.has_relative_bias, name="layer_0")(x, bias, mask)
        return _FFLayer(self.config, name="layer_1")(x), bias


class _Stack(nn.Module):
    config: T5Config
    taps: tuple[int | str, ...] = ()

    @nn.compact
    def __call__(self, h, mask):
        bias = None
        for i in range(self.config.num_layers):
            h, bias = _Block(self.config, i == 0, name=f"block_{i}")(h, bias, mask)
            if i in self.taps:
                self.sow("intermediates", f"tap:{i}", h)
        return RMSNorm(self.config.layer_norm_epsilon, name="final_layer_norm")(h)


class T5EncoderModel(nn.Module):
    """``input_ids`` (B, L) [+ attention mask] -> last hidden state (B, L, d_model)."""

    config: T5Config
    taps: tuple[int | str, ...] = ()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        h = nn.Embed(self.config.vocab_size, self.config.d_model, name="shared")(input_ids)
        if "embeddings" in self.taps:
            self.sow("intermediates", "tap:embeddings", h)
        return _Stack(self.config, self.taps, name="encoder")(h, attention_mask)


def t5_taps(state) -> dict:
    """{"embeddings" | block index: array} from the ``intermediates`` of an ``apply``."""
    inter = state.get("intermediates", {})
    out = {}
    if "tap:embeddings" in inter:
        out["embeddings"] = inter["tap:embeddings"][0]
    for k, v in inter.get("encoder", {}).items():
        out[int(k.split(":")[1])] = v[0]
    return out


class T5TextEncoder:
    """Host-side prompt -> (max_length, d_model) embeddings: a tokenizer plus the jitted Flax encoder.

    ``tokenizer`` is anything with ``__call__(text) -> {"input_ids": ...}`` (a transformers tokenizer loaded
    from the checkpoint's ``tokenizer/`` folder, or :class:`ByteTokenizer` for the tiny demo). As CogVideoX's
    pipeline: padded to ``max_length``, truncated, EOS appended.

    With ``with_mask`` (Open-Sora) the encoder runs with the attention mask and the call returns
    ``(embeddings, mask)``; without it (CogVideoX) padding tokens are encoded as real tokens.
    """

    def __init__(self, config: T5Config, params, tokenizer, max_length: int, *, with_mask: bool = False):
        self.config, self.params, self.tokenizer, self.max_length = config, params, tokenizer, max_length
        self.with_mask = with_mask
        model = T5EncoderModel(config)
        self._apply = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))

    def tokens(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, attention mask), each (max_length,)."""
        out = self.tokenizer(
            prompt, padding="max_length", max_length=self.max_length, truncation=True, add_special_tokens=True
        )
        ids = np.asarray(out["input_ids"], np.int32)
        mask = np.asarray(out["attention_mask"], np.int32) if "attention_mask" in out else (ids != self.config.pad_token_id)
        return ids, np.asarray(mask, np.int32)

    def __call__(self, prompt: str):
        ids, mask = self.tokens(prompt)
        emb = np.asarray(self._apply(self.params, ids[None], mask[None] if self.with_mask else None)[0])
        return (emb, mask.astype(bool)) if self.with_mask else emb


class ByteTokenizer:
    """A network-free stand-in tokenizer for tiny demo models: UTF-8 bytes -> ids, EOS, padding.

    Ids are ``2 + byte % (vocab - 2)``; ``1`` is EOS and ``0`` pad, as in T5. Not a real vocabulary.
    """

    def __init__(self, vocab_size: int, pad_id: int = 0, eos_id: int = 1):
        self.vocab_size, self.pad_id, self.eos_id = vocab_size, pad_id, eos_id

    def __call__(self, text, padding="max_length", max_length=226, truncation=True, add_special_tokens=True):
        ids = [2 + b % (self.vocab_size - 2) for b in text.encode()][: max_length - 1] + [self.eos_id]
        pad = max_length - len(ids)
        return {"input_ids": ids + [self.pad_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad}


def abstract_params(config: T5Config) -> dict:
    """The encoder's parameter tree as ShapeDtypeStructs (no allocation, no compile)."""
    return jax.eval_shape(T5EncoderModel(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


def converted_text_encoder(path: Path, config: T5Config, params, max_length: int, *, with_mask: bool) -> T5TextEncoder:
    """The text encoder of a converted-weights folder: its T5 parameters and its ``tokenizer/`` folder."""
    if not (Path(path) / "tokenizer").is_dir():
        raise UserError(f"{path}: has a text encoder but no tokenizer/ folder")
    return T5TextEncoder(config, params, load_tokenizer(Path(path) / "tokenizer"), max_length, with_mask=with_mask)


def load_tokenizer(path: str | Path):
    """A T5 tokenizer from a local folder (``tokenizer/`` of a diffusers checkpoint); never the network.

    The folder needs its vocabulary: ``spiece.model`` (SentencePiece; read with the ``sentencepiece`` package, as
    CogVideoX's and DeepFloyd's T5 folders ship it) or ``tokenizer.json``. Without either, transformers would
    build an empty vocabulary that turns every word into ``<unk>``, without a word of warning.
    """
    path = Path(path)
    has_spiece, has_json = (path / "spiece.model").is_file(), (path / "tokenizer.json").is_file()
    if not (has_spiece or has_json):
        raise UserError(f"{path}: no T5 vocabulary in the tokenizer folder (spiece.model or tokenizer.json)")
    if has_spiece and not has_json and importlib.util.find_spec("sentencepiece") is None:
        raise UserError(f"{path}: reading spiece.model needs the sentencepiece package (pip install sentencepiece)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad folder
        raise UserError(f"cannot load the T5 tokenizer from {path}: {e}") from None
