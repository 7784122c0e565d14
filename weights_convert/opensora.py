"""Open-Sora 1.2: the Hugging Face checkpoints hpcai-tech/OpenSora-STDiT-v3 and hpcai-tech/OpenSora-VAE-v1.2
(each ``config.json`` + ``model.safetensors``) [+ the T5 v1.1 XXL encoder] -> orbax + config.json.

Rule tables: STDiT3 keys rename generically (``spatial_blocks.3.attn.qkv.weight`` ->
``spatial_blocks_3/attn/qkv/kernel``); the VAE's ``spatial_vae.module.`` prefix drops ``module``;
``rope.freqs`` and the VAE's ``shift``/``scale`` are fixed values that are checked, not stored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from anti_i2v_jax.backbones.opensora.backbone import OpenSoraConfig, abstract_params
from anti_i2v_jax.backbones.opensora.stdit3 import STDiT3Config
from anti_i2v_jax.backbones.opensora.vae import TemporalVAEConfig, VideoVAEConfig
from anti_i2v_jax.backbones.text.t5 import T5Config
from anti_i2v_jax.configs import read_json
from anti_i2v_jax.errors import UserError
from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKLConfig
from weights_convert.cogvideox import (
    T5_IGNORED,
    T5_RULES,
    check_destination,
    t5_abstract,
    write_atomically,
)
from weights_convert.core import TORCH, Report, Rule, SafetensorsSource, convert

STDIT_RULES = [Rule(r".*", TORCH)]
STDIT_IGNORED = [r"rope\.freqs"]  # RotaryEmbedding's fixed frequencies: checked against the formula below
VAE_RULES = [
    Rule(r"spatial_vae\.module\..*", TORCH, sub=(r"^spatial_vae\.module\.", "spatial_vae.")),
    Rule(r"temporal_vae\..*", TORCH),
]
VAE_IGNORED = [r"shift", r"scale"]  # the latent normalisation: checked against the config

VAE_CONFIG_IGNORED = frozenset(
    {"architectures", "model_type", "torch_dtype", "transformers_version", "cal_loss", "freeze_vae_2d",
     "from_pretrained", "vae_2d"}
)

# PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (the SDXL VAE Open-Sora 1.2 builds its spatial VAE from)
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32)


def read_configs(stdit_dir: Path, vae_dir: Path) -> OpenSoraConfig:
    """The stack's config from the two HF folders; unknown keys are errors."""
    stdit = STDiT3Config.from_hf(read_json(stdit_dir / "config.json"), f"{stdit_dir}/config.json")
    raw = read_json(vae_dir / "config.json")
    where = f"{vae_dir}/config.json"
    unknown = sorted(set(raw) - VAE_CONFIG_IGNORED - {"micro_frame_size", "shift", "scale", "vae_temporal",
                                                       "vae_2d_diffusers_config"} - {k for k in raw if k.startswith("_")})
    if unknown:
        raise UserError(f"{where}: unknown config keys {unknown}")
    # The real config names the spatial VAE by hub id; a saved diffusers config may be given inline.
    spatial_raw = raw.get("vae_2d_diffusers_config") or SDXL_VAE
    vae = VideoVAEConfig(
        spatial=AutoencoderKLConfig.from_diffusers(spatial_raw, where + "[vae_2d]"),
        temporal=TemporalVAEConfig.from_opensora(raw.get("vae_temporal", {"type": "VAE_Temporal_SD"}), where),
        micro_frame_size=raw.get("micro_frame_size", 17),
        shift=tuple(raw.get("shift", VideoVAEConfig().shift)),
        scale=tuple(raw.get("scale", VideoVAEConfig().scale)),
    )
    return OpenSoraConfig(stdit=stdit, vae=vae)


def _check_fixed(source, config: OpenSoraConfig, what: str) -> None:
    """Values the model recomputes instead of storing must equal what the checkpoint holds."""
    keys = set(source.keys())
    if "rope.freqs" in keys:
        want = 1.0 / (10000 ** (np.arange(0, config.stdit.head_dim, 2, dtype=np.float32)[: config.stdit.head_dim // 2]
                                / config.stdit.head_dim))
        if not np.allclose(np.asarray(source.load("rope.freqs"), np.float32), want, rtol=1e-6):
            raise UserError(f"{what}: rope.freqs differ from RotaryEmbedding({config.stdit.head_dim})")
    for name in ("shift", "scale"):
        if name in keys:
            got = np.asarray(source.load(name), np.float32).reshape(-1)
            if not np.allclose(got, getattr(config.vae, name), rtol=1e-6):
                raise UserError(f"{what}: {name} {got.tolist()} differs from the config's {getattr(config.vae, name)}")


def components(stdit_dir: Path, vae_dir: Path, t5_dir: Path | None, config: OpenSoraConfig, t5: T5Config | None):
    abstract = abstract_params(config)
    parts = [
        ("stdit", SafetensorsSource(stdit_dir, stem="model"), STDIT_RULES, abstract["stdit"], STDIT_IGNORED),
        ("vae", SafetensorsSource(vae_dir, stem="model"), VAE_RULES, abstract["vae"], VAE_IGNORED),
    ]
    if t5_dir is not None and t5 is not None:
        parts.append(("text_encoder", SafetensorsSource(t5_dir), T5_RULES, t5_abstract(t5), T5_IGNORED))
    return parts


def load(stdit_dir, vae_dir, t5_dir=None, *, dtype: Any = None, dry_run: bool = False):
    """Read and check the checkpoints: (config, t5 config, params or None, reports)."""
    stdit_dir, vae_dir = Path(stdit_dir), Path(vae_dir)
    config = read_configs(stdit_dir, vae_dir)
    t5 = None
    if t5_dir is not None:
        t5_dir = Path(t5_dir)
        t5 = T5Config.from_transformers(read_json(t5_dir / "config.json"), f"{t5_dir}/config.json")
    params, reports = {}, {}
    for name, source, rules, abstract, ignore in components(stdit_dir, vae_dir, t5_dir, config, t5):
        if not dry_run:
            _check_fixed(source, config, str(source.path))
        params[name], reports[name] = convert(source, rules, abstract, ignore=ignore, dtype=dtype,
                                              dry_run=dry_run, what=str(source.path))
    return config, t5, (None if dry_run else params), reports


def config_to_json(config: OpenSoraConfig, t5: T5Config | None, dtype: str) -> dict:
    import dataclasses

    return {
        "backbone": "opensora",
        "variant": "opensora-1.2",
        "dtype": dtype,
        "stdit": dataclasses.asdict(config.stdit),
        "vae": dataclasses.asdict(config.vae),
        "text_encoder": dataclasses.asdict(t5) if t5 is not None else None,
    }


def run(stdit_dir: Path, vae_dir: Path, t5_dir: Path | None, dst: Path | None, dtype: str, dry_run: bool) -> int:
    """``python -m weights_convert opensora``: check everything, then convert one component at a time."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    if not dry_run:
        check_destination(dst)
    config, t5, _, reports = load(stdit_dir, vae_dir, t5_dir, dry_run=True)
    total = Report(mapped=sum(r.mapped for r in reports.values()), ignored=sum(r.ignored for r in reports.values()),
                   missing=[], unexpected=[], mismatched=[])
    if dry_run:
        print(total.summary())
        return 0

    def write(tmp: Path) -> None:
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        for name, source, rules, abstract, ignore in components(Path(stdit_dir), Path(vae_dir),
                                                               None if t5_dir is None else Path(t5_dir), config, t5):
            _check_fixed(source, config, str(source.path))
            params, _ = convert(source, rules, abstract, ignore=ignore, dtype=np_dtype, what=str(source.path))
            checkpointer.save(tmp / "params" / name, params)
            checkpointer.wait_until_finished()
            del params
        if t5_dir is not None:
            for folder in ("tokenizer", "../tokenizer"):
                if (Path(t5_dir) / folder).is_dir():
                    shutil.copytree(Path(t5_dir) / folder, tmp / "tokenizer")
                    break
        (tmp / "config.json").write_text(json.dumps(config_to_json(config, t5, dtype), indent=2) + "\n")

    write_atomically(dst, write)
    print(f"{total.summary()}; wrote {dst}")
    return 0


__all__ = ["load", "read_configs", "run"]
