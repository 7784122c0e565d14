"""The DynamiCrafter image-to-video adapter: the Backbone protocol over the Flax VAE, OpenCLIP towers,
Resampler and 3-D U-Net.

I2V wiring, as ``scripts/evaluation/inference.py``: the image (resized and centre-cropped to the model size,
[-1, 1]) is VAE-encoded (posterior mean by default) and scaled by 0.18215; that latent, repeated over the T
frames, is concatenated on channels with the noisy latents ("hybrid"); the same image goes through the CLIP
preprocessing, the ViT-H tower and the Resampler, whose tokens follow the text context (so the gradient
reaches the pixels through both paths). The loss is the U-Net's eps/v MSE at t ~ U{0..999}, with the
dynamic rescale of x0 where the model uses it; the clean video latents are the image latent repeated.

Layers (documented choices, configurable through ``AttackConfig``): "layer i" indexes the U-Net's blocks in
order ``input_blocks.0 .. input_blocks.N-1, middle_block, output_blocks.0 .. output_blocks.M-1``. IRC pulls
the last 3 output blocks onto ``input_blocks.2`` (512/1024: both 320 wide at full resolution; the usual choice
``input_blocks[3]`` is the first downsample, whose features have another shape); IRA uses the middle block and every output
block (the decoder half, where semantics are assembled); the VAE IRA term uses each encoder down block and
the posterior moments.
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
from anti_i2v_jax.backbones.dynamicrafter import diffusion as dm
from anti_i2v_jax.backbones.dynamicrafter.config import DynamiCrafterConfig
from anti_i2v_jax.backbones.dynamicrafter.image_encoder import (
    ImageHead,
    VisionTower,
    clip_preprocess,
)
from anti_i2v_jax.backbones.dynamicrafter.resampler import Resampler
from anti_i2v_jax.backbones.dynamicrafter.unet import UNetModel
from anti_i2v_jax.backbones.text.openclip_text import TextTower
from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKL
from anti_i2v_jax.nn.init import seeded_params


def unet_block_names(config: DynamiCrafterConfig) -> tuple[str, ...]:
    """The U-Net's tappable blocks in order; "layer i" of the attack is the i-th name."""
    u = config.unet
    n_in = 1 + len(u.channel_mult) * u.num_res_blocks + len(u.channel_mult) - 1
    n_out = len(u.channel_mult) * (u.num_res_blocks + 1)
    return (*(f"input_blocks.{i}" for i in range(n_in)), "middle_block", *(f"output_blocks.{i}" for i in range(n_out)))


def default_layers(config: DynamiCrafterConfig) -> LayerDefaults:
    names = unet_block_names(config)
    n = len(names)
    mid = names.index("middle_block")
    n_down = len(config.vae.block_out_channels)
    r = config.unet.num_res_blocks
    # IRC compares features of one shape: the last full-resolution input block (input_blocks.r, before the
    # first downsample) against the last (up to 3) output blocks of the full-resolution level.
    return LayerDefaults(
        num_layers=n,
        irc_early=r,
        irc_deep=tuple(range(n - min(3, r + 1), n)),
        ira_layers=tuple(range(mid, n)),
        vae_layers=tuple(f"down_blocks.{i}" for i in range(n_down)) + ("quant_conv",),
    )


class ByteTokenizer:
    """A network-free stand-in for the OpenCLIP tokenizer of tiny demo models: ``[start, bytes..., end, 0...]``."""

    def __init__(self, vocab_size: int, start_id: int, end_id: int, length: int = 77):
        self.vocab_size, self.start_id, self.end_id, self.length = vocab_size, start_id, end_id, length

    def __call__(self, text: str) -> np.ndarray:
        body = [1 + b % (self.vocab_size - 3) for b in text.encode()][: self.length - 2]
        ids = [self.start_id, *body, self.end_id]
        return np.asarray(ids + [0] * (self.length - len(ids)), np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class DynamiCrafterBackbone(AdapterDefaults):
    """DynamiCrafter I2V for the attack. ``tokenizer(prompt) -> (77,) ids`` (OpenCLIP's, or the tiny stand-in)."""

    name: str
    config: DynamiCrafterConfig
    params: Any  # {"unet", "vae", "clip_image", "clip_text", "resampler"}
    tokenizer: Any = None
    fs: int | None = None  # fps (512/1024) or frame stride (256); None: the U-Net's default_fs
    reference_latents: np.ndarray | None = None  # (T, h, w, 4) clean video latents; None: the image repeated
    min_input_side: int = 0
    layers: LayerDefaults = None  # type: ignore[assignment]
    precision: str = "fp32"  # "bf16": bfloat16 weights and matmuls (anti_i2v_jax.precision)
    lpips: Any = None  # LPIPS-VGG (anti_i2v_jax.nn.lpips.LPIPSModel) for the perceptual terms: with_lpips
    clip: Any = None  # an OpenCLIP image encoder (anti_i2v_jax.nn.openclip_image) for the CLIP terms: with_clip

    default_layers = staticmethod(default_layers)
    denoiser_config = "unet"

    @functools.cached_property
    def tables(self) -> dict[str, np.ndarray]:
        return dm.schedule(self.config.diffusion)

    @functools.cached_property
    def attack_params(self) -> dict:
        """Everything a step runs: no VAE decoder (the step never decodes) and no text tower (prompts are
        encoded once, before the loop, from :attr:`params`)."""
        vae = {k: v for k, v in self.params["vae"].items() if k not in ("decoder", "post_quant_conv")}
        return self.cast({**{k: v for k, v in self.params.items() if k != "clip_text"}, "vae": vae, **self._attached_params()})

    @property
    def geometry(self) -> Geometry:
        """Frames x height x width and the fps (512/1024) or frame stride (256) the U-Net is conditioned on
        (None for a U-Net without that conditioning)."""
        c = self.config
        fs = None if not c.unet.fs_condition else float(c.unet.default_fs if self.fs is None else self.fs)
        return Geometry(frames=c.frames, height=c.height, width=c.width, fps=fs)

    def geometry_problems(self, g: Geometry) -> list[str]:
        """Sizes must survive the VAE (8x) and every U-Net downsampling (2x per level but the last)."""
        cell = self.config.vae_factor * 2 ** (len(self.config.unet.channel_mult) - 1)
        why = f"the {self.config.vae_factor}x VAE and the U-Net's {len(self.config.unet.channel_mult) - 1} downsamplings"
        problems = check_multiple("--height", g.height, cell, why) + check_multiple("--width", g.width, cell, why)
        if g.frames < 2:
            problems.append(f"--frames {g.frames}: a video needs at least 2 frames")
        if g.fps is not None and (g.fps < 1 or g.fps != int(g.fps)):
            problems.append(f"--model-fps {g.fps:g}: DynamiCrafter's fps / frame stride is a positive whole number")
        return problems

    def _geometry_changes(self, g: Geometry) -> dict:
        f = self.config.vae_factor
        config = dataclasses.replace(self.config, latent_size=(g.height // f, g.width // f), num_frames=g.frames)
        return {"config": config, "fs": None if g.fps is None else int(g.fps)}

    def encode_text(self, params, prompt: str) -> jax.Array:
        """(77, context_dim): the OpenCLIP text tower's penultimate layer after ``ln_final``."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer: convert with one, or pass token ids yourself")
        ids = jnp.asarray(self.tokenizer(prompt))[None]
        return TextTower(self.config.text).apply({"params": params["clip_text"]}, ids)[0].astype(jnp.float32)

    def image_tokens(self, params, image):
        """Resampler tokens (T*16, context_dim) of an image already in [-1, 1] at the model size."""
        return self._resample(params, self._vision_tokens(params, image))

    def _vision_tokens(self, params, image):
        """The OpenCLIP ViT-H's last-block tokens (1, 1 + patches, width) of an image in [-1, 1] at the model size."""
        return VisionTower(self.config.vision).apply({"params": self.cast(params["clip_image"])},
                                                     self.cast(clip_preprocess(image[None])))

    def _resample(self, params, tokens):
        return Resampler(self.config.resampler).apply({"params": self.cast(params["resampler"])}, tokens)[0].astype(jnp.float32)

    def condition(self, params, x, key, *, vae_layers: Sequence[str] = ()):
        cfg = self.config
        img = self.preprocess(x)
        taps = tuple(t for t in vae_layers if t != "latent")
        vae = AutoencoderKL(cfg.vae, taps=taps)
        (mean, logvar), state = vae.apply({"params": self.cast(params["vae"])}, self.cast(img[None]), method=vae.encode,
                                         mutable=["intermediates"])
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        z = z[0] * cfg.diffusion.scale_factor  # (h, w, 4)
        inter = state.get("intermediates", {})
        out = {}
        for name in taps:
            out[name] = inter["tap:quant_conv"][0] if name == "quant_conv" else inter["encoder"][f"tap:{name}"][0]
        if "latent" in vae_layers:
            out["latent"] = z
        video = jnp.repeat(z[None], cfg.frames, axis=0)  # (T, h, w, 4)
        clean = video if self.reference_latents is None else jnp.asarray(self.reference_latents).at[0].set(z)
        tokens = self._vision_tokens(params, img)
        cond = {"c_concat": video, "video_latents": clean, "image_tokens": self._resample(params, tokens)}
        if self.clip is None:  # the CLIP terms' embedding comes from the same tower pass (one backward, not two)
            cond["clip_embedding"] = self._embedding(params, tokens)
        return cond, out

    def add_noise(self, params, cond, key, *, t=None) -> Noisy:
        k_t, k_eps = jax.random.split(key)
        cfg = self.config.diffusion
        t = jax.random.randint(k_t, (), 0, cfg.timesteps) if t is None else jnp.asarray(t, jnp.int32)
        x0 = dm.rescale_x0(self.tables, cond["video_latents"], t)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        return Noisy(x0=x0, z_t=dm.q_sample(self.tables, x0, eps, t), t=t, target=dm.target(cfg, self.tables, x0, eps, t))

    def denoise(self, params, noisy, cond, text, *, taps: Sequence[int] = ()):
        context = jnp.concatenate([text, cond["image_tokens"]], axis=0)[None]
        pred, block = self.unet_apply(params, noisy.z_t[None], cond["c_concat"][None], noisy.t[None], context, taps)
        return pred[0], {i: v for i, v in block.items()}

    def diffusion_loss(self, prediction, noisy):
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - noisy.target.astype(jnp.float32)))

    def eps_residual(self, prediction, noisy) -> jax.Array:
        """eps-parameterised (256): the residual itself; v (512/1024): ``eps = sqrt(a_t) v + sqrt(1 - a_t) z_t``,
        so ``eps_hat - eps = sqrt(a_t) (v_hat - v)``. No frame is a conditioning frame (the image enters
        through ``c_concat`` and the image tokens)."""
        r = prediction.astype(jnp.float32) - noisy.target.astype(jnp.float32)
        if self.config.diffusion.parameterization == "eps":
            return r
        return jnp.asarray(self.tables["sqrt_alphas_cumprod"])[noisy.t] * r

    def _own_image_embedding(self, params, x) -> jax.Array:
        """OpenCLIP ViT-H's image embedding of ``x`` ((H, W, 3) in [0, 1]): the class token after the last block,
        ``ln_post`` and ``proj`` (``(embed_dim,)``, open_clip's ``encode_image`` before normalisation), as the CLIP
        terms of VGMShield and Anti-I2V use it. Weights converted before the head was kept (no ``clip_head``) give
        the bare class token (``(width,)``) instead."""
        return self._embedding(params, self._vision_tokens(params, self.preprocess(x)))

    def _embedding(self, params, tokens):
        if "clip_head" not in params:
            return tokens[0, 0].astype(jnp.float32)
        head = ImageHead(self.config.vision).apply({"params": self.cast(params["clip_head"])}, tokens)
        return head[0].astype(jnp.float32)

    def unet_apply(self, params, z_t, c_concat, t, context, taps: Sequence[int] = ()):
        """Batched U-Net: (B, T, h, w, 4) x2 -> output and {layer index: block output (B*T, h', w', C)}."""
        names = unet_block_names(self.config)
        model = UNetModel(self.config.unet, taps=tuple(names[i] for i in taps))
        fs = None if self.fs is None else jnp.full((z_t.shape[0],), self.fs)
        out, state = model.apply({"params": self.cast(params["unet"])}, self.cast(jnp.concatenate([z_t, c_concat], -1)),
                                 t, self.cast(context), fs, mutable=["intermediates"])
        inter = state.get("intermediates", {})
        return out.astype(jnp.float32), {i: inter[f"tap:{names[i]}"][0] for i in taps}

    def with_reference_video(self, params, video: np.ndarray) -> DynamiCrafterBackbone:
        """A copy whose clean video latents come from ``video`` ((T, H, W, 3) in [0, 1], any T and size: resampled
        to the model's frames, resized/cropped like the image, posterior means). Frame 0 stays the image's latent."""
        cfg = self.config
        video = resample_frames(video, cfg.frames)
        frames = jnp.stack([self.preprocess(jnp.asarray(f, jnp.float32)) for f in video])
        vae = AutoencoderKL(cfg.vae)
        mean, _ = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode))(params["vae"], frames)
        return dataclasses.replace(self, reference_latents=np.asarray(mean, np.float32) * cfg.diffusion.scale_factor)

    def generate(self, image, prompt, *, negative_prompt="", num_inference_steps=50, guidance_scale=None, seed=0):
        """I2V as the DynamiCrafter inference script (DDIM, eta 0, CFG with the empty prompt and a grey image)."""
        cfg = self.config
        x = jnp.asarray(np.asarray(image, np.float32) / 255.0)
        cond, _ = jax.jit(lambda p, v: self.condition(p, v, None))(self.params, x)
        grey = jnp.zeros(self.model_size + (3,))
        uncond_tokens = jax.jit(lambda p: self.image_tokens(p, grey))(self.params)
        ctx = {True: jnp.concatenate([self.encode_text(self.params, prompt), cond["image_tokens"]], 0)[None],
               False: jnp.concatenate([self.encode_text(self.params, negative_prompt), uncond_tokens], 0)[None]}
        apply = jax.jit(lambda z, t, c: self.unet_apply(self.params, z, cond["c_concat"][None], jnp.full((1,), t), c)[0])
        noise = jax.random.normal(jax.random.PRNGKey(seed), (1, *cond["c_concat"].shape))
        z = dm.ddim_sample(lambda z, t, c: apply(z, t, ctx[c]), noise, cfg.diffusion, self.tables,
                           steps=num_inference_steps, guidance_scale=guidance_scale or cfg.guidance_scale,
                           guidance_rescale=cfg.guidance_rescale, spacing=cfg.spacing)
        vae = AutoencoderKL(cfg.vae)
        frames = jax.jit(lambda p, zz: vae.apply({"params": p}, zz, method=vae.decode))(
            self.params["vae"], jnp.asarray(z)[0] / cfg.diffusion.scale_factor)
        return np.asarray(jnp.clip(jnp.rint((frames + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def abstract_params(config: DynamiCrafterConfig) -> dict:
    """Parameter trees of every part as ShapeDtypeStructs (no allocation, no compile)."""
    key = jax.random.PRNGKey(0)
    h, w = config.latent_size
    t = config.frames
    n_ctx = 77 + t * config.resampler.num_queries
    unet = jax.eval_shape(UNetModel(config.unet).init, key, jnp.zeros((1, t, h, w, config.unet.in_channels)),
                          jnp.zeros((1,), jnp.int32), jnp.zeros((1, n_ctx, config.unet.context_dim)), jnp.zeros((1,), jnp.int32))
    vae = jax.eval_shape(AutoencoderKL(config.vae).init, key, jnp.zeros((1, config.height, config.width, 3)))
    vision = jax.eval_shape(VisionTower(config.vision).init, key,
                            jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3)))
    text = jax.eval_shape(TextTower(config.text).init, key, jnp.zeros((1, config.text.context_length), jnp.int32))
    tokens = 1 + (config.vision.image_size // config.vision.patch_size) ** 2
    resampler = jax.eval_shape(Resampler(config.resampler).init, key, jnp.zeros((1, tokens, config.vision.width)))
    head = jax.eval_shape(ImageHead(config.vision).init, key, jnp.zeros((1, tokens, config.vision.width)))
    return {"unet": unet["params"], "vae": vae["params"], "clip_image": vision["params"], "clip_text": text["params"],
            "resampler": resampler["params"], "clip_head": head["params"]}


def init_params(config: DynamiCrafterConfig, seed: int = 0) -> dict:
    """Seeded random parameters (tiny demo backbone and tests), without a forward pass."""
    rng = np.random.default_rng(seed)
    small = lambda shape: rng.standard_normal(shape) * 0.02  # noqa: E731
    # the CLIP image head's projection from its own generator, so that every other tensor keeps its values
    head = lambda shape: np.random.default_rng(seed + 1).standard_normal(shape) / np.sqrt(shape[0])  # noqa: E731
    return seeded_params(abstract_params(config), seed, {
        "class_embedding": small, "positional_embedding": small, "in_proj_weight": small, "latents": small,
        "proj": head,
    })
