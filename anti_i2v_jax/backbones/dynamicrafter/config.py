"""DynamiCrafter's configuration, parsed strictly from the LDM ``config.yaml`` (``configs/inference_*_v1.0.yaml``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from anti_i2v_jax.backbones.dynamicrafter.diffusion import DiffusionConfig
from anti_i2v_jax.backbones.dynamicrafter.image_encoder import VisionConfig
from anti_i2v_jax.backbones.dynamicrafter.resampler import ResamplerConfig
from anti_i2v_jax.backbones.dynamicrafter.unet import UNetConfig
from anti_i2v_jax.backbones.text.openclip_text import TextConfig
from anti_i2v_jax.configs import parse_config
from anti_i2v_jax.errors import UserError
from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKLConfig

# open_clip ViT-H-14 (model_configs/ViT-H-14.json), the towers DynamiCrafter names by registry id
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

_MODEL_KEYS_IGNORED = frozenset({
    "num_timesteps_cond", "first_stage_key", "cond_stage_key", "cond_stage_trainable", "channels", "use_ema",
    "uncond_type", "scale_by_std", "conditioning_key",
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamiCrafterConfig:
    unet: UNetConfig
    vae: AutoencoderKLConfig
    vision: VisionConfig
    text: TextConfig
    resampler: ResamplerConfig
    diffusion: DiffusionConfig
    latent_size: tuple[int, int] = (40, 64)
    spacing: str = "uniform_trailing"  # DDIM timesteps (256: "uniform")
    guidance_rescale: float = 0.7  # 256: 0.0
    guidance_scale: float = 7.5
    text_start_id: int = 49406
    text_end_id: int = 49407
    # Frames of the run; None: the U-Net's temporal_length (16 for the released models). With another count the
    # image tokens (video_length x 16 from the Resampler) no longer split per frame and every frame attends to all
    # of them, as upstream's UNetModel does.
    num_frames: int | None = None

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def height(self) -> int:
        return self.latent_size[0] * self.vae_factor

    @property
    def width(self) -> int:
        return self.latent_size[1] * self.vae_factor

    @property
    def frames(self) -> int:
        return self.unet.temporal_length if self.num_frames is None else self.num_frames


def _ldm_vae(ddconfig: dict[str, Any], where: str) -> AutoencoderKLConfig:
    if ddconfig.get("attn_resolutions"):
        raise UserError(f"{where}: attention outside the mid block (attn_resolutions) is not supported")
    if not ddconfig.get("double_z", True):
        raise UserError(f"{where}: double_z false is not supported")
    return AutoencoderKLConfig(
        in_channels=ddconfig.get("in_channels", 3),
        out_channels=ddconfig.get("out_ch", 3),
        block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
        layers_per_block=ddconfig["num_res_blocks"],
        latent_channels=ddconfig["z_channels"],
        norm_num_groups=32,
    )


def from_yaml(raw: dict[str, Any], where: str = "config.yaml") -> DynamiCrafterConfig:
    """Parse ``model.params`` of a DynamiCrafter inference config; unknown keys are errors."""
    p = dict(raw["model"]["params"])
    if p.get("conditioning_key", "hybrid") != "hybrid" or p.get("scale_by_std"):
        raise UserError(f"{where}: only hybrid conditioning without scale_by_std is supported")
    known = {"rescale_betas_zero_snr", "parameterization", "linear_start", "linear_end", "timesteps", "image_size",
             "scale_factor", "use_dynamic_rescale", "base_scale", "fps_condition_type", "perframe_ae", "unet_config",
             "first_stage_config", "cond_stage_config", "img_cond_stage_config", "image_proj_stage_config"}
    unknown = sorted(set(p) - known - _MODEL_KEYS_IGNORED)
    if unknown:
        raise UserError(f"{where}: unknown model.params keys {unknown}")
    zero_snr = bool(p.get("rescale_betas_zero_snr", False))
    diffusion = DiffusionConfig(
        timesteps=p.get("timesteps", 1000), linear_start=p.get("linear_start", 0.00085),
        linear_end=p.get("linear_end", 0.012), rescale_betas_zero_snr=zero_snr,
        parameterization=p.get("parameterization", "eps"), use_dynamic_rescale=bool(p.get("use_dynamic_rescale", False)),
        base_scale=p.get("base_scale", 1.0), scale_factor=p.get("scale_factor", 0.18215),
    )
    arch = p["cond_stage_config"]["params"].get("arch") or VIT_H_14
    if p["cond_stage_config"]["params"].get("layer", "penultimate") != "penultimate":
        raise UserError(f"{where}: only the penultimate text layer is supported")
    text = parse_config(TextConfig, arch["text_cfg"], frozenset(), where + "[text_cfg]")
    return DynamiCrafterConfig(
        unet=UNetConfig.from_ldm(p["unet_config"]["params"], where + "[unet_config]"),
        vae=_ldm_vae(p["first_stage_config"]["params"]["ddconfig"], where + "[first_stage_config]"),
        vision=dataclasses.replace(parse_config(VisionConfig, arch["vision_cfg"], frozenset(), where + "[vision_cfg]"),
                                   embed_dim=int(arch.get("embed_dim", 1024))),
        text=text,
        resampler=parse_config(ResamplerConfig, p["image_proj_stage_config"]["params"], frozenset(), where + "[resampler]"),
        diffusion=diffusion,
        latent_size=tuple(p["image_size"]),
        spacing="uniform_trailing" if zero_snr else "uniform",
        guidance_rescale=0.7 if zero_snr else 0.0,
        text_start_id=text.vocab_size - 2,
        text_end_id=text.vocab_size - 1,
    )


def tiny(**overrides: Any) -> DynamiCrafterConfig:
    """A tiny DynamiCrafter-512-shaped stack (64x64 pixels, 4 frames) for demos and tests."""
    unet = UNetConfig(model_channels=32, attention_resolutions=(1,), num_res_blocks=1, channel_mult=(1, 2),
                      num_head_channels=8, context_dim=32, temporal_length=4)
    return DynamiCrafterConfig(
        unet=unet,
        vae=AutoencoderKLConfig(block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=32),
        vision=VisionConfig(layers=2, width=48, head_width=16, embed_dim=24),
        text=TextConfig(vocab_size=1000, width=32, heads=2, layers=3),
        resampler=ResamplerConfig(dim=40, depth=2, dim_head=8, heads=3, num_queries=16, embedding_dim=48,
                                  output_dim=32, ff_mult=2, video_length=4),
        diffusion=DiffusionConfig(),
        latent_size=(16, 16),
        text_start_id=998,
        text_end_id=999,
        **overrides,
    )


def released(resolution: int) -> DynamiCrafterConfig:
    """The released checkpoints' configs (``configs/inference_{256,512,1024}_v1.0.yaml``) without the
    file: 256 (eps, frame stride 3, learnable image-attention scale), 512 and 1024 (v, zero-SNR, fps,
    dynamic rescale). For shape checks and the memory report; converted weights carry their own yaml."""
    if resolution not in (256, 512, 1024):
        raise UserError(f"DynamiCrafter was released at 256, 512 and 1024, not {resolution}")
    unet = dict(in_channels=8, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], dropout=0.1, num_head_channels=64, transformer_depth=1, context_dim=1024,
                use_linear=True, use_checkpoint=True, temporal_conv=True, temporal_attention=True,
                temporal_selfatt_only=True, use_relative_position=False, use_causal_attention=False,
                temporal_length=16, addition_attention=True, image_cross_attention=True, fs_condition=True)
    params = dict(linear_start=0.00085, linear_end=0.012, num_timesteps_cond=1, timesteps=1000,
                  first_stage_key="video", cond_stage_key="caption", cond_stage_trainable=False,
                  conditioning_key="hybrid", channels=4, scale_by_std=False, scale_factor=0.18215, use_ema=False,
                  uncond_type="empty_seq")
    if resolution == 256:
        params.update(image_size=[32, 32])
        unet.update(image_cross_attention_scale_learnable=True, default_fs=3)
    else:
        params.update(rescale_betas_zero_snr=True, parameterization="v", use_dynamic_rescale=True,
                      fps_condition_type="fps", perframe_ae=True,
                      image_size=[40, 64] if resolution == 512 else [72, 128],
                      base_scale=0.7 if resolution == 512 else 0.3)
        unet.update(default_fs=24 if resolution == 512 else 10)
    params.update(
        unet_config={"params": unet},
        first_stage_config={"params": {"embed_dim": 4, "ddconfig": dict(
            double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
            num_res_blocks=2, attn_resolutions=[], dropout=0.0)}},
        cond_stage_config={"params": {"freeze": True, "layer": "penultimate"}},
        img_cond_stage_config={"params": {"freeze": True}},
        image_proj_stage_config={"params": dict(dim=1024, depth=4, dim_head=64, heads=12, num_queries=16,
                                                embedding_dim=1280, output_dim=1024, ff_mult=4, video_length=16)},
    )
    return from_yaml({"model": {"params": params}}, f"DynamiCrafter {resolution} preset")
