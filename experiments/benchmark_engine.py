"""How much of a protection step is the engine's own work (DSP transforms, projection, optax, host progress)?

Runs the same protection twice on the same image: once against the real backbone, and once against a
null backbone that has the same interface but does no model work (its "model" is the identity on the
preprocessed image). Everything the null run costs is engine: the L*a*b* / DCT pull-backs and steps,
the projection, the optax update, the scan and the host loop with its progress bar and finiteness
checks. Prints a table of median per-step times and the engine's share.

    python experiments/benchmark_engine.py                      # default backbone: cogvideox-tiny
    python experiments/benchmark_engine.py --backbone NAME [--weights DIR]
    python experiments/benchmark_engine.py --test-double        # the Flax double under tests/
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from anti_i2v_jax import AttackConfig, Protector, load_image
from anti_i2v_jax.backbones.base import Noisy, to_signed


@dataclasses.dataclass(frozen=True, eq=False)
class NullBackbone:
    """The interface of ``inner`` with no model work: every tap is the preprocessed image."""

    inner: object

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_text(self, params, prompt):
        return jnp.zeros(())

    def condition(self, params, x, key, *, vae_layers=()):
        # A strided view instead of the model's resize: the preprocessing is model work, not engine work.
        z = to_signed(x[:: max(1, x.shape[0] // 64), :: max(1, x.shape[1] // 64)])
        return z, {name: z for name in vae_layers}

    def add_noise(self, params, cond, key):
        return Noisy(x0=cond, z_t=cond, t=jnp.zeros((), jnp.int32), target=jnp.zeros_like(cond))

    def denoise(self, params, noisy, cond, text, *, taps=()):
        return noisy.z_t + cond, {i: noisy.z_t * (i + 1) for i in taps}

    def diffusion_loss(self, prediction, noisy):
        return jnp.mean(jnp.square(prediction - noisy.target))


def time_per_step(backbone, image, config, repeats: int) -> tuple[float, float]:
    """(median seconds per step over ``repeats`` runs after a warm-up, first-run seconds incl. compile)."""
    protector = Protector(backbone, config)
    t0 = time.perf_counter()
    protector.protect([image], progress=True)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        protector.protect([image], progress=True)  # progress on: the host's reporting is engine work too
        times.append((time.perf_counter() - t0) / config.steps)
    return statistics.median(times), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="cogvideox-tiny")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--test-double", action="store_true", help="use tests/double.py's TinyBackbone")
    parser.add_argument("--image", type=Path, default=Path(__file__).parents[1] / "examples" / "astronaut.png")
    parser.add_argument("--max-side", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.test_double:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from double import TinyBackbone

        backbone = TinyBackbone.create()
    else:
        from anti_i2v_jax import load_backbone

        backbone = load_backbone(args.backbone, args.weights)
    image = load_image(args.image, max_side=args.max_side)
    config = AttackConfig(steps=args.steps, chunk_size=10, checkpoint_every=10)

    full, full_first = time_per_step(backbone, image, config, args.repeats)
    engine, engine_first = time_per_step(NullBackbone(backbone), image, config, args.repeats)
    print()
    print(f"backbone {backbone.name}, image {image.shape[1]}x{image.shape[0]}, {config.steps} steps, "
          f"schedule {config.schedule}, device {jax.devices()[0].device_kind}")
    print("| run | median ms/step | first run s (incl. compile) |")
    print("|---|---|---|")
    print(f"| full step ({backbone.name}) | {full * 1e3:.2f} | {full_first:.1f} |")
    print(f"| engine only (null backbone) | {engine * 1e3:.2f} | {engine_first:.1f} |")
    print(f"| engine share of a step | {100 * engine / full:.1f}% | target < 5% |")


if __name__ == "__main__":
    main()
