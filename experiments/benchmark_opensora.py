"""One Anti-I2V attack step on Open-Sora 1.2 in JAX: the image's VAE encode (SDXL-width spatial VAE +
VAE_Temporal_SD widths) + a small STDiT3 (4 pairs, 8 heads x 72) over 17 frames at 64x64 + the gradient
to the image, jitted; prints the median step time, the compile time and the peak RSS during the steps.

The upstream PyTorch code (hpcaitech/Open-Sora v1.2.0) imports colossalai, xformers, mmengine, timm and
rotary_embedding_torch; timm would pull a torchvision build that does not import beside this machine's
torch wheel, so the PyTorch side is not run here (see the issue note): JAX alone.

    python experiments/benchmark_opensora.py [--repeats 5]
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

from anti_i2v_jax.backbones.opensora.backbone import (  # noqa: E402
    OpenSoraBackbone,
    init_params,
    opensora_v1_2,
)
from anti_i2v_jax.backbones.opensora.stdit3 import STDiT3Config  # noqa: E402


def small_config():
    stdit = STDiT3Config(depth=4, hidden_size=576, num_heads=8, caption_channels=4096, model_max_length=300)
    return opensora_v1_2(stdit=stdit, num_frames=17, height=64, width=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = small_config()
    backbone = OpenSoraBackbone(name="opensora-small", config=config, params=init_params(config, seed=0))
    params = jax.device_put(backbone.attack_params)  # what Protector holds: no VAE decoders
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.random((64, 64, 3)), jnp.float32)
    text = (jnp.asarray(rng.standard_normal((300, 4096)), jnp.float32), jnp.arange(300) < 20)

    def loss(x, p):
        cond, _ = backbone.condition(p, x, None)
        noisy = backbone.add_noise(p, cond, jax.random.PRNGKey(0))
        pred, _ = backbone.denoise(p, noisy, cond, text)
        return backbone.diffusion_loss(pred, noisy)

    result = measure_jitted(jax.value_and_grad(loss), (image, params), args.repeats)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print_jax_only_table(
        f"Open-Sora attack step (VAE encode + 4-pair STDiT3 + grad to a 64x64 image, 17 frames -> "
        f"{config.latent_frames} latent frames), {n / 1e6:.0f}M params, device {jax.devices()[0].device_kind}",
        result,
    )


if __name__ == "__main__":
    main()
