"""CogVideoX-5B-I2V and CogVideoX1.5-5B-I2V: Flax ports, the I2V adapter, and registry entries."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from anti_i2v_jax.backbones.cogvideox import config as configs
from anti_i2v_jax.backbones.cogvideox.backbone import (
    CogVideoXBackbone,
    abstract_params,
    init_params,
)
from anti_i2v_jax.backbones.registry import BackboneSpec, register
from anti_i2v_jax.configs import read_json
from anti_i2v_jax.errors import UserError

TINY_T5 = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=80, num_layers=2, num_heads=4)


def tiny_backbone(seed: int = 0) -> CogVideoXBackbone:
    """``cogvideox-tiny``: the tiny config with seeded random weights and a tiny random T5 over UTF-8 bytes.

    A pipeline demo: it exercises every part of the attack in seconds and gives no real protection. It has
    RoPE without the learned position table (as CogVideoX-5B text-to-video), so that it runs at any geometry
    (``--frames/--height/--width``); the table of 5b-I2V fixes its size and is checked against diffusers.
    """
    from anti_i2v_jax.backbones.text.t5 import (
        ByteTokenizer,
        T5Config,
        T5EncoderModel,
        T5TextEncoder,
    )
    from anti_i2v_jax.nn.init import seeded_params

    config = configs.tiny(use_learned_positional_embeddings=False)
    t5 = T5Config(**TINY_T5)
    t5_params = seeded_params(
        jax.eval_shape(T5EncoderModel(t5).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"], seed + 1
    )
    text = T5TextEncoder(t5, t5_params, ByteTokenizer(t5.vocab_size), config.transformer.max_text_seq_length)
    return CogVideoXBackbone(name="cogvideox-tiny", config=config, params=init_params(config, seed), text_encoder=text)


def real_size_execution(config: configs.CogVideoXConfig) -> configs.CogVideoXConfig:
    """The execution switches of a real-size run: the 42 blocks scanned and rematerialised."""
    return CogVideoXBackbone.with_execution(config, scan_layers=True, remat=True)


def abstract_backbone(config: configs.CogVideoXConfig, name: str) -> CogVideoXBackbone:
    """The adapter of ``config`` (with the real-size execution switches) over ShapeDtypeStruct parameters."""
    config = real_size_execution(config)
    return CogVideoXBackbone(name=name, config=config, params=abstract_params(config))


def load_converted(path: str | Path, name: str | None = None, expect_variant: str | None = None) -> CogVideoXBackbone:
    """A backbone from a folder written by ``python -m weights_convert cogvideox``."""
    from anti_i2v_jax.backbones.base import restore_converted
    from anti_i2v_jax.backbones.text import t5 as t5_lib

    path = Path(path).expanduser().absolute()
    raw = read_json(path / "config.json")
    config, t5_raw, variant = configs.config_from_json(raw, str(path / "config.json"))
    if expect_variant is not None and variant != expect_variant:
        raise UserError(f"{path} holds {variant} weights, not {expect_variant}; use --backbone {variant}")
    abstract = abstract_params(config)
    t5 = None
    if t5_raw is not None:
        t5 = t5_lib.T5Config(**t5_raw)
        abstract["text_encoder"] = t5_lib.abstract_params(t5)
    dtype = jnp.bfloat16 if raw.get("dtype") == "bfloat16" else jnp.float32
    params = restore_converted(path, abstract, dtype)
    text = None
    if t5 is not None:
        text = t5_lib.converted_text_encoder(
            path, t5, params["text_encoder"], config.transformer.max_text_seq_length, with_mask=False
        )
    # A real-size run scans and rematerialises the block stack: stack the (looped) converted blocks once.
    from anti_i2v_jax.backbones.cogvideox.transformer import stack_blocks

    params["transformer"] = stack_blocks(params["transformer"], config.transformer.num_layers)
    return CogVideoXBackbone(
        name=name or variant, config=real_size_execution(config),
        params={k: params[k] for k in ("vae", "transformer")}, text_encoder=text
    )


register(BackboneSpec(
    name="cogvideox-tiny",
    summary="tiny CogVideoX-I2V with seeded random weights: a pipeline demo, no real protection",
    needs_weights=False,
    load=lambda weights: tiny_backbone(),
))
register(BackboneSpec(
    name="cogvideox-5b-i2v",
    summary="THUDM/CogVideoX-5b-I2V (49 x 480 x 720)",
    needs_weights=True,
    load=lambda weights: load_converted(weights, "cogvideox-5b-i2v", "cogvideox-5b-i2v"),
    abstract=lambda: abstract_backbone(configs.cogvideox_5b_i2v(), "cogvideox-5b-i2v"),
))
register(BackboneSpec(
    name="cogvideox1.5-5b-i2v",
    summary="THUDM/CogVideoX1.5-5B-I2V (81 frames)",
    needs_weights=True,
    load=lambda weights: load_converted(weights, "cogvideox1.5-5b-i2v", "cogvideox1.5-5b-i2v"),
    abstract=lambda: abstract_backbone(configs.cogvideox15_5b_i2v(), "cogvideox1.5-5b-i2v"),
))

__all__ = ["CogVideoXBackbone", "abstract_params", "init_params", "load_converted", "tiny_backbone"]
