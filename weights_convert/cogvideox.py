"""CogVideoX-I2V: diffusers folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/) -> orbax.

Rule tables: every upstream key is renamed generically (``transformer_blocks.3.attn1.to_q.weight`` ->
``transformer_blocks_3/attn1/to_q/kernel``, Linear transposed, Conv2d/Conv3d moved to channels-last);
the exceptions are listed explicitly (position table, embedding tables, T5's tied embedding copy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from anti_i2v_jax.backbones.cogvideox.config import (
    CogVideoXConfig,
    SchedulerConfig,
    TransformerConfig,
    VAEConfig,
    config_to_json,
)
from anti_i2v_jax.backbones.text.t5 import T5Config
from anti_i2v_jax.backbones.text.t5 import abstract_params as t5_abstract
from anti_i2v_jax.configs import read_json
from anti_i2v_jax.errors import UserError
from weights_convert.core import TORCH, Report, Rule, SafetensorsSource, convert

TRANSFORMER_RULES = [
    Rule(r"patch_embed\.pos_embedding", "patch_embed/pos_embedding"),
    Rule(r".*", TORCH),
]
VAE_RULES = [Rule(r".*", TORCH)]
T5_RULES = [
    Rule(r"shared\.weight", "shared/embedding"),
    Rule(
        r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding",
    ),
    Rule(r".*", TORCH),
]
# transformers keeps a tied copy of the embedding under the encoder; the weights are the same tensor.
T5_IGNORED = [r"encoder\.embed_tokens\.weight"]

MODEL_INDEX_IGNORED = frozenset({"_class_name", "_diffusers_version", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"})


def read_configs(src: Path) -> tuple[CogVideoXConfig, T5Config | None]:
    """The stack's configs from a diffusers folder; unknown keys are errors."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: does not exist")
    if not (src / "model_index.json").is_file():
        raise UserError(f"{src}: not a diffusers pipeline folder (no model_index.json)")
    index = read_json(src / "model_index.json")
    if index.get("_class_name") not in ("CogVideoXImageToVideoPipeline", None):
        raise UserError(f"{src}: model_index.json is a {index.get('_class_name')}, expected CogVideoXImageToVideoPipeline")
    transformer = TransformerConfig.from_diffusers(read_json(src / "transformer" / "config.json"), f"{src}/transformer/config.json")
    vae = VAEConfig.from_diffusers(read_json(src / "vae" / "config.json"), f"{src}/vae/config.json")
    sched_path = src / "scheduler" / "scheduler_config.json"
    scheduler = SchedulerConfig.from_diffusers(read_json(sched_path), str(sched_path)) if sched_path.is_file() else SchedulerConfig()
    s = vae.spatial_factor
    if transformer.is_v15:
        # 1.5's sample size (300 x 300 latents) is the RoPE limit, not a resolution; the model card's default is
        # 81 x 768 x 1360 (clipped to the RoPE limit for a smaller model). A run may choose any other geometry.
        cell = s * transformer.patch_size
        most = (transformer.sample_height // transformer.patch_size * cell, transformer.sample_width // transformer.patch_size * cell)
        geometry = dict(num_frames=81, height=min(768, most[0]), width=min(1360, most[1]))
    else:
        geometry = dict(
            num_frames=transformer.sample_frames, height=transformer.sample_height * s, width=transformer.sample_width * s
        )
    config = CogVideoXConfig(transformer=transformer, vae=vae, scheduler=scheduler, **geometry)
    t5 = None
    if (src / "text_encoder" / "config.json").is_file():
        t5 = T5Config.from_transformers(read_json(src / "text_encoder" / "config.json"), f"{src}/text_encoder/config.json")
    return config, t5


def components(src: Path, config: CogVideoXConfig, t5: T5Config | None, with_text: bool = True):
    """(name, source, rules, abstract tree, ignored keys) for each part of the checkpoint."""
    from anti_i2v_jax.backbones.cogvideox.backbone import abstract_params

    abstract = abstract_params(config)
    parts = [
        ("transformer", SafetensorsSource(src / "transformer"), TRANSFORMER_RULES, abstract["transformer"], ()),
        ("vae", SafetensorsSource(src / "vae"), VAE_RULES, abstract["vae"], ()),
    ]
    if t5 is not None and with_text:
        parts.append(("text_encoder", SafetensorsSource(src / "text_encoder"), T5_RULES, t5_abstract(t5), T5_IGNORED))
    return parts


def load_diffusers(src: str | Path, *, dtype: Any = None, dry_run: bool = False, with_text: bool = True):
    """Read and check a diffusers CogVideoX-I2V folder: (config, t5 config, params or None, reports)."""
    src = Path(src)
    config, t5 = read_configs(src)
    params, reports = {}, {}
    for name, source, rules, abstract, ignore in components(src, config, t5, with_text):
        params[name], reports[name] = convert(
            source, rules, abstract, ignore=ignore, dtype=dtype, dry_run=dry_run, what=f"{src}/{name}"
        )
    return config, t5, (None if dry_run else params), reports


def variant_of(config: CogVideoXConfig) -> str:
    return "cogvideox1.5-5b-i2v" if config.transformer.is_v15 else "cogvideox-5b-i2v"


def run(src: Path, dst: Path, dtype: str, dry_run: bool) -> int:
    """``python -m weights_convert cogvideox``: convert (or dry-run) and print a one-line summary.

    Every component is checked (headers only) before anything is written; then each is converted and
    saved on its own, so peak memory is the largest component, not the whole pipeline.
    """
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    src = Path(src)
    if not dry_run:
        check_destination(dst)
    config, t5, _, reports = load_diffusers(src, dry_run=True)
    total = Report(
        mapped=sum(r.mapped for r in reports.values()),
        ignored=sum(r.ignored for r in reports.values()),
        missing=[], unexpected=[], mismatched=[],
    )
    if dry_run:
        print(total.summary())
        return 0

    def write(tmp: Path) -> None:
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        for name, source, rules, abstract, ignore in components(src, config, t5):
            params, _ = convert(source, rules, abstract, ignore=ignore, dtype=np_dtype, what=f"{src}/{name}")
            checkpointer.save(tmp / "params" / name, params)
            checkpointer.wait_until_finished()
            del params
        if (src / "tokenizer").is_dir():
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        (tmp / "config.json").write_text(json.dumps(config_to_json(config, t5, variant_of(config), dtype), indent=2) + "\n")

    write_atomically(dst, write)
    print(f"{total.summary()}; wrote {dst}")
    return 0


def check_destination(dst: Path) -> None:
    """Converted weights go to a new or empty folder: nothing there is ever overwritten."""
    if Path(dst).exists() and any(Path(dst).iterdir()):
        raise UserError(f"{dst}: exists and is not empty; choose a new --dst folder")


def write_atomically(dst: Path, write) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder and rename it to ``dst`` at the end, so an
    interrupted conversion leaves no half checkpoint (and nothing in ``dst``)."""
    import tempfile

    dst = Path(dst).absolute()
    check_destination(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        write(tmp)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
