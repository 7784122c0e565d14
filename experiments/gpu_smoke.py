"""A few real full-size protection steps on a GPU, with random weights: time, peak memory, utilisation.

The weights are drawn on the device (normal, 0.02) from the backbone's abstract parameter tree, so no
checkpoint is needed; the numbers (not the protection) are what this checks. One Anti-I2V step at the
model card's geometry is compiled once and run ``--steps`` times.

    python experiments/gpu_smoke.py [--backbones cogvideox-5b-i2v,...] [--precision bf16] [--steps 3]

Prints one table row per backbone: compile seconds, median step seconds, peak device memory
(``device.memory_stats()["peak_bytes_in_use"]``) and the achieved fraction of the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_report.step_function

# Dense peak TFLOP/s by device kind substring (bf16; fp32 runs as TF32 at half of it).
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def random_params(abstract, seed: int = 0):
    """Normal(0, 0.02) weights of ``abstract``'s shapes and dtypes, created on the default device."""
    leaves, treedef = jax.tree.flatten(abstract)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(leaves))
        return [
            (0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
            if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype)
            for k, a in zip(keys, leaves)
        ]

    return jax.tree.unflatten(treedef, make(jax.random.PRNGKey(seed)))


def run(name: str, precision: str, steps: int) -> dict:
    from memory_report import step_function

    from anti_i2v_jax.backbones import registry
    from anti_i2v_jax.profiling import jaxpr_flops

    backbone = registry.get(name).abstract().configured(precision=precision)
    # one step without the step-0 term normalisation (it runs once per image; every timed call here is step 0)
    fn, (params_spec, image_spec, _, text_spec, state_spec) = step_function(backbone, normalize=False)
    params = random_params(params_spec)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(size=image_spec.shape), jnp.float32)
    target = jnp.asarray(rng.uniform(size=image_spec.shape), jnp.float32)
    text = jax.tree.map(  # (embeddings, mask) for Open-Sora; the mask keeps every token
        lambda s: jnp.ones(s.shape, s.dtype) if s.dtype == jnp.bool_ else
        jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), text_spec)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_spec)
    state["key"] = jax.random.PRNGKey(0)
    state["scale"] = jnp.ones(state_spec["scale"].shape, jnp.float32)

    print(f"{name}: compiling one step", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, image, target, text, state).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30 if mem is not None else float("nan")
    times = []
    for _ in range(steps):
        state["step"] = jnp.zeros((), jnp.int32)  # keep the step active (the run is 1 step long)
        t0 = time.perf_counter()
        new_state, record = compiled(params, image, target, text, state)
        jax.block_until_ready(new_state)
        times.append(time.perf_counter() - t0)
        print(f"{name}: step {len(times)} took {times[-1]:.2f} s", file=sys.stderr, flush=True)
    finite = bool(np.all(np.isfinite(np.asarray(record["values"]))))
    device = jax.devices()[0]
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    flops = jaxpr_flops(jax.make_jaxpr(fn)(params_spec, image_spec, image_spec, text_spec, state_spec).jaxpr)
    peak_tflops = next((v for k, v in PEAKS.items() if k in device.device_kind), None)
    if peak_tflops and precision == "fp32":
        peak_tflops /= 2
    step_s = statistics.median(times)
    return dict(name=name, device=device.device_kind, precision=precision, compile_s=compile_s, step_s=step_s,
                peak_gib=peak / 2**30, xla_gib=xla_gib, utilisation=(flops / step_s / 1e12 / peak_tflops) if peak_tflops else None,
                finite=finite)


def main(argv=None) -> int:
    from anti_i2v_jax.backbones import registry

    real = [s.name for s in registry.specs() if s.abstract is not None]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="cogvideox-5b-i2v,opensora-1.2,dynamicrafter-512")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"gpu_smoke: needs a GPU (JAX sees {jax.default_backend()}); "
              "experiments/memory_report.py gives the estimates without one", file=sys.stderr)
        return 2
    names = [n for n in args.backbones.split(",") if n]
    if [n for n in names if n not in real]:
        print(f"gpu_smoke: unknown backbones; real ones: {real}", file=sys.stderr)
        return 2
    print("| backbone | device | precision | compile s | step s | peak GiB | XLA estimate GiB | of peak FLOP/s | finite |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = run(name, args.precision, args.steps)
        util = f"{100 * r['utilisation']:.0f}%" if r["utilisation"] is not None else "?"
        print(f"| {r['name']} | {r['device']} | {r['precision']} | {r['compile_s']:.0f} | {r['step_s']:.2f} | "
              f"{r['peak_gib']:.1f} | {r['xla_gib']:.1f} | {util} | {r['finite']} |", flush=True)
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
