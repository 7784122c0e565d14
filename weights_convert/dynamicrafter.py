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
