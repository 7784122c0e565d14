"""The CogVideoX image-to-video adapter: the Backbone protocol over the Flax VAE, transformer and text encoder.

I2V wiring, as ``CogVideoXImageToVideoPipeline``: the image (resized and centre-cropped to the model
size, [-1, 1]) is VAE-encoded as one frame; its posterior mean (or a sample) is scaled (x0.7 for v1.0,
/0.7 for v1.5), zero-padded to F latent frames and concatenated on channels after the noisy latents.
The diffusion loss is the v-prediction MSE at a uniformly drawn timestep, against clean video latents
that are, by default, the image latent (x0.7) repeated over the F frames, or a reference video's latents.

Layer defaults (documented choices, configurable through ``AttackConfig``):

* IRC: block 3 (semantics-free, "whiteboard") vs the last 3 blocks (39, 40, 41 of 42), as in the paper;
* IRA (denoiser): blocks from 27 on (where the paper's PCA shows semantics appearing) to the last,
  scaled to the model's depth (``27 * L // 42``); video tokens only;
* IRA (VAE): each encoder down block and the posterior moments (``conv_out``).
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
from anti_i2v_jax.backbones.cogvideox import scheduler
from anti_i2v_jax.backbones.cogvideox.config import CogVideoXConfig
from anti_i2v_jax.backbones.cogvideox.transformer import (
    CogVideoXTransformer3DModel,
    block_taps,
    rotary_embedding,
    sincos_pos_embedding,
)
from anti_i2v_jax.backbones.cogvideox.vae import (
    AutoencoderKLCogVideoX,
    image_encoder_params,
    sample_posterior,
)
from anti_i2v_jax.nn.init import seeded_params


def default_layers(config: CogVideoXConfig) -> LayerDefaults:
    """The documented IRC/IRA layer choices for a stack of ``num_layers`` blocks."""
    n = config.transformer.num_layers
    early = min(3, n // 4)
    deep = tuple(range(max(early + 1, n - 3), n))
    vae = tuple(f"down_blocks.{i}" for i in range(len(config.vae.block_out_channels))) + ("conv_out",)
    return LayerDefaults(
        num_layers=n, irc_early=early, irc_deep=deep, ira_layers=tuple(range(27 * n // 42, n)), vae_layers=vae
    )


@dataclasses.dataclass(frozen=True, eq=False)
class CogVideoXBackbone(AdapterDefaults):
    """CogVideoX-I2V for the attack. ``text_encoder`` maps a prompt to (L, text_dim) embeddings on the host."""

    name: str
    config: CogVideoXConfig
    params: Any  # {"vae": ..., "transformer": ...}
    text_encoder: Any = None  # callable(prompt) -> np.ndarray (L, text_dim); None: zero text (tests only)
    reference_latents: np.ndarray | None = None  # (F, h, w, C) clean video latents; None: the image repeated
    min_input_side: int = 0
    layers: LayerDefaults = None  # type: ignore[assignment]
    precision: str = "fp32"  # "bf16": bfloat16 weights and matmuls (anti_i2v_jax.precision)
    lpips: Any = None  # LPIPS-VGG (anti_i2v_jax.nn.lpips.LPIPSModel) for the perceptual terms: with_lpips
    clip: Any = None  # an OpenCLIP image encoder (anti_i2v_jax.nn.openclip_image) for the CLIP terms: with_clip

    default_layers = staticmethod(default_layers)
    denoiser_config = "transformer"

    # ------------------------------------------------------------------------------ geometry

    @property
    def geometry(self) -> Geometry:
        """Pixel frames x height x width of the run (CogVideoX has no fps conditioning)."""
        return Geometry(frames=self.config.num_frames, height=self.config.height, width=self.config.width)

    def geometry_problems(self, g: Geometry) -> list[str]:
        """What keeps the model from running at ``g``: sizes must be whole patches of whole VAE cells, frames
        ``4k + 1`` (the causal VAE's frame 0 plus groups of 4), learned position tables fix the size (v1.0: the
        frame count may change, diffusers then uses a sincos table), and 1.5's RoPE grid has a maximum."""
        tr, vae = self.config.transformer, self.config.vae
        cell = vae.spatial_factor * tr.patch_size
        ratio = vae.temporal_compression_ratio
        problems = check_multiple("--frames", g.frames, ratio, "the causal VAE", offset=1, minimum=1 + ratio)
        problems += check_multiple("--height", g.height, cell, f"{vae.spatial_factor}x VAE and {tr.patch_size}x2 patches")
        problems += check_multiple("--width", g.width, cell, f"{vae.spatial_factor}x VAE and {tr.patch_size}x2 patches")
        native = (tr.sample_height * vae.spatial_factor, tr.sample_width * vae.spatial_factor)
        if tr.use_learned_positional_embeddings and (g.height, g.width) != native:
            problems.append(f"its learned position table fixes the size to --height {native[0]} --width {native[1]} "
                            f"(only --frames can change)")
        if tr.is_v15:
            most = (tr.sample_height // tr.patch_size * cell, tr.sample_width // tr.patch_size * cell)
            if g.height > most[0] or g.width > most[1]:
                problems.append(f"its rotary position grid reaches at most {most[0]} x {most[1]} pixels")
        return problems

    def _geometry_changes(self, g: Geometry) -> dict:
        return {"config": dataclasses.replace(self.config, num_frames=g.frames, height=g.height, width=g.width)}

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(F, h, w, C) of the video latents."""
        s = self.config.vae.spatial_factor
        return (self.config.latent_frames, self.config.height // s, self.config.width // s, self.config.vae.latent_channels)

    def _rope(self):
        if not self.config.transformer.use_rotary_positional_embeddings:
            return None
        f, h, w, _ = self.latent_shape
        p = self.config.transformer.patch_size
        return tuple(jnp.asarray(r) for r in rotary_embedding(self.config.transformer, f, h // p, w // p))

    @property
    def _vae(self) -> AutoencoderKLCogVideoX:
        return AutoencoderKLCogVideoX(self.config.vae)

    # ------------------------------------------------------------------------------ protocol

    def encode_text(self, params, prompt: str) -> jax.Array:
        """(L, text_dim) prompt embeddings (T5 last hidden state, no attention mask, as the pipeline)."""
        cfg = self.config.transformer
        if self.text_encoder is None:
            return jnp.zeros((cfg.max_text_seq_length, cfg.text_embed_dim), jnp.float32)
        return jnp.asarray(self.text_encoder(prompt), jnp.float32)

    @functools.cached_property
    def attack_params(self) -> dict:
        """What a protection step needs: the image encoder with its temporal taps summed (exact for one
        frame, a third of the encoder's weights, no decoder) and the transformer."""
        return self.cast({"vae_image": image_encoder_params(self.params["vae"]), "transformer": self.params["transformer"],
                          **self._attached_params()})

    def encode_image(self, params, x, key=None, *, vae_layers: Sequence[str] = ()):
        """Image latent z (1, h, w, C), unscaled, and the requested VAE taps (of one 1-frame encode).

        ``params`` may be :attr:`params` (full VAE) or :attr:`attack_params` (image encoder only).
        """
        image_only = "vae_image" in params
        model = AutoencoderKLCogVideoX(
            self.config.vae, taps=tuple(t for t in vae_layers if t != "latent"), image_only=image_only
        )
        (mean, logvar), state = model.apply(
            {"params": self.cast(params["vae_image" if image_only else "vae"])}, self.cast(self.preprocess(x)[None, None]),
            method=model.encode, mutable=["intermediates"],
        )
        z = sample_posterior(mean.astype(jnp.float32), logvar.astype(jnp.float32), key)[0]
        inter = state.get("intermediates", {}).get("encoder", {})
        taps = {name: inter[f"tap:{name}"][0] for name in vae_layers if name != "latent"}
        return z, taps

    def condition(self, params, x, key, *, vae_layers: Sequence[str] = ()):
        """{"image_latents": (F, h, w, C) padded image condition, "video_latents": (F, h, w, C) clean video}."""
        vae = self.config.vae
        z, taps = self.encode_image(params, x, key, vae_layers=vae_layers)
        image = z / vae.scaling_factor if vae.invert_scale_latents else z * vae.scaling_factor
        f = self.latent_shape[0]
        cond = {"image_latents": jnp.concatenate([image, jnp.zeros((f - 1, *image.shape[1:]), image.dtype)], 0)}
        if self.reference_latents is not None:
            # "replace_first": latent frame 0 (the causal VAE's encoding of pixel frame 0 alone) is the image's
            # own latent, so the image still reaches the video latents (the SDS baseline needs it).
            cond["video_latents"] = jnp.asarray(self.reference_latents).at[0].set(z[0] * vae.scaling_factor)
        else:
            cond["video_latents"] = jnp.repeat(z * vae.scaling_factor, f, axis=0)
        if "latent" in vae_layers:
            taps["latent"] = image
        return cond, taps

    def add_noise(self, params, cond, key, *, t=None) -> Noisy:
        k_t, k_eps = jax.random.split(key)
        ac = scheduler.alphas_cumprod(self.config.scheduler)
        x0 = cond["video_latents"]
        if t is None:
            t = jax.random.randint(k_t, (), 0, self.config.scheduler.num_train_timesteps)
        t = jnp.asarray(t, jnp.int32)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        return Noisy(
            x0=x0, z_t=scheduler.add_noise(ac, x0, eps, t), t=t, target=scheduler.get_velocity(ac, x0, eps, t)
        )

    def denoise(self, params, noisy, cond, text, *, taps: Sequence[int] = ()):
        pred, block = self.transformer_apply(
            params, noisy.z_t[None], cond["image_latents"][None], text[None], noisy.t[None], taps=taps
        )
        return pred[0], {i: v[0] for i, v in block.items()}

    def diffusion_loss(self, prediction, noisy) -> jax.Array:
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - noisy.target.astype(jnp.float32)))

    def eps_residual(self, prediction, noisy) -> jax.Array:
        """v-prediction: ``eps = sqrt(a_t) v + sqrt(1 - a_t) z_t``, so ``eps_hat - eps = sqrt(a_t) (v_hat - v)``.
        Every latent frame is generated (the image enters through the channel-concatenated condition)."""
        sa = jnp.sqrt(jnp.asarray(scheduler.alphas_cumprod(self.config.scheduler), jnp.float32)[noisy.t])
        return sa * (prediction.astype(jnp.float32) - noisy.target.astype(jnp.float32))

    # ------------------------------------------------------------------------------ helpers

    def transformer_apply(self, params, z_t, image_latents, text, t, *, taps: Sequence[int] = ()):
        """Batched transformer call: (B, F, h, w, C) x2 -> v-prediction and {block: video tokens (B, N, D)}."""
        cfg = self.config.transformer
        model = CogVideoXTransformer3DModel(cfg, taps=tuple(taps))
        ofs = jnp.full((z_t.shape[0],), 2.0) if cfg.ofs_embed_dim is not None else None
        out, state = model.apply(
            {"params": self.cast(params["transformer"])},
            self.cast(jnp.concatenate([z_t, image_latents], axis=-1)),
            self.cast(text),
            t,
            self._rope(),  # float32 tables: RoPE is applied in float32, whatever the precision
            ofs,
            mutable=["intermediates"],
        )
        video, _ = block_taps(state, taps)
        return out.astype(jnp.float32), video

    def generate(
        self,
        image: np.ndarray,
        prompt: str,
        *,
        negative_prompt: str = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        seed: int = 0,
    ) -> np.ndarray:
        """Image-to-video as the diffusers pipeline (posterior-mean image latents): uint8 frames (T, H, W, 3)."""
        from anti_i2v_jax.backbones.cogvideox.sampler import (
            decode_latents,
            denoise_latents,
        )

        x = jnp.asarray(np.asarray(image, np.float32) / 255.0)
        cond, _ = jax.jit(lambda p, v: self.condition(p, v, None))(self.params, x)
        noise = jax.random.normal(jax.random.PRNGKey(seed), self.latent_shape, jnp.float32)
        latents = denoise_latents(
            self, self.params, cond["image_latents"], self.encode_text(self.params, prompt),
            self.encode_text(self.params, negative_prompt), noise, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg,
        )
        # CogVideoX 1.5 pads the latent frames to a multiple of patch_size_t in front; the pipeline drops them.
        extra = self.config.latent_frames - ((self.config.num_frames - 1) // self.config.vae.temporal_compression_ratio + 1)
        return decode_latents(self, self.params, latents[extra:])

    def with_reference_video(self, params, video: np.ndarray) -> CogVideoXBackbone:
        """A copy whose clean video latents come from ``video`` ((T, H, W, 3) in [0, 1], any T and size: resampled
        to ``num_frames`` and resized/cropped like the image). Latent frame 0 stays the image's own latent."""
        vae = self.config.vae
        video = resample_frames(video, self.config.num_frames)
        frames = np.stack([np.asarray(self.preprocess(jnp.asarray(f, jnp.float32))) for f in video])
        model = AutoencoderKLCogVideoX(vae)
        mean, _ = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode))(params["vae"], frames[None])
        latents = np.asarray(mean[0]) * vae.scaling_factor
        if latents.shape != self.latent_shape:
            raise ValueError(f"reference video gives latents {latents.shape}, the model needs {self.latent_shape}")
        return dataclasses.replace(self, reference_latents=latents)


def abstract_params(config: CogVideoXConfig) -> dict:
    """The parameter tree of ``config`` as ShapeDtypeStructs (no allocation, no compile)."""
    cfg_t = config.transformer
    s = config.vae.spatial_factor
    f, h, w = config.latent_frames, config.height // s, config.width // s
    vae = AutoencoderKLCogVideoX(config.vae)
    tr = CogVideoXTransformer3DModel(cfg_t)
    key = jax.random.PRNGKey(0)
    vae_params = jax.eval_shape(vae.init, key, jnp.zeros((1, 1, config.height, config.width, 3)))["params"]
    tr_params = jax.eval_shape(
        tr.init,
        key,
        jnp.zeros((1, f, h, w, cfg_t.in_channels)),
        jnp.zeros((1, cfg_t.max_text_seq_length, cfg_t.text_embed_dim)),
        jnp.zeros((1,), jnp.int32),
        None,
        jnp.zeros((1,)) if cfg_t.ofs_embed_dim is not None else None,
    )["params"]
    return {"vae": vae_params, "transformer": tr_params}


def init_params(config: CogVideoXConfig, seed: int = 0) -> dict:
    """Seeded random parameters for ``config`` (the tiny demo backbone, and tests), without a forward pass.

    The learned position table starts as upstream inits it (sincos video rows, zero text rows).
    """
    tr = config.transformer
    p = tr.patch_size
    grid = (tr.sample_height // p, tr.sample_width // p)
    frames = (tr.sample_frames - 1) // tr.temporal_compression_ratio + 1
    table = lambda shape: sincos_pos_embedding(tr, frames, *grid).reshape(shape)  # noqa: E731
    return seeded_params(abstract_params(config), seed, {"pos_embedding": table})
