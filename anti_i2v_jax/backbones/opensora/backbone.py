"""The Open-Sora 1.2 image-to-video adapter: the Backbone protocol over the Flax VAE pipeline and STDiT3.

I2V wiring, as Open-Sora's ``mask_strategy "0"``: the image (resized and centre-cropped to the model size,
[-1, 1]) is encoded as one frame; latent frame 0 of the video is that latent, marked as a conditioning
frame (``x_mask`` False: t = 0 modulation, never noised, excluded from the loss). The diffusion loss is the
rectified-flow velocity MSE over the generated frames at a logit-normal, resolution-transformed t, with the
clean video latents = the image latent repeated over the F latent frames (or a reference video's latents).

Layers (documented choices, configurable through ``AttackConfig``): "layer i" is the output of temporal
block i (the i-th spatial+temporal pair); IRC uses pair 3 vs the last 3 pairs (25-27 of 28); IRA uses the
pairs from 19 on (where the paper's PCA shows semantics, ``19 * depth // 28``); the VAE IRA term uses the
spatial encoder's down blocks, the spatial moments and the temporal moments.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.backbones.base import (
    AdapterDefaults,
    Geometry,
    LayerDefaults,
    Noisy,
    check_multiple,
    resample_frames,
)
from anti_i2v_jax.backbones.opensora import rflow
from anti_i2v_jax.backbones.opensora.stdit3 import STDiT3, STDiT3Config
from anti_i2v_jax.backbones.opensora.vae import VideoAutoencoder, VideoVAEConfig
from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKLConfig
from anti_i2v_jax.nn.init import seeded_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenSoraConfig:
    """The I2V stack: denoiser, VAE and the generation geometry."""

    stdit: STDiT3Config
    vae: VideoVAEConfig
    num_frames: int = 51  # pixel frames (the paper's setting: 51 frames)
    height: int = 480  # the paper's setting: 480p; the repository's default is 240p
    width: int = 848
    fps: float = 24.0

    @property
    def latent_frames(self) -> int:
        chunks = -(-self.num_frames // self.vae.micro_frame_size)
        last = self.num_frames - (chunks - 1) * self.vae.micro_frame_size
        t = self.vae.temporal.time_factor
        return (chunks - 1) * self.vae.micro_z_frame_size + -(-last // t)


def opensora_v1_2(**overrides: Any) -> OpenSoraConfig:
    """hpcai-tech/OpenSora-STDiT-v3 + OpenSora-VAE-v1.2 (SDXL spatial VAE + VAE_Temporal_SD)."""
    return OpenSoraConfig(**{"stdit": STDiT3Config(), "vae": VideoVAEConfig(), **overrides})


def tiny(**overrides: Any) -> OpenSoraConfig:
    """A tiny Open-Sora-shaped stack (2 pairs of 64-wide blocks, a 4-level tiny VAE) for demos and tests."""
    from anti_i2v_jax.backbones.opensora.vae import TemporalVAEConfig

    stdit = STDiT3Config(depth=4, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16)
    vae = VideoVAEConfig(
        spatial=AutoencoderKLConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
        temporal=TemporalVAEConfig(filters=4, num_res_blocks=1, num_groups=2),
    )
    return OpenSoraConfig(stdit=stdit, vae=vae, **{"num_frames": 17, "height": 64, "width": 64, **overrides})


def default_layers(config: OpenSoraConfig) -> LayerDefaults:
    n = config.stdit.depth
    early = min(3, n // 4)
    n_down = len(config.vae.spatial.block_out_channels)
    return LayerDefaults(
        num_layers=n,
        irc_early=early,
        irc_deep=tuple(range(max(early + 1, n - 3), n)),
        ira_layers=tuple(range(19 * n // 28, n)),
        vae_layers=tuple(f"spatial.down_blocks.{i}" for i in range(n_down)) + ("spatial.quant_conv", "temporal.quant_conv"),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class OpenSoraBackbone(AdapterDefaults):
    """Open-Sora 1.2 I2V for the attack. ``text_encoder(prompt) -> (embeddings (L, C), mask (L,))``."""

    name: str
    config: OpenSoraConfig
    params: Any  # {"vae": ..., "stdit": ...}
    text_encoder: Any = None
    reference_latents: np.ndarray | None = None
    min_input_side: int = 0
    layers: LayerDefaults = None  # type: ignore[assignment]
    precision: str = "fp32"  # "bf16": bfloat16 weights and matmuls (anti_i2v_jax.precision)
    lpips: Any = None  # LPIPS-VGG (anti_i2v_jax.nn.lpips.LPIPSModel) for the perceptual terms: with_lpips
    clip: Any = None  # an OpenCLIP image encoder (anti_i2v_jax.nn.openclip_image) for the CLIP terms: with_clip

    default_layers = staticmethod(default_layers)
    denoiser_config = "stdit"

    @functools.cached_property
    def attack_params(self) -> dict:
        """What a protection step needs: the two VAE encoders (no decoders) and STDiT3."""
        vae = self.params["vae"]
        keep = {part: {k: v for k, v in vae[part].items() if k in ("encoder", "quant_conv")}
                for part in ("spatial_vae", "temporal_vae")}
        return self.cast({"vae": keep, "stdit": self.params["stdit"], **self._attached_params()})

    @property
    def geometry(self) -> Geometry:
        """Pixel frames x height x width and the fps the denoiser is conditioned on."""
        c = self.config
        return Geometry(frames=c.num_frames, height=c.height, width=c.width, fps=c.fps)

    def geometry_problems(self, g: Geometry) -> list[str]:
        """Sizes must be whole VAE cells; the frame count at least one temporal micro-batch (17), because
        Open-Sora's timestep transform scales t by sqrt(frames // 17 * 5), which is 0 for fewer frames."""
        factor = 2 ** (len(self.config.vae.spatial.block_out_channels) - 1)
        micro = self.config.vae.micro_frame_size
        problems = check_multiple("--height", g.height, factor, f"the {factor}x VAE")
        problems += check_multiple("--width", g.width, factor, f"the {factor}x VAE")
        if g.frames < micro:
            problems.append(f"--frames {g.frames}: Open-Sora's timestep transform needs at least {micro} frames "
                            f"(it scales t by sqrt(frames // {micro} * 5), zero below {micro})")
        if not g.fps > 0:
            problems.append(f"--model-fps {g.fps:g}: must be positive")
        return problems

    def _geometry_changes(self, g: Geometry) -> dict:
        return {"config": dataclasses.replace(self.config, num_frames=g.frames, height=g.height, width=g.width,
                                              fps=float(g.fps))}

    @functools.cached_property
    def x_mask(self) -> np.ndarray:
        """(F,) bool: frame 0 is the conditioning image, the rest are generated."""
        return np.arange(self.config.latent_frames) > 0

    def encode_text(self, params, prompt: str):
        cfg = self.config.stdit
        if self.text_encoder is None:
            return (jnp.zeros((cfg.model_max_length, cfg.caption_channels)), jnp.ones((cfg.model_max_length,), bool))
        emb, mask = self.text_encoder(prompt)
        return jnp.asarray(emb, jnp.float32), jnp.asarray(mask, bool)

    def condition(self, params, x, key, *, vae_layers: Sequence[str] = ()):
        """{"image_latent": (1, h, w, 4), "video_latents": (F, h, w, 4)} and the requested VAE taps."""
        taps = tuple(t for t in vae_layers if t != "latent")
        vae = VideoAutoencoder(self.config.vae, taps=taps)
        z, state = vae.apply({"params": self.cast(params["vae"])}, self.cast(self.preprocess(x)[None, None]), key,
                             method=vae.encode, mutable=["intermediates"])
        z = z[0].astype(jnp.float32)  # (1, h, w, 4)
        inter = state.get("intermediates", {})
        out = {}
        for name in taps:
            part, tap = name.split(".", 1)
            scope = inter[f"{part}_vae"]
            out[name] = scope[f"tap:{tap}"][0] if f"tap:{tap}" in scope else scope["encoder"][f"tap:{tap}"][0]
        if "latent" in vae_layers:
            out["latent"] = z
        f = self.config.latent_frames
        video = jnp.asarray(self.reference_latents) if self.reference_latents is not None else jnp.repeat(z, f, 0)
        video = video.at[0].set(z[0])  # frame 0 is always the image
        return {"image_latent": z, "video_latents": video}, out

    def add_noise(self, params, cond, key, *, t=None) -> Noisy:
        k_t, k_eps = jax.random.split(key)
        cfg = self.config
        x0 = cond["video_latents"]
        if t is None:
            t = rflow.sample_training_t(k_t, cfg.height, cfg.width, cfg.num_frames)
        t = jnp.asarray(t, jnp.float32)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = jnp.where(self.x_mask[:, None, None, None], rflow.add_noise(x0, eps, t), x0)
        return Noisy(x0=x0, z_t=x_t, t=t, target=rflow.velocity(x0, eps))

    def denoise(self, params, noisy, cond, text, *, taps: Sequence[int] = ()):
        pred, block = self.stdit_apply(params, noisy.z_t[None], noisy.t[None], text[0][None], text[1][None],
                                       jnp.asarray(self.x_mask)[None], taps=taps)
        return pred[0], {i: v[0] for i, v in block.items()}

    def diffusion_loss(self, prediction, noisy):
        return rflow.masked_loss(prediction, noisy.target, self.x_mask)

    def eps_residual(self, prediction, noisy) -> jax.Array:
        """Rectified flow: ``z_t = s x0 + (1 - s) eps`` with ``s = 1 - t/1000`` and ``v = x0 - eps``, so
        ``eps = z_t - s v`` and ``eps_hat - eps = -s (v_hat - v)``: a *negative* multiple of the velocity residual.
        Frame 0 (the conditioning frame, never noised) is zero."""
        s = 1.0 - jnp.asarray(noisy.t, jnp.float32) / rflow.NUM_TIMESTEPS
        r = -s * (prediction.astype(jnp.float32) - noisy.target.astype(jnp.float32))
        return jnp.where(jnp.asarray(self.x_mask)[:, None, None, None], r, 0.0)

    def stdit_apply(self, params, z, t, y, y_mask, x_mask, *, taps: Sequence[int] = (), fps=None):
        """Batched STDiT3 call: velocity (B, T, h, w, 4) and {pair i: temporal block i output (B, N, C)}; ``fps``
        (B,) per sample, default the config's."""
        cfg = self.config
        b = z.shape[0]
        fps = jnp.full((b,), cfg.fps) if fps is None else fps
        model = STDiT3(cfg.stdit, taps=tuple(f"temporal.{i}" for i in taps))
        out, state = model.apply(
            {"params": self.cast(params["stdit"])}, self.cast(z), t, self.cast(y), y_mask, x_mask, fps,
            np.full((b,), cfg.height, np.float32), np.full((b,), cfg.width, np.float32), mutable=["intermediates"],
        )
        inter = state.get("intermediates", {})
        return out[..., : cfg.stdit.in_channels].astype(jnp.float32), {i: inter[f"tap:temporal.{i}"][0] for i in taps}

    def with_reference_video(self, params, video: np.ndarray) -> OpenSoraBackbone:
        """A copy whose clean video latents come from ``video`` ((T, H, W, 3) in [0, 1], any T and size: resampled
        to ``num_frames``, resized/cropped like the image, posterior means). Frame 0 stays the image's latent."""
        video = resample_frames(video, self.config.num_frames)
        frames = jnp.stack([self.preprocess(jnp.asarray(f, jnp.float32)) for f in video])
        vae = VideoAutoencoder(self.config.vae)
        z = jax.jit(lambda p, v: vae.apply({"params": p}, v, None, method=vae.encode))(params["vae"], frames[None])[0]
        latents = np.asarray(z, np.float32)
        if latents.shape[0] != self.config.latent_frames:
            raise ValueError(f"reference video gives {latents.shape[0]} latent frames, the model needs "
                             f"{self.config.latent_frames}")
        return dataclasses.replace(self, reference_latents=latents)

    def generate(self, image, prompt, *, negative_prompt=None, num_inference_steps=30, guidance_scale=7.0, seed=0):
        """I2V with mask strategy "0" (frame 0 = the image latent) and CFG against the learned null caption."""
        x = jnp.asarray(np.asarray(image, np.float32) / 255.0)
        cond, _ = jax.jit(lambda p, v: self.condition(p, v, None))(self.params, x)
        text = self.encode_text(self.params, prompt)
        noise = jax.random.normal(jax.random.PRNGKey(seed), cond["video_latents"].shape)
        z = sample(self, self.params, cond["image_latent"], text[0], text[1], noise,
                   num_steps=num_inference_steps, guidance_scale=guidance_scale)
        vae = VideoAutoencoder(self.config.vae)
        video = jax.jit(lambda p, zz: vae.apply({"params": p}, zz, self.config.num_frames, method=vae.decode))(
            self.params["vae"], z[None])[0]
        return np.asarray(jnp.clip(jnp.rint((video + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def sample(backbone: OpenSoraBackbone, params, image_latent, y, y_mask, noise, *, num_steps: int,
           guidance_scale: float, stop_after: int | None = None, fps=None):
    """``RFLOW.sample`` with the "0" mask strategy: Euler steps on z with CFG, frame 0 reset to the image.

    One sample: ``image_latent`` (1, h, w, C), ``y`` (L, C), ``y_mask`` (L,), ``noise`` (F, h, w, C); or a batch,
    each with a leading B, and ``fps`` (B,) per sample (default: the config's for every sample). As upstream,
    the model runs on [cond_0 .. cond_B-1, null_0 .. null_B-1] and the samples share the geometry (the timestep
    transform and STDiT3's position scale follow ``backbone.config``'s size and frame count)."""
    batched = noise.ndim == 5
    if not batched:
        image_latent, y, y_mask, noise = image_latent[None], y[None], y_mask[None], noise[None]
    cfg = backbone.config
    b, frames = noise.shape[:2]
    ts = rflow.sampling_timesteps(num_steps, cfg.height, cfg.width, cfg.num_frames)
    mask = np.where(np.arange(frames) == 0, 0.0, 1.0).astype(np.float32)
    null = jnp.broadcast_to(params["stdit"]["y_embedder"]["y_embedding"], y.shape)
    fps = jnp.full((b,), cfg.fps, jnp.float32) if fps is None else jnp.asarray(fps, jnp.float32).reshape(b)
    two = lambda a: jnp.concatenate([a, a])  # noqa: E731  (the CFG batch: conditional first, then null)

    @jax.jit
    def step(z, t, dt):
        x_mask = jnp.broadcast_to(jnp.asarray(mask * rflow.NUM_TIMESTEPS) >= t, (b, frames))
        v, _ = backbone.stdit_apply(params, two(z), jnp.full((2 * b,), t), jnp.concatenate([y, null]), two(y_mask),
                                    two(x_mask), fps=two(fps))
        v = v[b:] + guidance_scale * (v[:b] - v[b:])
        return jnp.where(x_mask[:, :, None, None, None], z + v * dt, z)

    z = noise.at[:, 0].set(image_latent[:, 0])
    for i in range(num_steps if stop_after is None else stop_after):
        dt = (ts[i] - ts[i + 1] if i < num_steps - 1 else ts[i]) / np.float32(rflow.NUM_TIMESTEPS)
        z = step(z, ts[i], np.float32(dt))
    return z if batched else z[0]


def abstract_params(config: OpenSoraConfig) -> dict:
    """{"vae", "stdit"} parameter trees as ShapeDtypeStructs (no allocation, no compile)."""
    key = jax.random.PRNGKey(0)
    st, f = config.stdit, config.latent_frames
    h, w = config.height // 8, config.width // 8
    vae = jax.eval_shape(VideoAutoencoder(config.vae).init, key, jnp.zeros((1, 1, config.height, config.width, 3)))
    hw = (np.full((1,), config.height, np.float32), np.full((1,), config.width, np.float32))  # static: closed over
    stdit = jax.eval_shape(
        lambda k: STDiT3(st).init(
            k, jnp.zeros((1, f, h, w, st.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, st.model_max_length, st.caption_channels)), jnp.ones((1, st.model_max_length), bool),
            jnp.ones((1, f), bool), jnp.full((1,), 24.0), *hw,
        ),
        key,
    )
    return {"vae": vae["params"], "stdit": stdit["params"]}


def init_params(config: OpenSoraConfig, seed: int = 0) -> dict:
    """Seeded random parameters (tiny demo backbone and tests), without a forward pass."""
    rng = np.random.default_rng(seed)
    by_width = lambda shape: rng.standard_normal(shape) / np.sqrt(shape[-1])  # noqa: E731  (as upstream inits)
    return seeded_params(abstract_params(config), seed, {"scale_shift_table": by_width, "y_embedding": by_width})
