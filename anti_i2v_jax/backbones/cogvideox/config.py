"""Configs of the CogVideoX image-to-video stack, with presets and strict parsing of diffusers configs.

Every field mirrors a diffusers config key; parsing a ``config.json`` rejects keys that are neither
handled nor listed as ignored, so a subtly different model is never built silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from anti_i2v_jax.configs import parse_config
from anti_i2v_jax.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """``AutoencoderKLCogVideoX`` (diffusers)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 0.7
    invert_scale_latents: bool = False  # CogVideoX 1.5: image latents are divided by the scale
    # diffusers' frame batching: encode 8 pixel frames per chunk, decode 2 latent frames per chunk
    encode_frames_per_chunk: int = 8
    decode_frames_per_chunk: int = 2

    IGNORED = frozenset(
        {
            "act_fn",  # always silu in CogVideoX
            "down_block_types",
            "up_block_types",
            "force_upcast",
            "shift_factor",
            "latents_mean",
            "latents_std",
            "use_quant_conv",
            "use_post_quant_conv",
        }
    )

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any], where: str = "vae/config.json") -> VAEConfig:
        """Parse a diffusers ``vae/config.json`` dict."""
        for key, expected in [("act_fn", "silu"), ("use_quant_conv", False), ("use_post_quant_conv", False)]:
            if raw.get(key, expected) != expected:
                raise UserError(f"{where}: {key}={raw[key]!r} is not supported (CogVideoX uses {expected!r})")
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if raw.get(key) is not None:
                raise UserError(f"{where}: {key} is set; CogVideoX VAEs have none")
        return parse_config(cls, raw, cls.IGNORED, where)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """``CogVideoXTransformer3DModel`` (diffusers), plus the two execution switches."""

    num_attention_heads: int = 48
    attention_head_dim: int = 64
    in_channels: int = 32
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 42
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = True
    use_learned_positional_embeddings: bool = True
    patch_bias: bool = True
    # Execution switches (not in diffusers): scan the block stack, rematerialise each block.
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps (anti_i2v_jax.nn.remat)

    IGNORED = frozenset({"dropout", "timestep_activation_fn", "activation_fn"})

    def __post_init__(self):
        if self.patch_size_t is not None and not self.use_rotary_positional_embeddings:
            raise UserError("patch_size_t needs rotary embeddings (diffusers has no sincos table for it either)")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise UserError("learned positional embeddings without RoPE exist in no CogVideoX checkpoint (diffusers refuses them)")

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any], where: str = "transformer/config.json") -> TransformerConfig:
        """Parse a diffusers ``transformer/config.json`` dict."""
        for key, expected in [
            ("activation_fn", "gelu-approximate"),
            ("timestep_activation_fn", "silu"),
            ("norm_elementwise_affine", True),
        ]:
            if raw.get(key, expected) != expected:
                raise UserError(f"{where}: {key}={raw[key]!r} is not supported (expected {expected!r})")
        if raw.get("timestep_cond") not in (None,):
            raise UserError(f"{where}: timestep_cond is not supported")
        return parse_config(cls, raw, cls.IGNORED | {"timestep_cond"}, where)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def is_v15(self) -> bool:
        return self.patch_size_t is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """``CogVideoXDDIMScheduler`` settings (the ones that change the maths)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    set_alpha_to_one: bool = True
    snr_shift_scale: float = 1.0
    steps_offset: int = 0
    timestep_spacing: str = "trailing"
    clip_sample: bool = False

    IGNORED = frozenset({"clip_sample_range", "sample_max_value", "trained_betas"})

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any], where: str = "scheduler/scheduler_config.json") -> SchedulerConfig:
        """Parse a diffusers scheduler config dict."""
        if raw.get("trained_betas") is not None:
            raise UserError(f"{where}: trained_betas is not supported")
        cfg = parse_config(cls, raw, cls.IGNORED, where)
        if cfg.beta_schedule != "scaled_linear" or cfg.prediction_type != "v_prediction" or cfg.clip_sample:
            raise UserError(f"{where}: only scaled_linear betas, v_prediction and clip_sample=false are supported")
        if cfg.timestep_spacing not in ("trailing", "leading", "linspace"):
            raise UserError(f"{where}: unknown timestep_spacing {cfg.timestep_spacing!r}")
        return cfg


@dataclasses.dataclass(frozen=True, kw_only=True)
class CogVideoXConfig:
    """The whole I2V stack the adapter needs."""

    transformer: TransformerConfig
    vae: VAEConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    num_frames: int = 49  # pixel frames of the generated/target video: latent frames = (n - 1) / 4 + 1
    height: int = 480
    width: int = 720

    @property
    def latent_frames(self) -> int:
        f = (self.num_frames - 1) // self.vae.temporal_compression_ratio + 1
        if self.transformer.is_v15 and f % self.transformer.patch_size_t:
            f += self.transformer.patch_size_t - f % self.transformer.patch_size_t
        return f


def cogvideox_5b_i2v(**overrides: Any) -> CogVideoXConfig:
    """THUDM/CogVideoX-5b-I2V at its native 49 x 480 x 720."""
    return CogVideoXConfig(transformer=TransformerConfig(**overrides), vae=VAEConfig())


def cogvideox15_5b_i2v(**overrides: Any) -> CogVideoXConfig:
    """THUDM/CogVideoX1.5-5B-I2V (81 frames; any resolution, 768 x 1360 by default)."""
    transformer = TransformerConfig(
        ofs_embed_dim=512,
        patch_bias=False,
        patch_size_t=2,
        sample_frames=81,
        sample_height=300,
        sample_width=300,
        use_learned_positional_embeddings=False,
        **overrides,
    )
    return CogVideoXConfig(
        transformer=transformer, vae=VAEConfig(invert_scale_latents=True), num_frames=81, height=768, width=1360
    )


def tiny(**overrides: Any) -> CogVideoXConfig:
    """A tiny 5b-I2V-shaped stack (2 blocks, 2 heads x 16, VAE widths 8-16) for demos and tests."""
    transformer = TransformerConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=8,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=4,
        sample_height=8,
        sample_width=8,
        sample_frames=9,
        max_text_seq_length=8,
        **overrides,
    )
    vae = VAEConfig(
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_height=64,
        sample_width=64,
    )
    return CogVideoXConfig(transformer=transformer, vae=vae, num_frames=9, height=64, width=64)


def config_to_json(config: CogVideoXConfig, t5: Any, variant: str, dtype: str) -> dict[str, Any]:
    """The ``config.json`` written next to converted weights (``t5``: a T5Config or None)."""
    return {
        "backbone": "cogvideox",
        "variant": variant,
        "dtype": dtype,
        "transformer": dataclasses.asdict(config.transformer),
        "vae": dataclasses.asdict(config.vae),
        "scheduler": dataclasses.asdict(config.scheduler),
        "num_frames": config.num_frames,
        "height": config.height,
        "width": config.width,
        "text_encoder": dataclasses.asdict(t5) if t5 is not None else None,
    }


def config_from_json(raw: dict[str, Any], where: str = "config.json"):
    """Inverse of :func:`config_to_json`: (CogVideoXConfig, T5 config dict or None, variant)."""
    if raw.get("backbone") != "cogvideox":
        raise UserError(f"{where}: converted weights of {raw.get('backbone')!r}, not cogvideox")
    tup = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa: E731
    config = CogVideoXConfig(
        transformer=TransformerConfig(**tup(raw["transformer"])),
        vae=VAEConfig(**tup(raw["vae"])),
        scheduler=SchedulerConfig(**raw["scheduler"]),
        num_frames=raw["num_frames"],
        height=raw["height"],
        width=raw["width"],
    )
    return config, raw.get("text_encoder"), raw.get("variant")
