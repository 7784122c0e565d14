"""One Anti-I2V attack step on Open-Sora 1.2: JAX (jitted) vs the upstream PyTorch code on the same weights.

The step: image (64x64) -> VideoAutoencoderPipeline encode (full-width SDXL spatial VAE + VAE_Temporal_SD,
posterior means) -> frame 0 of 5 latent frames is the image latent (x_mask False there), the other frames
are the image latent noised at a fixed t -> a small STDiT3 (4 pairs, 8 heads x 72, 300 x 4096 caption with
20 valid tokens) -> rectified-flow velocity MSE over the generated frames -> gradient to the image.

With ``--upstream DIR --upstream-python PY`` (an hpcaitech/Open-Sora v1.2.0 checkout, and a Python that
has its dependencies: timm, rotary_embedding_torch, mmengine, diffusers 0.27.2, transformers 4.39.3 beside
this machine's torch), the upstream side builds random weights and saves them in the released layout
(``stdit3/`` and ``vae/`` Hugging Face folders); the JAX side reads them through the converter's rule table
(``weights_convert.opensora.load``, every key and shape checked); both run the step in their own subprocess (peak RSS is each one's own) and the table compares
time, memory, loss and gradient. The import-only stand-ins for GPU-only packages are
``tools/upstream/stubs.py``. Without ``--upstream`` the JAX side runs alone on seeded weights.

    python experiments/benchmark_opensora.py [--repeats 5] [--upstream DIR --upstream-python PY] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmark_cogvideox import (  # noqa: E402
    jax_worker_result,
    measure_eager,
    upstream_benchmark_main,
)

SIZE, FRAMES, LATENT_FRAMES, TEXT_LEN, VALID = 64, 17, 5, 300, 20
T = 700.0  # the fixed timestep (upstream units, 0..1000)
STDIT = dict(depth=4, hidden_size=576, num_heads=8, caption_channels=4096, model_max_length=TEXT_LEN)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, norm_num_groups=32, scaling_factor=0.13025,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SHIFT, SCALE = [-0.10, 0.34, 0.27, 0.98], [3.85, 2.32, 2.33, 3.06]


# ------------------------------------------------------------------------------------ upstream side


def _upstream_modules(upstream: Path):
    import importlib

    sys.path.insert(0, str(upstream))
    sys.path.insert(0, str(HERE.parent / "tools" / "upstream"))
    import stubs

    stubs.install()
    from diffusers.models import AutoencoderKL

    # VideoAutoencoderKL downloads its SDXL VAE by name: build it from the config instead (random weights).
    AutoencoderKL.from_pretrained = classmethod(lambda cls, *a, **k: cls(**SDXL_VAE))
    stdit3 = importlib.import_module("opensora.models.stdit.stdit3")
    vae = importlib.import_module("opensora.models.vae.vae")
    rf = importlib.import_module("opensora.schedulers.rf.rectified_flow")
    stubs.posterior_means()
    return stdit3, vae, rf


def build_checkpoint(folder: Path, upstream: Path) -> None:
    """Seeded random STDiT3 + VAE pipeline saved as the released folders, plus the fixed inputs."""
    import torch

    stdit3, vae_mod, _ = _upstream_modules(upstream)
    torch.manual_seed(0)
    model = stdit3.STDiT3(stdit3.STDiT3Config(**STDIT, enable_flash_attn=False, enable_layernorm_kernel=False))
    vae = vae_mod.VideoAutoencoderPipeline(vae_mod.VideoAutoencoderPipelineConfig(
        vae_2d=dict(type="VideoAutoencoderKL", from_pretrained="PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
                    subfolder="vae", micro_batch_size=4, local_files_only=False),
        vae_temporal=dict(type="VAE_Temporal_SD", from_pretrained=None),
        micro_frame_size=17, shift=SHIFT, scale=SCALE,
    ))
    with torch.no_grad():  # upstream zero-inits some layers: perturb every constant tensor so all paths carry signal
        for name, p in [*model.named_parameters(), *vae.named_parameters()]:
            if name != "rope.freqs" and torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.02))
    model.save_pretrained(folder / "stdit3")
    vae.save_pretrained(folder / "vae")
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    cfg["vae_2d_diffusers_config"] = {"_class_name": "AutoencoderKL", **SDXL_VAE}
    (folder / "vae" / "config.json").write_text(json.dumps(cfg, indent=1))
    rng = np.random.default_rng(0)
    np.savez(
        folder / "inputs.npz",
        image=rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32),
        noise=rng.standard_normal((LATENT_FRAMES, SIZE // 8, SIZE // 8, 4)).astype(np.float32),
        y=(0.5 * rng.standard_normal((TEXT_LEN, 4096))).astype(np.float32),
    )


def worker_torch(folder: Path, repeats: int, upstream: Path) -> dict:
    import torch

    stdit3, vae_mod, rf = _upstream_modules(upstream)
    torch.set_num_threads(os.cpu_count() or 1)
    model = stdit3.STDiT3.from_pretrained(folder / "stdit3").eval()
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    cfg.pop("vae_2d_diffusers_config")
    vae = vae_mod.VideoAutoencoderPipeline(vae_mod.VideoAutoencoderPipelineConfig(**cfg)).eval()
    from safetensors.torch import load_file

    vae.load_state_dict(load_file(folder / "vae" / "model.safetensors"), strict=True)
    for part in (vae.spatial_vae.module, vae.temporal_vae):
        part.decoder = None  # the step never decodes: hold only what it uses, as the JAX side does
    for p in [*model.parameters(), *vae.parameters()]:
        p.requires_grad_(False)
    inp = np.load(folder / "inputs.npz")
    image = torch.from_numpy(inp["image"]).permute(2, 0, 1)[None, :, None] * 2 - 1  # (1, 3, 1, H, W) in [-1, 1]
    noise = torch.from_numpy(inp["noise"]).permute(3, 0, 1, 2)[None]  # (1, C, F, h, w)
    y = torch.from_numpy(inp["y"])[None, None]  # (1, 1, L, C)
    mask = (torch.arange(TEXT_LEN) < VALID)[None].long()
    x_mask = (torch.arange(LATENT_FRAMES) > 0)[None]
    sched = rf.RFlowScheduler(use_timestep_transform=True)
    kwargs = dict(y=y, mask=mask, x_mask=x_mask, fps=torch.tensor([24.0]), height=torch.tensor([float(SIZE)]),
                  width=torch.tensor([float(SIZE)]))

    def step(x):
        x = x.clone().requires_grad_(True)
        z = vae.encode(x)  # (1, 4, 1, h, w), posterior means
        video = z.repeat(1, 1, LATENT_FRAMES, 1, 1)
        loss = sched.training_losses(model, video, kwargs, noise=noise, mask=x_mask, t=torch.tensor([T]))["loss"].mean()
        loss.backward()
        return loss.item(), x.grad

    result = measure_eager(step, image, repeats)
    # d/d(image in [0, 1]) = 2 d/d(x in [-1, 1]); (1, 3, 1, H, W) -> (H, W, 3)
    grad01 = (2 * result.pop("grad")[0, :, 0]).permute(1, 2, 0).numpy()
    np.save(folder / "grad_torch.npy", grad01)
    return dict(result, grad_norm=float(np.linalg.norm(grad01)))


# ------------------------------------------------------------------------------------------ JAX side


def jax_step(backbone, y, y_mask):
    """value_and_grad of the same step through the adapter (condition, fixed t and noise, denoise, loss)."""
    import jax
    import jax.numpy as jnp

    from anti_i2v_jax.backbones.base import Noisy
    from anti_i2v_jax.backbones.opensora import rflow

    def loss(x, params, noise):
        cond, _ = backbone.condition(params, x, None)
        x0 = cond["video_latents"]
        t = jnp.asarray(T, jnp.float32)
        keep = jnp.asarray(backbone.x_mask)[:, None, None, None]
        noisy = Noisy(x0=x0, z_t=jnp.where(keep, rflow.add_noise(x0, noise, t), x0), t=t,
                      target=rflow.velocity(x0, noise))
        pred, _ = backbone.denoise(params, noisy, cond, (y, y_mask))
        return backbone.diffusion_loss(pred, noisy)

    return jax.value_and_grad(loss)


def worker_jax(folder: Path | None, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from anti_i2v_jax.backbones.opensora.backbone import (
        OpenSoraBackbone,
        init_params,
        opensora_v1_2,
    )
    from anti_i2v_jax.backbones.opensora.stdit3 import STDiT3Config

    if folder is None:  # JAX alone: seeded weights of the same shapes
        config = opensora_v1_2(stdit=STDiT3Config(**STDIT), num_frames=FRAMES, height=SIZE, width=SIZE)
        backbone = OpenSoraBackbone(name="opensora-small", config=config, params=init_params(config, seed=0))
        rng = np.random.default_rng(0)
        inp = dict(image=rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32),
                   noise=rng.standard_normal((LATENT_FRAMES, SIZE // 8, SIZE // 8, 4)).astype(np.float32),
                   y=(0.5 * rng.standard_normal((TEXT_LEN, 4096))).astype(np.float32))
    else:  # the upstream's files through the real converter (rule table, every key and shape checked)
        import dataclasses
        import gc

        from weights_convert.opensora import load

        config, _, host_params, _ = load(folder / "stdit3", folder / "vae")
        config = dataclasses.replace(config, num_frames=FRAMES, height=SIZE, width=SIZE)
        backbone = OpenSoraBackbone(name="opensora-small", config=config, params=host_params)
        inp = dict(np.load(folder / "inputs.npz"))
    params = jax.device_put(backbone.attack_params)  # what Protector holds: no VAE decoders
    if folder is not None:  # drop the host copies (memory-mapped views) and the decoders, as the torch side does
        backbone = dataclasses.replace(backbone, params=None)
        del host_params
        gc.collect()
    y_mask = jnp.arange(TEXT_LEN) < VALID
    return jax_worker_result(jax_step(backbone, jnp.asarray(inp["y"]), y_mask),
                             (jnp.asarray(inp["image"]), params, jnp.asarray(inp["noise"])), repeats, folder)


def main() -> None:
    upstream_benchmark_main(
        __file__, f"Open-Sora attack step (VAE encode + 4-pair STDiT3 + grad to a {SIZE}x{SIZE} image, {FRAMES} frames "
        f"-> {LATENT_FRAMES} latent frames)", "Open-Sora v1.2.0 (eager)", build_checkpoint, worker_torch, worker_jax)

if __name__ == "__main__":
    main()
