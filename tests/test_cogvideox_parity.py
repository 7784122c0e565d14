"""CogVideoX and T5 against the golden diffusers / transformers cases, output by output, in float32."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import assert_close, load_case, output_params

from weights_convert import cogvideox as convert_cogvideox

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

# (B, C, T, H, W) <-> (B, T, H, W, C), and the transformer's (B, F, C, H, W) <-> (B, F, H, W, C)
vae_in = lambda a: np.asarray(a).transpose(0, 2, 3, 4, 1)  # noqa: E731
vae_out = lambda a: np.asarray(a).transpose(0, 4, 1, 2, 3)  # noqa: E731
tr_in = lambda a: np.asarray(a).transpose(0, 1, 3, 4, 2)  # noqa: E731
tr_out = lambda a: np.asarray(a).transpose(0, 1, 4, 2, 3)  # noqa: E731


@functools.cache
def cogvideox_outputs(case) -> dict[str, np.ndarray]:
    """Everything the case lists, computed by the port (once per case)."""
    from anti_i2v_jax.backbones.cogvideox import scheduler
    from anti_i2v_jax.backbones.cogvideox.backbone import CogVideoXBackbone
    from anti_i2v_jax.backbones.cogvideox.sampler import denoise_latents
    from anti_i2v_jax.backbones.cogvideox.transformer import rotary_embedding
    from anti_i2v_jax.backbones.cogvideox.vae import AutoencoderKLCogVideoX

    meta, inp, _ = load_case(case)
    config, _, params, _ = convert_cogvideox.load_diffusers(case, with_text=False)
    # The run's geometry is the case's (any batch size): pixel size from the image, latent frames from the video
    # latents (already padded to whole temporal patches for 1.5), not the checkpoint's sample_* sizes.
    batch, _, height, width = inp["image"].shape
    frames = inp["video_latents"].shape[1]
    bb = CogVideoXBackbone(name=case.name, config=config, params=params).with_geometry(
        frames=(frames - 1) * config.vae.temporal_compression_ratio + 1, height=height, width=width)
    config = bb.config
    assert bb.latent_shape[0] == frames, (bb.latent_shape, frames)
    out: dict[str, np.ndarray] = {}

    vae_taps = ("conv_in", *(f"down_blocks.{i}" for i in range(len(config.vae.block_out_channels))), "mid_block", "conv_out")
    vae = AutoencoderKLCogVideoX(config.vae, taps=vae_taps)
    # jitted: the same XLA ops as op by op, compiled once (eager dispatch of the VAE took most of the time)
    encode_taps = jax.jit(lambda p, x: vae.apply(p, x, method=vae.encode, mutable=["intermediates"]))
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=vae.encode))
    decode = jax.jit(lambda p, z: vae.apply(p, z, method=vae.decode))
    (mean, logvar), state = encode_taps({"params": params["vae"]}, vae_in(inp["image"][:, :, None]))
    out["vae.image.posterior_mean"], out["vae.image.posterior_logvar"] = vae_out(mean), vae_out(logvar)
    for name in vae_taps:
        out[f"vae.enc.{name}"] = vae_out(state["intermediates"]["encoder"][f"tap:{name}"][0])
    video_mean, _ = encode({"params": params["vae"]}, vae_in(inp["video_for_encode"]))
    out["vae.video.posterior_mean"] = vae_out(video_mean)
    out["vae.decode"] = vae_out(decode({"params": params["vae"]}, vae_in(inp["latent_for_decode"])))

    # The adapter's I2V condition from each [0, 1] image (its resize is the identity at the model size).
    condition = jax.jit(lambda p, x: bb.condition(p, x, None)[0]["image_latents"])
    image_latents = jnp.stack([condition(params, jnp.asarray((image.transpose(1, 2, 0) + 1.0) / 2.0))
                               for image in inp["image"]])
    out["image_latents"] = tr_out(image_latents)

    f, h, w, _ = bb.latent_shape
    p = config.transformer.patch_size
    out["rotary.cos"], out["rotary.sin"] = rotary_embedding(config.transformer, f, h // p, w // p)

    # Per-sample timesteps: t is (B,) (or (1,) for every sample).
    ac = scheduler.alphas_cumprod(config.scheduler)
    t = jnp.broadcast_to(jnp.asarray(inp["t"]), (batch,))
    x0, noise = tr_in(inp["video_latents"]), tr_in(inp["noise"])
    x_t = jnp.stack([scheduler.add_noise(ac, x0[i], noise[i], t[i]) for i in range(batch)])
    v_target = jnp.stack([scheduler.get_velocity(ac, x0[i], noise[i], t[i]) for i in range(batch)])
    out["x_t"], out["v_target"] = tr_out(x_t), tr_out(v_target)

    layers = tuple(range(config.transformer.num_layers))
    from anti_i2v_jax.backbones.cogvideox.transformer import (
        CogVideoXTransformer3DModel,
        block_taps,
    )

    model = CogVideoXTransformer3DModel(config.transformer, taps=layers)
    ofs = jnp.full((batch,), 2.0) if config.transformer.ofs_embed_dim is not None else None  # as the I2V pipeline
    sample, state = model.apply(
        {"params": params["transformer"]},
        jnp.concatenate([x_t, image_latents], axis=-1),
        inp["prompt_embeds"],
        t,
        None,
        ofs,
        mutable=["intermediates"],
    )
    out["transformer.sample"] = tr_out(sample)
    video_taps, text_taps = block_taps(state, layers)
    for i in layers:
        out[f"transformer.block_hidden_states.{i}"] = np.asarray(video_taps[i])
        out[f"transformer.block_encoder_hidden_states.{i}"] = np.asarray(text_taps[i])
    out["loss"] = np.asarray(jnp.mean((sample - v_target) ** 2))

    steps = re.search(r"after_(\d+)_steps", " ".join(meta["outputs"]))
    if steps:
        sampler = meta["details"]["sampler"]
        latents = jnp.stack([
            denoise_latents(
                bb, params, image_latents[i], jnp.asarray(inp["prompt_embeds"][i]),
                jnp.asarray(inp["negative_prompt_embeds"][i]), noise[i],
                num_inference_steps=sampler["num_inference_steps"], guidance_scale=sampler["guidance_scale"],
                use_dynamic_cfg=sampler["use_dynamic_cfg"], stop_after=int(steps.group(1)),
            )
            for i in range(batch)
        ])
        out[f"sampler.latents_after_{steps.group(1)}_steps"] = tr_out(latents)
    return out


def _check(case, output, compute) -> None:
    meta, _, expected = load_case(case)
    got = compute(case)
    assert output in got, f"the port does not compute {output!r} listed in {case}/case.json"
    assert_close(got[output], expected[output], meta["tolerance"], f"{case.name}: {output}")


@pytest.mark.parametrize("case, output", output_params("cogvideox"))
def test_cogvideox_matches_diffusers(case, output):
    _check(case, output, cogvideox_outputs)


@functools.cache
def t5_outputs(case) -> dict[str, np.ndarray]:
    from anti_i2v_jax.backbones.text.t5 import T5Config, T5EncoderModel, t5_taps
    from anti_i2v_jax.configs import read_json
    from weights_convert.core import SafetensorsSource, convert

    _, inp, _ = load_case(case)
    config = T5Config.from_transformers(read_json(case / "config.json"))
    params, _ = convert(
        SafetensorsSource(case / "model.safetensors"), convert_cogvideox.T5_RULES,
        convert_cogvideox.t5_abstract(config), ignore=convert_cogvideox.T5_IGNORED,
    )
    taps = ("embeddings", *range(config.num_layers))
    model = T5EncoderModel(config, taps=taps)
    last, state = model.apply({"params": params}, inp["input_ids"], inp["attention_mask"], mutable=["intermediates"])
    got = t5_taps(state)
    out = {"last_hidden_state": last, "embeddings": got["embeddings"]}
    out.update({f"hidden_states.{i}": got[i] for i in range(config.num_layers)})
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("case, output", output_params("t5"))
def test_t5_matches_transformers(case, output):
    _check(case, output, t5_outputs)
