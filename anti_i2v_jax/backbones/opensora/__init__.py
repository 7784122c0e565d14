"""Open-Sora 1.2 (STDiT3-XL/2 + SDXL VAE + VAE_Temporal_SD + T5): Flax ports, the I2V adapter, registry entries."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from anti_i2v_jax.backbones.opensora.backbone import (
    OpenSoraBackbone,
    OpenSoraConfig,
    abstract_params,
    init_params,
    opensora_v1_2,
    tiny,
)
from anti_i2v_jax.backbones.registry import BackboneSpec, register
from anti_i2v_jax.errors import UserError

TINY_T5 = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=80, num_layers=2, num_heads=4)


def tiny_backbone(seed: int = 0) -> OpenSoraBackbone:
    """``opensora-tiny``: the tiny config with seeded random weights and a tiny random T5 over UTF-8 bytes.

    A pipeline demo: every part of the attack runs in seconds; it gives no real protection.
    """
    from anti_i2v_jax.backbones.text.t5 import (
        ByteTokenizer,
        T5Config,
        T5TextEncoder,
        abstract_params,
    )
    from anti_i2v_jax.nn.init import seeded_params

    config = tiny()
    t5 = T5Config(**TINY_T5)
    text = T5TextEncoder(t5, seeded_params(abstract_params(t5), seed + 1), ByteTokenizer(t5.vocab_size),
                         config.stdit.model_max_length, with_mask=True)
    return OpenSoraBackbone(name="opensora-tiny", config=config, params=init_params(config, seed), text_encoder=text)


def real_size_execution(config: OpenSoraConfig) -> OpenSoraConfig:
    """The execution switches of a real-size run: the 28 block pairs scanned and rematerialised."""
    return OpenSoraBackbone.with_execution(config, scan_layers=True, remat=True)


def abstract_backbone(config: OpenSoraConfig, name: str) -> OpenSoraBackbone:
    """The adapter of ``config`` (with the real-size execution switches) over ShapeDtypeStruct parameters."""
    config = real_size_execution(config)
    return OpenSoraBackbone(name=name, config=config, params=abstract_params(config))


def load_converted(path: str | Path, name: str = "opensora-1.2") -> OpenSoraBackbone:
    """A backbone from a folder written by ``python -m weights_convert opensora`` (T5 needed for prompts)."""
    import dataclasses

    from anti_i2v_jax.backbones.base import restore_converted
    from anti_i2v_jax.backbones.opensora.stdit3 import STDiT3Config
    from anti_i2v_jax.backbones.opensora.vae import TemporalVAEConfig, VideoVAEConfig
    from anti_i2v_jax.backbones.text import t5 as t5_lib
    from anti_i2v_jax.configs import read_json
    from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKLConfig

    path = Path(path).expanduser().absolute()
    raw = read_json(path / "config.json")
    if raw.get("backbone") != "opensora":
        raise UserError(f"{path}: converted weights of {raw.get('backbone')!r}, not opensora")
    tup = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa: E731
    v = raw["vae"]
    config = dataclasses.replace(
        opensora_v1_2(),
        stdit=STDiT3Config(**tup(raw["stdit"])),
        vae=VideoVAEConfig(
            spatial=AutoencoderKLConfig(**tup(v["spatial"])), temporal=TemporalVAEConfig(**tup(v["temporal"])),
            micro_frame_size=v["micro_frame_size"], shift=tuple(v["shift"]), scale=tuple(v["scale"]),
        ),
    )
    abstract = abstract_params(config)
    t5 = t5_lib.T5Config(**raw["text_encoder"]) if raw.get("text_encoder") else None
    if t5 is not None:
        abstract["text_encoder"] = t5_lib.abstract_params(t5)
    dtype = jnp.bfloat16 if raw.get("dtype") == "bfloat16" else jnp.float32
    params = restore_converted(path, abstract, dtype)
    text = None
    if t5 is not None:
        text = t5_lib.converted_text_encoder(path, t5, params.pop("text_encoder"), config.stdit.model_max_length,
                                             with_mask=True)
    # A real-size run scans and rematerialises the block pairs: stack the (looped) converted pairs once.
    from anti_i2v_jax.backbones.opensora.stdit3 import stack_pairs

    params["stdit"] = stack_pairs(params["stdit"], config.stdit.depth)
    return OpenSoraBackbone(name=name, config=real_size_execution(config), params=params, text_encoder=text)


register(BackboneSpec(
    name="opensora-tiny",
    summary="tiny Open-Sora 1.2 with seeded random weights: a pipeline demo, no real protection",
    needs_weights=False,
    load=lambda weights: tiny_backbone(),
))
register(BackboneSpec(
    name="opensora-1.2",
    summary="hpcai-tech/OpenSora-STDiT-v3 + OpenSora-VAE-v1.2 (51 frames at 480p by default)",
    needs_weights=True,
    load=lambda weights: load_converted(weights),
    abstract=lambda: abstract_backbone(opensora_v1_2(), "opensora-1.2"),
))

__all__ = ["OpenSoraBackbone", "OpenSoraConfig", "abstract_params", "init_params", "load_converted", "tiny_backbone"]
