"""DynamiCrafter: Lightning ``model.ckpt`` (or the same tensors as ``model.safetensors``) + ``config.yaml``
-> orbax (``params/<part>``) + config.json + the config.yaml.

One rule table over the whole checkpoint (so every tensor is either used, or a listed fixed buffer / unused
tower part): the U-Net (``model.diffusion_model.``), the first-stage KL-VAE (LDM names onto the shared
diffusers-layout Flax ``AutoencoderKL``), the OpenCLIP text tower (``cond_stage_model.``), the ViT image tower
(``embedder.``) and the Resampler (``image_proj_model.``). The 256 checkpoint's ``framestride_embed.*`` are
the U-Net's ``fps_embedding``. The schedule buffers are recomputed and checked, not stored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from anti_i2v_jax.errors import UserError
from weights_convert.core import TORCH, Rule


def ldm_vae_rules(num_levels: int, prefix: str = "first_stage_model.") -> list[Rule]:
    """LDM ``AutoencoderKL`` names (``encoder.down.i.block.j``, ``mid.attn_1``, ``decoder.up.i`` in reverse
    order, ``nin_shortcut``) -> the diffusers-style names of ``anti_i2v_jax.nn.autoencoder_kl``."""
    p = prefix.replace(".", r"\.")
    subs = [
        (rf"^{p}", ""),
        (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
        (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
        *[(rf"\.up\.{i}\.block\.", f".up_blocks.{num_levels - 1 - i}.resnets.") for i in range(num_levels)],
        *[(rf"\.up\.{i}\.upsample\.", f".up_blocks.{num_levels - 1 - i}.upsamplers.0.") for i in range(num_levels)],
        (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
        (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"\.norm_out\.", ".conv_norm_out."),
    ]
    return [
        # the single-head attention's q/k/v/proj_out are 1x1 convolutions upstream, Dense layers here
        Rule(rf"{p}.*\.mid\.attn_1\.(q|k|v|proj_out)\.weight", TORCH, "conv1x1_linear", sub=tuple(subs)),
        Rule(rf"{p}.*", TORCH, sub=tuple(subs)),
    ]


RESAMPLER_RULES = [
    Rule(
        r"image_proj_model\..*",
        TORCH,
        sub=(
            (r"^image_proj_model\.", ""),
            (r"^layers\.(\d+)\.0\.", r"layers_\1.attn."),
            (r"^layers\.(\d+)\.1\.0\.", r"layers_\1.ff.norm."),
            (r"^layers\.(\d+)\.1\.1\.", r"layers_\1.ff.fc1."),
            (r"^layers\.(\d+)\.1\.3\.", r"layers_\1.ff.fc2."),
        ),
    )
]


def clip_text_rules(layers: int, skip_last: int = 1, prefix: str = "cond_stage_model.model.") -> tuple[list[Rule], list[str]]:
    """OpenCLIP text tower (penultimate): rules, and the keys that exist upstream but are not used."""
    p = prefix.replace(".", r"\.")
    unused = [rf"{p}transformer\.resblocks\.{i}\..*" for i in range(layers - skip_last, layers)]
    unused += [rf"{p}text_projection", rf"{p}logit_scale"]
    rules = [
        Rule(rf"{p}token_embedding\.weight", "token_embedding/embedding"),
        Rule(rf"{p}.*", TORCH, sub=(rf"^{p}", "")),
    ]
    return rules, unused


def clip_vision_rules(prefix: str = "embedder.model.") -> tuple[list[Rule], list[str]]:
    """OpenCLIP vision tower as the V2 image embedder uses it (the text parts are unused). Its ``ln_post`` and
    ``proj``, which DynamiCrafter never runs, are kept apart (:func:`clip_head_rules`)."""
    p = prefix.replace(".", r"\.")
    unused = [rf"{p}token_embedding\.weight", rf"{p}positional_embedding", rf"{p}ln_final\..*",
              rf"{p}text_projection", rf"{p}logit_scale", rf"{p}transformer\..*"]
    head = rf"{p}visual\.(ln_post\..*|proj)"
    return [Rule(rf"(?!{head}$){p}visual\..*", TORCH, sub=(rf"^{p}visual\.", ""))], unused


def clip_head_rules(prefix: str = "embedder.model.") -> list[Rule]:
    """The image tower's ``ln_post`` and ``proj`` (``x @ proj``, kept as stored): the projected CLIP image embedding
    of the attack's CLIP terms (``ImageHead``)."""
    p = prefix.replace(".", r"\.")
    return [Rule(rf"{p}visual\.ln_post\.weight", "ln_post/scale"), Rule(rf"{p}visual\.ln_post\.bias", "ln_post/bias"),
            Rule(rf"{p}visual\.proj", "proj")]


UNET_RULES = [
    # init_attn projects with kernel-1 Conv1d layers upstream, Dense layers here
    Rule(r"model\.diffusion_model\.init_attn\.0\.proj_(in|out)\.weight", TORCH, "conv1d_k1_linear",
         sub=(r"^model\.diffusion_model\.", "")),
    Rule(r"model\.diffusion_model\..*", TORCH,
         sub=((r"^model\.diffusion_model\.", ""), (r"^framestride_embed\.", "fps_embedding."))),
]

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "scale_arr", "logvar",
)


def _prefixed(rules: list[Rule], part: str) -> list[Rule]:
    """The same rules with the component name prepended to every target path."""
    out = []
    for r in rules:
        subs = r.sub or ()
        if subs and isinstance(subs[0], str):
            subs = (subs,)
        if r.target == TORCH:
            out.append(Rule(r.pattern, TORCH, r.transform, sub=(*subs, (r"^", f"{part}."))))
        else:
            out.append(Rule(r.pattern, f"{part}/{r.target}", r.transform, sub=r.sub))
    return out


def rules_for(config) -> tuple[list[Rule], list[str]]:
    """Every rule of a DynamiCrafter checkpoint for ``config``, and the patterns of its unused keys."""
    text_rules, text_unused = clip_text_rules(config.text.layers)
    vision_rules, vision_unused = clip_vision_rules()
    # The VAE's LDM renames run on the key without the component prefix, which _prefixed adds at the end.
    rules = (
        _prefixed(UNET_RULES, "unet")
        + _prefixed(ldm_vae_rules(len(config.vae.block_out_channels)), "vae")
        + _prefixed(text_rules, "clip_text")
        + _prefixed(vision_rules, "clip_image")
        + _prefixed(clip_head_rules(), "clip_head")
        + _prefixed(RESAMPLER_RULES, "resampler")
    )
    return rules, [*text_unused, *vision_unused, *(rf"{b}" for b in SCHEDULE_BUFFERS)]


def _check_schedule(source, config, what: str) -> None:
    from anti_i2v_jax.backbones.dynamicrafter.diffusion import schedule

    tables = schedule(config.diffusion)
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        if name in source.keys():
            got = np.asarray(source.load(name), np.float32)
            want = tables[name][: got.shape[0]]
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=1e-7):
                raise UserError(f"{what}: the checkpoint's {name} differs from the schedule config.yaml describes")


def checkpoint_source(src: Path):
    """A ``.safetensors`` file by its header, anything else as a PyTorch checkpoint."""
    from weights_convert.core import SafetensorsSource, TorchCheckpointSource

    src = Path(src)
    return SafetensorsSource(src) if src.suffix == ".safetensors" else TorchCheckpointSource(src)


def read_yaml(path) -> dict:
    """A DynamiCrafter config.yaml as a dict with ``model.params``, or one clear UserError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "params" not in raw["model"]:
        raise UserError(f"{path}: not a DynamiCrafter inference config (expected model.params, as in "
                        f"configs/inference_512_v1.0.yaml)")
    return raw


def load(src, config_yaml, *, dtype=None, dry_run: bool = False):
    """Read and check a checkpoint against its config: (config, params or None, report)."""

    from anti_i2v_jax.backbones.dynamicrafter import abstract_params, from_yaml
    from weights_convert.core import convert

    try:
        config = from_yaml(read_yaml(config_yaml), str(config_yaml))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{config_yaml}: malformed DynamiCrafter config ({type(e).__name__}: {e})") from None
    source = checkpoint_source(src)
    rules, unused = rules_for(config)
    if not dry_run:
        _check_schedule(source, config, str(src))
    params, report = convert(source, rules, abstract_params(config), ignore=unused, dtype=dtype, dry_run=dry_run,
                             what=str(src))
    return config, params, report


def tokenizer_files(source: Path) -> list[Path]:
    """The vocabulary files of a CLIP BPE tokenizer to keep with the weights: open_clip's
    ``bpe_simple_vocab_16e6.txt.gz`` (the file, or a folder holding it, e.g. the open_clip package folder) or a
    folder's ``vocab.json`` + ``merges.txt``. The tokenizer is built once here, so a bad vocabulary fails early."""
    from anti_i2v_jax.backbones.text.openclip_tokenizer import (
        VOCAB_NAME,
        OpenCLIPTokenizer,
    )

    source = Path(source).expanduser()
    OpenCLIPTokenizer(source)  # UserError naming the problem
    if source.is_file():
        return [source]
    if (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
        return [source / "vocab.json", source / "merges.txt"]
    return [source / VOCAB_NAME]


def run(src: Path, config_yaml: Path, dst: Path | None, dtype: str, dry_run: bool, tokenizer: Path | None = None) -> int:
    """``python -m weights_convert dynamicrafter``."""
    import ml_dtypes

    from weights_convert.cogvideox import check_destination, write_atomically

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    vocab = tokenizer_files(tokenizer) if tokenizer is not None else []  # a bad vocabulary fails before any work
    if not dry_run:
        check_destination(dst)
    _, _, report = load(src, config_yaml, dry_run=True)
    if dry_run:
        print(report.summary())
        return 0
    _, params, report = load(src, config_yaml, dtype=np_dtype)

    def write(tmp: Path) -> None:
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        for part, tree in params.items():
            checkpointer.save(tmp / "params" / part, tree)
            checkpointer.wait_until_finished()
        shutil.copyfile(config_yaml, tmp / "config.yaml")
        if vocab:
            (tmp / "tokenizer").mkdir()
            for f in vocab:
                shutil.copyfile(f, tmp / "tokenizer" / f.name)
        meta = {"backbone": "dynamicrafter", "dtype": dtype, "source": Path(src).name}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    write_atomically(dst, write)
    print(f"{report.summary()}; wrote {dst}")
    return 0



