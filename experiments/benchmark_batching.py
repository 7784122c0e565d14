"""Throughput of several images per device: images per second per device for K = 1, 2, 4.

    python experiments/benchmark_batching.py [--backbones cogvideox-tiny,opensora-tiny,dynamicrafter-tiny]
        [--per-device 1,2,4] [--steps 6] [--method anti-i2v]

For each backbone, K and batching (``map``: the K images one after another inside one device program, each
image's bytes equal to its run alone; ``vmap``: one batched computation), protects K copies of the astronaut
(flipped and shifted so they differ) on one device, once to compile and once timed, and prints images per
second per device, the speed-up over K = 1, and whether every image's bytes equal its run alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="cogvideox-tiny,opensora-tiny,dynamicrafter-tiny")
    p.add_argument("--per-device", default="1,2,4", help="values of K (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="protection steps per timed run (default: %(default)s)")
    p.add_argument("--method", default="anti-i2v")
    p.add_argument("--size", type=int, default=128, help="input photo side in pixels (default: %(default)s)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    import anti_i2v_jax as ai
    from anti_i2v_jax import io

    photo = io.fit_max_side(io.load_image(EXAMPLE), args.size)
    variants = [photo, photo[:, ::-1], photo[::-1], np.roll(photo, 9, axis=1)]
    ks = [int(k) for k in args.per_device.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.method}, "
          f"{args.steps} steps, {photo.shape[1]}x{photo.shape[0]} photos, one device")
    print("| backbone | K | batching | s per run | images/s/device | x K=1 | bytes = alone |")
    print("|---|---|---|---|---|---|---|")
    for name in [b for b in args.backbones.split(",") if b]:
        backbone = ai.load_backbone(name)
        config = ai.AttackConfig.for_method(args.method, steps=args.steps, chunk_size=args.steps)
        protector = ai.Protector(backbone, config)
        alone = [protector.protect([np.ascontiguousarray(v)])[0].image for v in variants[: max(ks)]]
        base = None
        for k in ks:
            images = [np.ascontiguousarray(variants[i % len(variants)]) for i in range(k)]
            for batching in (("map",) if k == 1 else ("map", "vmap")):
                protector.protect(images, per_device=k, batching=batching)  # compile
                t = time.perf_counter()
                out = protector.protect(images, per_device=k, batching=batching)
                seconds = time.perf_counter() - t
                rate = k / seconds
                base = rate if k == 1 else base
                same = all(np.array_equal(o.image, alone[i % len(alone)]) for i, o in enumerate(out))
                print(f"| {name} | {k} | {batching} | {seconds:.2f} | {rate:.3f} | {rate / base:.2f} | "
                      f"{'yes' if same else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
