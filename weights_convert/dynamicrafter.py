"""DynamiCrafter: Lightning ``model.ckpt`` (or the same tensors as safetensors) -> orbax + config.json.

So far: the first-stage KL autoencoder (LDM key names) onto the shared diffusers-layout Flax
``AutoencoderKL``; the U-Net, OpenCLIP towers and Resampler tables come with their ports.
"""

from __future__ import annotations

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
    """OpenCLIP vision tower as the V2 image embedder uses it; the text parts, ln_post and proj are unused."""
    p = prefix.replace(".", r"\.")
    unused = [rf"{p}visual\.ln_post\..*", rf"{p}visual\.proj", rf"{p}token_embedding\.weight",
              rf"{p}positional_embedding", rf"{p}ln_final\..*", rf"{p}text_projection", rf"{p}logit_scale",
              rf"{p}transformer\..*"]
    return [Rule(rf"{p}visual\..*", TORCH, sub=(rf"^{p}visual\.", ""))], unused


UNET_RULES = [
    # init_attn projects with kernel-1 Conv1d layers upstream, Dense layers here
    Rule(r"model\.diffusion_model\.init_attn\.0\.proj_(in|out)\.weight", TORCH, "conv1d_k1_linear",
         sub=(r"^model\.diffusion_model\.", "")),
    Rule(r"model\.diffusion_model\..*", TORCH, sub=(r"^model\.diffusion_model\.", "")),
]
