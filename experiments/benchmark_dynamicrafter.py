"""One Anti-I2V attack step on DynamiCrafter: JAX (jitted) vs the upstream PyTorch code on the same weights.

The step: image (128x128) -> the SD-width VAE encoder (posterior mean) -> image latent, repeated over 8 frames
as the clean video and as ``c_concat``; OpenCLIP ViT (4 layers, width 256) tokens -> Resampler (2 layers,
16 queries per frame); a fixed 77-token text context; dynamic rescale of x0 and the v-target at a fixed t
(the 512 model's schedule: zero-terminal SNR, v-parameterisation, fps conditioning); a small 3-D U-Net
(64 channels, mult 1-2-2, attention at every level, spatial + temporal transformers); v MSE; gradient to the
image.

With ``--upstream DIR --upstream-python PY`` (a Doubiiu/DynamiCrafter checkout and a Python with its
dependencies: open_clip_torch 2.22, kornia, omegaconf, pytorch_lightning), the upstream side builds the
model from a ``configs/inference_512_v1.0.yaml``-shaped config (the golden-case generator's
``tools/golden/dynamicrafter.py`` builds it, with the import-only stand-ins of ``tools/upstream/stubs.py``),
saves it as a Lightning-style ``model.ckpt`` + ``config.yaml`` (and the same tensors as ``model.safetensors``),
and the JAX side reads the safetensors file through the converter (``weights_convert.dynamicrafter.load``: every
key and shape checked; reading the ``.ckpt`` would import torch into the JAX process and add its ~370 MB of
libraries to the JAX side's peak RSS). Each side runs in its own
subprocess (peak RSS is its own) and the table compares time, memory, loss and gradient. Both sides hold
only what the step runs: no VAE decoder, no text tower. The upstream's ``encode_first_stage`` detaches its
result (no gradient), so the torch step calls ``first_stage_model.encode`` and scales the posterior mean
itself, and it encodes the image once and repeats the latent, as the port does (upstream encodes each of the
T identical frames). Without ``--upstream`` the JAX side runs alone on seeded weights.

    python experiments/benchmark_dynamicrafter.py [--repeats 5] [--upstream DIR --upstream-python PY] [--keep DIR]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from benchmark_cogvideox import (  # noqa: E402
    jax_worker_result,
    measure_eager,
    upstream_benchmark_main,
)

SIZE, FRAMES, TEXT_LEN = 128, 8, 77
LATENT = SIZE // 8
T = 300  # the fixed timestep (below 400, where the 512 model's dynamic rescale is not 1)
WIDTH = 256  # CLIP vision width = text width = U-Net context_dim = Resampler dims


def upstream_config() -> dict:
    """The upstream model config (``model:`` tree of configs/inference_512_v1.0.yaml) at the benchmark's sizes,
    built by editing the golden-case generator's tiny 512-style config."""
    config = _golden().make_config("512")
    p = config["model"]["params"]
    p["image_size"] = [LATENT, LATENT]
    p["unet_config"]["params"].update(model_channels=64, attention_resolutions=[4, 2, 1], num_res_blocks=1,
                                      channel_mult=[1, 2, 2], num_head_channels=32, context_dim=WIDTH,
                                      temporal_length=FRAMES)
    p["first_stage_config"]["params"]["ddconfig"].update(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2)
    for key in ("cond_stage_config", "img_cond_stage_config"):
        arch = p[key]["params"]["arch"]
        arch["vision_cfg"].update(layers=4, width=WIDTH, head_width=64)
        arch["text_cfg"].update(width=WIDTH, heads=4, layers=4)
    p["image_proj_stage_config"]["params"].update(dim=WIDTH, depth=2, dim_head=32, heads=4, num_queries=16,
                                                  embedding_dim=WIDTH, output_dim=WIDTH, ff_mult=2,
                                                  video_length=FRAMES)
    return config


def _golden():
    """tools/golden/dynamicrafter.py as a module (its config builder and upstream loader)."""
    name = "golden_dynamicrafter"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "golden" / "dynamicrafter.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return dict(image=rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32),
                noise=rng.standard_normal((FRAMES, LATENT, LATENT, 4)).astype(np.float32),
                text=rng.standard_normal((TEXT_LEN, WIDTH)).astype(np.float32))


# ------------------------------------------------------------------------------------ upstream side


def build_checkpoint(folder: Path, upstream: Path) -> None:
    """Seeded random upstream model saved as config.yaml + a Lightning-style model.ckpt, plus the inputs."""
    import torch
    from safetensors.torch import save_file

    golden = _golden()
    golden.import_upstream(upstream)
    config = upstream_config()
    golden.write_config(config, folder / "config.yaml", "512")
    torch.manual_seed(0)
    model = golden.build_model(config)
    golden.perturb_constants(model)  # zero-initialised layers get noise so every path carries signal
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, folder / "model.ckpt")
    save_file(state, folder / "model.safetensors")  # the same tensors, for the JAX side (no torch import there)
    np.savez(folder / "inputs.npz", **inputs())


def worker_torch(folder: Path, repeats: int, upstream: Path) -> dict:
    import torch

    golden = _golden()
    golden.import_upstream(upstream)
    from lvdm.common import extract_into_tensor

    torch.set_num_threads(os.cpu_count() or 1)
    model = golden.load_checkpoint(golden.build_model(upstream_config()), folder / "model.ckpt").eval()
    model.first_stage_model.decoder = None  # the step never decodes nor encodes text: hold what it runs
    model.cond_stage_model = None
    for p in model.parameters():
        p.requires_grad_(False)
    inp = np.load(folder / "inputs.npz")
    image = torch.from_numpy(inp["image"]).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]
    noise = torch.from_numpy(inp["noise"]).permute(3, 0, 1, 2)[None]  # (1, 4, T, h, w)
    text = torch.from_numpy(inp["text"])[None]
    t = torch.tensor([T])
    fs = torch.tensor([model.model.diffusion_model.default_fs])

    def step(x):
        x = x.clone().requires_grad_(True)
        z = model.first_stage_model.encode(x).mean * model.scale_factor  # (1, 4, h, w)
        video = z[:, :, None].repeat(1, 1, FRAMES, 1, 1)
        context = torch.cat([text, model.image_proj_model(model.embedder(x))], 1)
        cond = {"c_crossattn": [context], "c_concat": [video]}
        x_start = video * extract_into_tensor(model.scale_arr, t, video.shape) if model.use_dynamic_rescale else video
        loss, _ = model.p_losses(x_start, cond, t, noise=noise, fs=fs)
        loss.backward()
        return loss.item(), x.grad

    result = measure_eager(step, image, repeats)
    grad01 = (2 * result.pop("grad")[0]).permute(1, 2, 0).numpy()  # d/d(image in [0, 1]), (H, W, 3)
    np.save(folder / "grad_torch.npy", grad01)
    return dict(result, grad_norm=float(np.linalg.norm(grad01)))


# ------------------------------------------------------------------------------------------ JAX side


def small_config():
    """The benchmark's model for the JAX-alone run (the same sizes as ``upstream_config``)."""
    from anti_i2v_jax.backbones.dynamicrafter.config import DynamiCrafterConfig
    from anti_i2v_jax.backbones.dynamicrafter.diffusion import DiffusionConfig
    from anti_i2v_jax.backbones.dynamicrafter.image_encoder import VisionConfig
    from anti_i2v_jax.backbones.dynamicrafter.resampler import ResamplerConfig
    from anti_i2v_jax.backbones.dynamicrafter.unet import UNetConfig
    from anti_i2v_jax.backbones.text.openclip_text import TextConfig
    from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKLConfig

    return DynamiCrafterConfig(
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, num_head_channels=32,
                        context_dim=WIDTH, temporal_length=FRAMES),
        vae=AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        vision=VisionConfig(layers=4, width=WIDTH, head_width=64),
        text=TextConfig(width=WIDTH, heads=4, layers=4),
        resampler=ResamplerConfig(dim=WIDTH, depth=2, dim_head=32, heads=4, num_queries=16, embedding_dim=WIDTH,
                                  output_dim=WIDTH, ff_mult=2, video_length=FRAMES),
        diffusion=DiffusionConfig(rescale_betas_zero_snr=True, parameterization="v", use_dynamic_rescale=True,
                                  base_scale=0.7),
        latent_size=(LATENT, LATENT),
    )


def jax_step(backbone, text):
    """value_and_grad of the same step through the adapter (condition, fixed t and noise, denoise, loss)."""
    import jax
    import jax.numpy as jnp

    from anti_i2v_jax.backbones.base import Noisy
    from anti_i2v_jax.backbones.dynamicrafter import diffusion as dm

    cfg, tables = backbone.config.diffusion, backbone.tables

    def loss(x, params, noise):
        cond, _ = backbone.condition(params, x, None)
        t = jnp.asarray(T, jnp.int32)
        x0 = dm.rescale_x0(tables, cond["video_latents"], t)
        noisy = Noisy(x0=x0, z_t=dm.q_sample(tables, x0, noise, t), t=t, target=dm.target(cfg, tables, x0, noise, t))
        pred, _ = backbone.denoise(params, noisy, cond, text)
        return backbone.diffusion_loss(pred, noisy)

    return jax.value_and_grad(loss)


def worker_jax(folder: Path | None, repeats: int) -> dict:
    import gc

    import jax
    import jax.numpy as jnp

    from anti_i2v_jax.backbones.dynamicrafter import DynamiCrafterBackbone, init_params

    if folder is None:  # JAX alone: seeded weights of the same shapes
        config = small_config()
        backbone = DynamiCrafterBackbone(name="dynamicrafter-small", config=config, params=init_params(config))
        inp = inputs()
    else:  # the upstream's files through the real converter (rule table, every key and shape checked)
        from weights_convert.dynamicrafter import load

        config, host_params, _ = load(folder / "model.safetensors", folder / "config.yaml")
        backbone = DynamiCrafterBackbone(name="dynamicrafter-small", config=config, params=host_params)
        inp = dict(np.load(folder / "inputs.npz"))
    params = jax.device_put(backbone.attack_params)  # what Protector holds: no VAE decoder, no text tower
    backbone, host_params = dataclasses.replace(backbone, params=None), None  # drop the host copies
    gc.collect()
    return jax_worker_result(jax_step(backbone, jnp.asarray(inp["text"])),
                             (jnp.asarray(inp["image"]), params, jnp.asarray(inp["noise"])), repeats, folder)


def main() -> None:
    upstream_benchmark_main(
        __file__, f"DynamiCrafter attack step (SD-width VAE encode + 4-layer CLIP ViT + Resampler + 3-D U-Net, grad "
        f"to a {SIZE}x{SIZE} image, {FRAMES} frames)", "DynamiCrafter (eager)", build_checkpoint, worker_torch,
        worker_jax)

if __name__ == "__main__":
    main()
