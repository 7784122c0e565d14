"""XLA's own estimate of one full-size protection step, for every registered real backbone.

Nothing is allocated and no weights are needed: each backbone's parameters are ShapeDtypeStructs
(``BackboneSpec.abstract``), and one Anti-I2V step (the whole objective: IRC + IRA on both branches +
VAE IRA + the auxiliary term (LPIPS-VGG on the input image, and CLIP where the backbone has it) + the
diffusion loss, its gradient, the dual-space update) at the model card's geometry is lowered and compiled for
this machine's backend. The table gives:

* params: parameters the step holds (``attack_params``: no VAE decoder, no text encoder; LPIPS-VGG's 14.7M);
* argument / temp / total: XLA's ``memory_analysis()`` (total = arguments + temporaries);
* GFLOP/step: matmul + convolution FLOPs from the jaxpr, loops multiplied out (a scanned block stack
  counts every layer), with remat on; ``remat x``: FLOPs with remat over FLOPs without;
* compile: seconds to lower and compile on this machine;
* A100/H100 min/img: 200 steps at 40% of the dense peak (bf16: 312 / 989 TFLOP/s; fp32 runs as TF32
  matmuls: 156 / 494 TFLOP/s).

    python experiments/memory_report.py [--precision bf16|fp32] [--backbones a,b] [--json] [--no-remat] [--cpu-passes]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

# Two passes of XLA's CPU pipeline make a CPU estimate unlike the program a GPU runs, so the report
# disables them (--cpu-passes keeps them, giving the CPU's own number):
# * cse_barrier_expander removes the optimisation barriers that jax.checkpoint puts around a block's
#   recomputation, and CSE then merges the recomputation with the original forward: remat is undone and
#   every block's activations stay live (a 16-block toy MLP: 552 MiB with or without remat; 124 MiB with
#   remat once the pass is off). GPU compilation keeps the barriers until after scheduling.
# * while-loop-invariant-code-motion hoists the bf16 -> f32 conversion of a scanned stack's weights out
#   of the loop (the CPU multiplies bf16 in f32): a float32 copy of every weight that a GPU, which
#   multiplies bf16 natively, never makes.
CPU_PASSES_OFF = "cse_barrier_expander,while-loop-invariant-code-motion"
if "--cpu-passes" not in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_disable_hlo_passes={CPU_PASSES_OFF}").strip()
# The program is compiled for its memory analysis, never run: LLVM's expensive optimisations of the CPU code
# (which come after buffer assignment, so they cannot change the estimate) are skipped. DynamiCrafter-256: the
# same bytes, 7% less compile time.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_llvm_disable_expensive_passes=true").strip()

import jax
import jax.numpy as jnp
import numpy as np

PEAK_TFLOPS = {"A100": {"bf16": 312.0, "fp32": 156.0}, "H100": {"bf16": 989.0, "fp32": 494.0}}
UTILISATION = 0.4
STEPS = 200


def _sds(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def step_function(backbone, *, normalize: bool = True):
    """(fn, abstract args) of one protection step of ``backbone`` at its model size (one image).

    The chunk is one step long. Its scan also holds the ``normalize_draws`` normalisation draws of step 0
    (iterations of the same body: no more program or memory, but more FLOPs); ``normalize=False`` leaves them
    out, for the FLOPs of a step.
    """
    from anti_i2v_jax.attack import (
        AttackConfig,
        _initial_state,
        _make_chunk_fn,
        resolve_terms,
    )

    config, _ = resolve_terms(backbone, AttackConfig(steps=1, chunk_size=1, checkpoint_every=1,
                                                     normalize_terms=normalize))
    h, w = backbone.model_size
    chunk, _ = _make_chunk_fn(backbone, config, (h, w))
    lpips = backbone.lpips

    def step_params(p, lp):
        return dataclasses.replace(backbone, params=p, lpips=None if lp is None else dataclasses.replace(lpips, params=lp)).attack_params

    params = jax.eval_shape(step_params, backbone.params, None if lpips is None else lpips.params)
    image = jax.ShapeDtypeStruct((h, w, 3), jnp.float32)
    text = _abstract_text(backbone)
    state = _sds(_initial_state(config, np.zeros((h, w, 3), np.float32)))
    return chunk, (params, image, image, text, state)


def _abstract_text(backbone):
    if backbone.name.startswith("dynamicrafter"):
        return jax.ShapeDtypeStruct((backbone.config.text.context_length, backbone.config.text.width), jnp.float32)
    return _sds(backbone.encode_text(backbone.params, ""))  # zero text of the right shape (no encoder attached)


def _geometry(backbone) -> str:
    c = backbone.config
    frames = getattr(c, "num_frames", None) or getattr(c, "frames", None)
    return f"{frames}x{c.height}x{c.width}"


def measure(name: str, precision: str, remat: bool = True, lpips: bool = True) -> dict:
    """Compile one step of ``name`` abstractly (with LPIPS-VGG attached unless ``lpips`` is False) and return the
    row of the report."""
    from anti_i2v_jax.backbones import registry
    from anti_i2v_jax.nn.lpips import LPIPSModel, abstract_params
    from anti_i2v_jax.profiling import jaxpr_flops

    spec = registry.get(name)
    backbone = spec.abstract().configured(precision=precision, remat=remat)
    if lpips:
        backbone = backbone.with_lpips(LPIPSModel(abstract_params(), "abstract"))
    fn, args = step_function(backbone)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    # FLOPs of a step (without the step-0 normalisation draws: they run once per image, not per step)
    step_fn, step_args = step_function(backbone, normalize=False)
    flops = jaxpr_flops(jax.make_jaxpr(step_fn)(*step_args).jaxpr)
    plain_fn, plain_args = step_function(backbone.configured(remat=False), normalize=False)
    flops_plain = jaxpr_flops(jax.make_jaxpr(plain_fn)(*plain_args).jaxpr)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(args[0]))
    row = dict(
        name=name,
        geometry=_geometry(backbone),
        precision=precision,
        remat=remat,
        params=params,
        argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        total_bytes=int(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
        flops_per_step=float(flops),
        flops_per_step_no_remat=float(flops_plain),
        compile_seconds=round(compile_s, 1),
    )
    for gpu, peaks in PEAK_TFLOPS.items():
        row[f"{gpu.lower()}_minutes_per_image"] = STEPS * flops / (UTILISATION * peaks[precision] * 1e12) / 60
    return row


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def table(rows: list[dict]) -> str:
    head = ("| backbone | geometry | params | argument GiB | temp GiB | total GiB | GFLOP/step | remat x "
            "| compile s | A100 min/img | H100 min/img |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['geometry']} | {r['params'] / 1e9:.2f}B | {_gib(r['argument_bytes'])} | "
            f"{_gib(r['temp_bytes'])} | {_gib(r['total_bytes'])} | {r['flops_per_step'] / 1e9:,.0f} | "
            f"{r['flops_per_step'] / r['flops_per_step_no_remat']:.2f} | {r['compile_seconds']} | "
            f"{r['a100_minutes_per_image']:.1f} | {r['h100_minutes_per_image']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from anti_i2v_jax.backbones import registry

    real = [s.name for s in registry.specs() if s.abstract is not None]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--backbones", default=",".join(real), help=f"comma-separated (default: {','.join(real)})")
    parser.add_argument("--no-remat", action="store_true", help="measure without rematerialisation")
    parser.add_argument("--json", action="store_true", help="also print one JSON object per backbone")
    parser.add_argument("--no-lpips", action="store_true", help="leave LPIPS-VGG out of the step (a run without --lpips)")
    parser.add_argument("--cpu-passes", action="store_true",
                        help=f"keep the XLA CPU passes the report turns off ({CPU_PASSES_OFF}; see the source)")
    args = parser.parse_args(argv)
    names = [n for n in args.backbones.split(",") if n]
    unknown = [n for n in names if n not in real]
    if unknown:
        print(f"memory_report: unknown or tiny backbones {unknown}; real ones: {real}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        print(f"compiling {name} ({args.precision}) ...", file=sys.stderr, flush=True)
        row = measure(name, args.precision, remat=not args.no_remat, lpips=not args.no_lpips)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    print(f"\nOne protection step, {args.precision}, XLA {jax.default_backend()} estimate "
          f"(remat {'off' if args.no_remat else 'on'}, LPIPS {'off' if args.no_lpips else 'on'}):\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
