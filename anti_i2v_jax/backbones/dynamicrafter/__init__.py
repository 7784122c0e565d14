"""DynamiCrafter (256 / 512 / 1024): Flax ports, the I2V adapter, registry entries."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from anti_i2v_jax.backbones.dynamicrafter.backbone import (
    ByteTokenizer,
    DynamiCrafterBackbone,
    abstract_params,
    init_params,
)
from anti_i2v_jax.backbones.dynamicrafter.config import (
    DynamiCrafterConfig,
    from_yaml,
    released,
    tiny,
)
from anti_i2v_jax.backbones.registry import BackboneSpec, register
from anti_i2v_jax.errors import UserError


def tiny_backbone(seed: int = 0) -> DynamiCrafterBackbone:
    """``dynamicrafter-tiny``: seeded random weights and a byte-level stand-in tokenizer; a pipeline demo."""
    config = tiny()
    tok = ByteTokenizer(config.text.vocab_size, config.text_start_id, config.text_end_id, config.text.context_length)
    return DynamiCrafterBackbone(name="dynamicrafter-tiny", config=config, params=init_params(config, seed), tokenizer=tok)


def real_size_execution(config: DynamiCrafterConfig) -> DynamiCrafterConfig:
    """The execution switches of a real-size run: every ResBlock and transformer rematerialised, the CLIP image
    tower's blocks scanned (its parameters in the stacked layout: :func:`scan_layout`)."""
    config = DynamiCrafterBackbone.with_execution(config, remat=True)
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, scan_layers=True))


def scan_layout(params: dict, config: DynamiCrafterConfig) -> dict:
    """Converted (looped) parameters -> the layout ``config``'s execution switches expect."""
    if not config.vision.scan_layers or "resblocks" in params["clip_image"]["transformer"]:
        return params
    from anti_i2v_jax.nn.clip import stack_resblocks

    clip = dict(params["clip_image"])
    clip["transformer"] = stack_resblocks(clip["transformer"], config.vision.layers)
    return {**params, "clip_image": clip}


def abstract_backbone(config: DynamiCrafterConfig, name: str) -> DynamiCrafterBackbone:
    """The adapter of ``config`` (with the real-size execution switches) over ShapeDtypeStruct parameters."""
    config = real_size_execution(config)
    return DynamiCrafterBackbone(name=name, config=config, params=abstract_params(config))


def load_converted(path: str | Path, name: str) -> DynamiCrafterBackbone:
    """A backbone from a folder written by ``python -m weights_convert dynamicrafter``."""
    import jax.numpy as jnp
    import yaml

    from anti_i2v_jax.backbones.base import restore_converted
    from anti_i2v_jax.configs import read_json

    path = Path(path).expanduser().absolute()
    meta = read_json(path / "config.json")
    if meta.get("backbone") != "dynamicrafter":
        raise UserError(f"{path}: converted weights of {meta.get('backbone')!r}, not dynamicrafter")
    config = from_yaml(yaml.safe_load((path / "config.yaml").read_text()), str(path / "config.yaml"))
    dtype = jnp.bfloat16 if meta.get("dtype") == "bfloat16" else jnp.float32
    abstract = abstract_params(config)
    if not (path / "params" / "clip_head").is_dir():  # converted before the CLIP image head was kept
        del abstract["clip_head"]
    params = restore_converted(path, abstract, dtype)
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from anti_i2v_jax.backbones.text.openclip_tokenizer import OpenCLIPTokenizer

        tokenizer = OpenCLIPTokenizer(path / "tokenizer", config.text.context_length)
    config = real_size_execution(config)
    return DynamiCrafterBackbone(name=name, config=config, params=scan_layout(params, config), tokenizer=tokenizer)


register(BackboneSpec(
    name="dynamicrafter-tiny",
    summary="tiny DynamiCrafter with seeded random weights: a pipeline demo, no real protection",
    needs_weights=False,
    load=lambda weights: tiny_backbone(),
))
for _res, _summary in (("256", "Doubiiu/DynamiCrafter (256x256, eps)"), ("512", "Doubiiu/DynamiCrafter_512 (320x512, v)"),
                       ("1024", "Doubiiu/DynamiCrafter_1024 (576x1024, v)")):
    register(BackboneSpec(
        name=f"dynamicrafter-{_res}",
        summary=_summary,
        needs_weights=True,
        load=lambda weights, _n=f"dynamicrafter-{_res}": load_converted(weights, _n),
        abstract=lambda _n=f"dynamicrafter-{_res}", _r=int(_res): abstract_backbone(released(_r), _n),
    ))

__all__ = ["DynamiCrafterBackbone", "DynamiCrafterConfig", "abstract_params", "from_yaml", "init_params",
           "load_converted", "tiny_backbone"]
