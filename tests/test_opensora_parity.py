"""Open-Sora 1.2 against the golden upstream case(s), output by output, in float32."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import assert_close, load_case, output_params

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

tr = lambda a: np.asarray(a).transpose(0, 2, 3, 4, 1)  # noqa: E731  (B, C, T, H, W) -> (B, T, H, W, C)
back = lambda a: np.asarray(a).transpose(0, 4, 1, 2, 3)  # noqa: E731
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731

SPATIAL = ("conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block", "conv_out")
TEMPORAL = ("conv_in", "block_res_blocks.0", "block_res_blocks.1", "block_res_blocks.2", "block_res_blocks.3",
            "conv_blocks.1", "conv_blocks.2", "res_blocks", "conv2")


@functools.cache
def opensora_outputs(case) -> dict[str, np.ndarray]:
    from anti_i2v_jax.backbones.opensora import rflow
    from anti_i2v_jax.backbones.opensora.backbone import OpenSoraBackbone, sample
    from anti_i2v_jax.backbones.opensora.stdit3 import STDiT3
    from anti_i2v_jax.backbones.opensora.vae import SPATIAL_SCALE, VideoAutoencoder
    from weights_convert import opensora as conv

    meta, inp, _ = load_case(case)
    config, _, params, _ = conv.load(case / "stdit3", case / "vae")
    h, w = int(inp["height"][0]), int(inp["width"][0])
    config = dataclasses.replace(config, num_frames=int(inp["num_frames"][0]), height=h, width=w,
                                 fps=float(inp["fps"][0]))
    out: dict[str, np.ndarray] = {}

    taps = tuple(f"spatial.{t}" for t in (*SPATIAL, "quant_conv")) + tuple(f"temporal.{t}" for t in (*TEMPORAL, "quant_conv"))
    vae = VideoAutoencoder(config.vae, taps=taps)
    image = tr(inp["image"][:, :, None])
    z, state = vae.apply({"params": params["vae"]}, image, method=vae.encode, mutable=["intermediates"])
    out["vae.image.latent"] = back(z)
    sp, tm = state["intermediates"]["spatial_vae"], state["intermediates"]["temporal_vae"]
    for t in SPATIAL:
        out[f"vae.spatial.enc.{t}"] = nchw(sp["encoder"][f"tap:{t}"][0])
    out["vae.spatial.quant_conv"] = nchw(sp["tap:quant_conv"][0])
    out["vae.image.spatial_mean"] = back((np.asarray(sp["tap:quant_conv"][0])[..., :4] * SPATIAL_SCALE)[:, None])
    for t in TEMPORAL:
        out[f"vae.temporal.enc.{t}"] = back(tm["encoder"][f"tap:{t}"][0])
    out["vae.temporal.quant_conv"] = back(tm["tap:quant_conv"][0])
    out["vae.video.latent"] = back(vae.apply({"params": params["vae"]}, tr(inp["video_for_encode"]), method=vae.encode))
    out["vae.decode"] = back(vae.apply({"params": params["vae"]}, tr(inp["latent_for_decode"]),
                                       int(inp["num_frames"][0]), method=vae.decode))

    # Training-style loss with the given t (no transform), as RFLOW.training_losses.
    x0, eps, x_mask = tr(inp["video_latents"]), tr(inp["noise"]), np.asarray(inp["x_mask"])
    t = np.asarray(inp["t"], np.float32)  # one timestep per sample
    noised = np.stack([rflow.add_noise(x0[i], eps[i], t[i]) for i in range(len(x0))])
    x_t = np.where(x_mask[:, :, None, None, None], noised, x0)
    out["stdit3.x_t"] = back(x_t)
    names = ("x_embedder", "t_embedder", "t0_embedder", "fps_embedder", "t_block", "t0_block", "y_embedder")
    blocks = tuple(f"{kind}.{i}" for i in range(config.stdit.depth) for kind in ("spatial", "temporal"))
    model = STDiT3(config.stdit, taps=names + blocks)
    pred, state = model.apply({"params": params["stdit"]}, x_t, inp["t"], inp["y"][:, 0], inp["mask"], x_mask,
                              inp["fps"], inp["height"], inp["width"], mutable=["intermediates"])
    out["stdit3.out"] = back(pred)
    inter = state["intermediates"]
    for n in names:
        out[f"stdit3.{n}"] = np.asarray(inter[f"tap:{n}"][0])
    out["stdit3.y_embedder"] = out["stdit3.y_embedder"][:, None]
    for b in blocks:
        kind, i = b.split(".")
        out[f"stdit3.{kind}_blocks.{i}"] = np.asarray(inter[f"tap:{b}"][0])
    losses = [rflow.masked_loss(pred[i, ..., :4], rflow.velocity(x0[i], eps[i]), x_mask[i]) for i in range(len(x0))]
    out["loss"] = np.asarray(losses)
    out["loss.batch_mean"] = np.asarray(np.mean(losses))

    # The sampler on the whole batch in one call, each sample with its own fps and caption; the samples share
    # the geometry (upstream takes STDiT3's position scale from the batch's first sample). Steps and guidance
    # from the case's settings.
    settings = meta.get("settings", {}).get("rflow", {})
    steps, cfg_scale = int(settings.get("num_sampling_steps", 30)), float(settings.get("cfg_scale", 7.0))
    sizes = {(int(inp["height"][i]), int(inp["width"][i]), int(inp["num_frames"][i])) for i in range(len(x0))}
    assert len(sizes) == 1, f"samples of one batch differ in size: {sizes}"
    out["rflow.timesteps"] = np.stack([rflow.sampling_timesteps(steps, h, w, config.num_frames)] * len(x0), axis=1)
    out["rflow.mask"] = np.where(np.arange(x0.shape[1]) == 0, 0.0, 1.0)[None].repeat(len(x0), 0)
    out["rflow.null_y"] = np.asarray(params["stdit"]["y_embedder"]["y_embedding"])[None, None].repeat(len(x0), 0)
    out["rflow.z_init"] = back(np.asarray(jnp.asarray(eps).at[:, 0].set(np.asarray(z)[:, 0])))
    backbone = OpenSoraBackbone(name=case.name, config=config, params=params)
    for key, stop in (("rflow.z_after_2_steps", 2), ("rflow.z_final", None)):
        out[key] = back(sample(backbone, params, jnp.asarray(z), jnp.asarray(inp["y"][:, 0]), jnp.asarray(inp["mask"] > 0),
                               jnp.asarray(eps), num_steps=steps, guidance_scale=cfg_scale, stop_after=stop,
                               fps=inp["fps"]))
    return out


@pytest.mark.parametrize("case, output", output_params("opensora"))
def test_opensora_matches_upstream(case, output):
    meta, _, expected = load_case(case)
    got = opensora_outputs(case)
    assert output in got, f"the port does not compute {output!r} listed in {case}/case.json"
    assert_close(got[output], expected[output], meta["tolerance"], f"{case.name}: {output}")
