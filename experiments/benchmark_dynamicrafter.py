"""One Anti-I2V attack step on DynamiCrafter in JAX: the image's VAE encode (SD widths) + CLIP ViT + Resampler
+ a small 3-D U-Net over 8 frames + the gradient to the image, jitted; prints the median step time, the
compile time and the peak RSS during the steps.

The upstream code (Doubiiu/DynamiCrafter) needs open_clip_torch 2.22, kornia and pytorch_lightning, which are
not installed here (and open_clip would pull a torchvision build that does not import beside this machine's
torch wheel), so the PyTorch side is not run: JAX alone.

    python experiments/benchmark_dynamicrafter.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_cogvideox import measure_jitted, print_jax_only_table  # noqa: E402

from anti_i2v_jax.backbones.dynamicrafter import DynamiCrafterBackbone, init_params  # noqa: E402
from anti_i2v_jax.backbones.dynamicrafter.config import DynamiCrafterConfig  # noqa: E402
from anti_i2v_jax.backbones.dynamicrafter.diffusion import DiffusionConfig  # noqa: E402
from anti_i2v_jax.backbones.dynamicrafter.image_encoder import VisionConfig  # noqa: E402
from anti_i2v_jax.backbones.dynamicrafter.resampler import ResamplerConfig  # noqa: E402
from anti_i2v_jax.backbones.dynamicrafter.unet import UNetConfig  # noqa: E402
from anti_i2v_jax.backbones.text.openclip_text import TextConfig  # noqa: E402
from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKLConfig  # noqa: E402


def small_config() -> DynamiCrafterConfig:
    return DynamiCrafterConfig(
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, num_head_channels=32,
                        context_dim=256, temporal_length=8),
        vae=AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        vision=VisionConfig(layers=4, width=256, head_width=64),
        text=TextConfig(width=256, heads=4, layers=4),
        resampler=ResamplerConfig(dim=256, depth=2, dim_head=32, heads=4, num_queries=16, embedding_dim=256,
                                  output_dim=256, ff_mult=2, video_length=8),
        diffusion=DiffusionConfig(),
        latent_size=(16, 16),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = small_config()
    backbone = DynamiCrafterBackbone(name="dynamicrafter-small", config=config, params=init_params(config))
    params = jax.device_put(backbone.attack_params)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.random((config.height, config.width, 3)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((77, config.unet.context_dim)), jnp.float32)

    def loss(x, p):
        cond, _ = backbone.condition(p, x, None)
        noisy = backbone.add_noise(p, cond, jax.random.PRNGKey(0))
        return backbone.diffusion_loss(backbone.denoise(p, noisy, cond, text)[0], noisy)

    result = measure_jitted(jax.value_and_grad(loss), (image, params), args.repeats)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print_jax_only_table(
        f"DynamiCrafter attack step (VAE + CLIP + Resampler + 3-D U-Net, grad to a {config.height}x{config.width} "
        f"image, {config.frames} frames), {n / 1e6:.0f}M params held, device {jax.devices()[0].device_kind}",
        result,
    )


if __name__ == "__main__":
    main()
