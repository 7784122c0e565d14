"""One Anti-I2V attack step on CogVideoX: JAX (jitted) vs diffusers (eager PyTorch) on the same weights.

The step: image (64x64, [-1, 1]) -> VAE encode (1 frame, posterior mean) -> image latents x0.7, zero-padded
to 3 latent frames; clean video latents = the image latent repeated; noise at a fixed t; transformer
(4 blocks, 8 heads x 64, RoPE + learned positions, 226 x 4096 text); v-prediction MSE; gradient to the
image. The weights are random (seeded), saved once as a diffusers folder and loaded by both sides (the
JAX side through the real converter). Each framework runs in its own subprocess so that peak RSS is its own.

    python experiments/benchmark_cogvideox.py [--repeats 5] [--keep DIR]

Needs the torch extra (torch, diffusers). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T = 437
HEIGHT = WIDTH = 64
FRAMES = 9  # pixel frames -> 3 latent frames


def small_configs() -> tuple[dict, dict]:
    transformer = dict(
        num_attention_heads=8, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=4, sample_width=8, sample_height=8, sample_frames=FRAMES,
        max_text_seq_length=226, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    )
    vae = dict(
        block_out_channels=(128, 256, 256, 512), latent_channels=16, layers_per_block=3, norm_num_groups=32,
        sample_height=HEIGHT, sample_width=WIDTH, scaling_factor=0.7,
    )
    return transformer, vae


def build_checkpoint(folder: Path) -> None:
    """Random small CogVideoX-I2V (seeded) saved as a diffusers folder, plus the fixed inputs."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    tr_cfg, vae_cfg = small_configs()
    CogVideoXTransformer3DModel(**tr_cfg).save_pretrained(folder / "transformer")
    AutoencoderKLCogVideoX(**vae_cfg).save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXImageToVideoPipeline"}))
    rng = np.random.default_rng(0)
    np.savez(
        folder / "inputs.npz",
        image=rng.uniform(-1, 1, (HEIGHT, WIDTH, 3)).astype(np.float32),
        noise=rng.standard_normal((3, HEIGHT // 8, WIDTH // 8, 16)).astype(np.float32),
        text=rng.standard_normal((226, 4096)).astype(np.float32),
    )


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_freed_memory() -> None:
    """Return memory the C allocator keeps after frees (loading, compiling) to the OS, on both sides alike."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def time_repeats(run, repeats: int) -> tuple[float, float]:
    """(median seconds, peak RSS MB) of ``repeats`` calls of ``run()``, after returning freed memory to the OS."""
    times = []
    release_freed_memory()
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak


def measure_jitted(fn, args, repeats: int) -> dict:
    """Compile ``jax.jit(fn)`` for ``args``, run it once, then time ``repeats`` runs with the peak RSS."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    first = jax.block_until_ready(compiled(*args))
    median_s, peak = time_repeats(lambda: jax.block_until_ready(compiled(*args)), repeats)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(median_s=median_s, compile_s=compile_s, first=first, peak_rss_mb=peak, flops=float(cost["flops"]))


MATMUL_N = 2048  # the reference matrix product of the "arithmetic rate" row


def matmul_gflops(framework: str, repeats: int = 9) -> float:
    """GFLOP/s of a float32 MATMUL_N x MATMUL_N matrix product in ``framework`` ("jax" or "torch") on this
    machine: the rate the convolutions and products of a step could reach at best."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32) for _ in range(2))
    if framework == "jax":
        import jax

        f = jax.jit(lambda a, b: a @ b)
        a, b = jax.device_put(a), jax.device_put(b)
        run = lambda: jax.block_until_ready(f(a, b))  # noqa: E731
    else:
        import torch

        a, b = torch.from_numpy(a), torch.from_numpy(b)
        run = lambda: a @ b  # noqa: E731
    run()
    return 2 * MATMUL_N**3 / time_repeats(run, repeats)[0] / 1e9


def rate_row(pt: dict, jx: dict) -> str:
    """The table row of arithmetic rates: the step's FLOPs (XLA's count, the same arithmetic on both sides) over
    each side's step time, and the share of that framework's own float32 matrix-product rate."""
    pt_rate, jx_rate = jx["flops"] / pt["median_s"] / 1e9, jx["flops"] / jx["scan_step_s"] / 1e9
    return (f"| arithmetic rate ({jx['flops'] / 1e9:.0f} GFLOP per step, XLA's count) | {pt_rate:.0f} GFLOP/s "
            f"({pt_rate / pt['matmul_gflops']:.0%} of a {MATMUL_N}² matmul's {pt['matmul_gflops']:.0f}) | "
            f"{jx_rate:.0f} GFLOP/s in a scan ({jx_rate / jx['matmul_gflops']:.0%} of {jx['matmul_gflops']:.0f}) | |")


SCAN_STEPS = 4  # steps per scan in the "as protect runs it" row


def in_a_scan(fn, steps: int = SCAN_STEPS):
    """``fn`` (``(image, *rest) -> (loss, grad)``) as ``protect`` runs its steps: ``steps`` sign steps in one
    ``lax.scan``, each under a ``lax.cond`` on whether the run is still going (XLA compiles loop bodies
    differently from a program on its own, so the two timings can differ)."""
    import jax
    import jax.numpy as jnp

    def run(image, *rest):
        def step(x):
            loss, grad = fn(x, *rest)
            return jnp.clip(x - jnp.sign(grad) / 255.0, 0.0, 1.0), loss

        def body(carry, _):
            x, i = carry
            x, loss = jax.lax.cond(i < steps, step, lambda x: (x, jnp.zeros((), jnp.float32)), x)
            return (x, i + 1), loss

        (x, _), losses = jax.lax.scan(body, (image, jnp.asarray(0, jnp.int32)), None, length=steps)
        return x, losses

    return run


def jax_worker_result(fn, args, repeats: int, folder: Path | None) -> dict:
    """A side-by-side benchmark's JAX worker result: ``measure_jitted(fn, args)`` with ``fn -> (loss, grad to the
    image)`` and ``args = (image, params, ...)``; the gradient saved as ``grad_jax.npy`` in ``folder`` (if any).
    ``scan_step_s`` is the median time per step of :func:`in_a_scan` (measured after, in the same process)."""
    import jax
    import jax.numpy as jnp

    result = measure_jitted(fn, args, repeats)
    loss, grad = result.pop("first")
    scanned = measure_jitted(in_a_scan(fn), args, max(1, repeats // 2))
    result["scan_step_s"] = scanned["median_s"] / SCAN_STEPS
    if folder is not None:
        np.save(folder / "grad_jax.npy", np.asarray(grad))
    return dict(result, loss=float(loss), grad_norm=float(jnp.linalg.norm(grad)),
                params=sum(int(np.prod(a.shape)) for a in jax.tree.leaves(args[1])),
                device=jax.devices()[0].device_kind, matmul_gflops=matmul_gflops("jax"))


def print_jax_only_table(title: str, result: dict) -> None:
    """The table of a JAX-only benchmark (when the upstream PyTorch code cannot run here)."""
    print(title)
    print("| | JAX (jit) | upstream PyTorch |")
    print("|---|---|---|")
    print(f"| median step | {result['median_s'] * 1e3:.0f} ms | not run (see docstring) |")
    print(f"| median step in a {SCAN_STEPS}-step scan (as protect runs it) | {result['scan_step_s'] * 1e3:.0f} ms | |")
    print(f"| peak RSS during the steps | {result['peak_rss_mb']:.0f} MB | |")
    print(f"| compile | {result['compile_s']:.1f} s | |")
    print(f"| loss | {float(result['first'][0]):.6f} | |")


def print_comparison(title: str, upstream: str, pt: dict, jx: dict, grad_pt: np.ndarray, grad_jx: np.ndarray) -> None:
    """The side-by-side table: step time, peak RSS, first step / compile, loss, and the gradient to the image."""
    rel = float(np.linalg.norm(grad_jx - grad_pt) / np.linalg.norm(grad_pt))
    sign = float(np.mean(np.sign(grad_jx) == np.sign(grad_pt)))
    print(title)
    print(f"| | {upstream} | JAX (jit) | JAX / PyTorch |")
    print("|---|---|---|---|")
    print(f"| median step | {pt['median_s'] * 1e3:.0f} ms | {jx['median_s'] * 1e3:.0f} ms | "
          f"{jx['median_s'] / pt['median_s']:.2f}x |")
    print(f"| median step in a {SCAN_STEPS}-step scan (as protect runs it) | (same) | {jx['scan_step_s'] * 1e3:.0f} ms | "
          f"{jx['scan_step_s'] / pt['median_s']:.2f}x |")
    print(f"| peak RSS during the steps | {pt['peak_rss_mb']:.0f} MB | {jx['peak_rss_mb']:.0f} MB | "
          f"{jx['peak_rss_mb'] / pt['peak_rss_mb']:.2f}x |")
    print(rate_row(pt, jx))
    print(f"| first step / compile | {pt['first_s']:.1f} s (eager) | {jx['compile_s']:.1f} s (compile) | |")
    print(f"| loss | {pt['loss']:.6f} | {jx['loss']:.6f} | diff {abs(pt['loss'] - jx['loss']):.1e} |")
    print(f"| gradient to the image | norm {pt['grad_norm']:.4g} | norm {jx['grad_norm']:.4g} | "
          f"rel. diff {rel:.1e}, signs agree {100 * sign:.2f}% |")


def measure_eager(step, image, repeats: int) -> dict:
    """An eager PyTorch step ``step(image) -> (loss, grad)``: the first call, then ``repeats`` timed calls."""
    t0 = time.perf_counter()
    loss, grad = step(image)
    first = time.perf_counter() - t0
    median_s, peak = time_repeats(lambda: step(image), repeats)
    return dict(median_s=median_s, first_s=first, loss=loss, grad=grad, peak_rss_mb=peak,
                matmul_gflops=matmul_gflops("torch"))


def upstream_benchmark_main(script: str, what: str, upstream_label: str, build, worker_torch, worker_jax) -> None:
    """The command line of a side-by-side benchmark (Open-Sora, DynamiCrafter): ``--upstream DIR
    --upstream-python PY`` builds the weights with the upstream code (``build(folder, upstream)``, once per
    ``--keep`` folder), runs ``worker_torch(folder, repeats, upstream)`` under that Python and
    ``worker_jax(folder, repeats)`` here, each in its own subprocess, and prints the comparison; without
    ``--upstream``, ``worker_jax(None, repeats)`` alone. Each worker returns a JSON-able dict and saves its
    gradient to ``grad_torch.npy`` / ``grad_jax.npy`` in the folder."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--upstream", type=Path, help="a checkout of the upstream repository")
    parser.add_argument("--upstream-python", default=sys.executable, help="a Python with the upstream's dependencies")
    parser.add_argument("--keep", type=Path, help="reuse / keep the checkpoint folder here")
    parser.add_argument("--worker", choices=["build", "torch", "jax"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "build":
        build(args.folder, args.upstream)
        return
    if args.worker:
        result = worker_torch(args.folder, args.repeats, args.upstream) if args.worker == "torch" \
            else worker_jax(args.folder, args.repeats)
        print(json.dumps(result))
        return
    if args.upstream is None:
        result = worker_jax(None, args.repeats)
        result["first"] = (result["loss"],)
        print_jax_only_table(f"{what}, {result['params'] / 1e6:.0f}M params, device {result['device']}", result)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "ckpt"
        folder.mkdir(parents=True, exist_ok=True)

        def run(which: str, python: str) -> dict:
            cmd = [python, script, "--worker", which, "--folder", str(folder), "--repeats", str(args.repeats),
                   "--upstream", str(args.upstream)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(script).resolve().parents[1])
            if out.returncode:
                raise SystemExit(f"{which} worker failed:\n{out.stderr[-3000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1]) if which != "build" else {}

        if not (folder / "inputs.npz").exists():
            run("build", args.upstream_python)
        pt, jx = run("torch", args.upstream_python), run("jax", sys.executable)
        grads = np.load(folder / "grad_torch.npy"), np.load(folder / "grad_jax.npy")
    print_comparison(f"{what}, {jx['params'] / 1e6:.0f}M params, {args.repeats} repeats, device {jx['device']}",
                     upstream_label, pt, jx, *grads)


class PeakRSS:
    """Peak RSS while the block runs, sampled every millisecond in a thread (weights + activations + runtime)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mb(), False

        def watch():
            while not self._stop:
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.001)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def worker_torch(folder: Path, repeats: int) -> dict:
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
    )
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.set_num_threads(os.cpu_count() or 1)
    tr = CogVideoXTransformer3DModel.from_pretrained(folder / "transformer").eval()
    vae = AutoencoderKLCogVideoX.from_pretrained(folder / "vae").eval()
    vae.decoder = None  # the step never decodes: hold only what it uses, as the JAX side does
    for p in [*tr.parameters(), *vae.parameters()]:
        p.requires_grad_(False)
    sched = CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, snr_shift_scale=1.0, timestep_spacing="trailing",
                                   prediction_type="v_prediction", beta_schedule="scaled_linear")
    inp = np.load(folder / "inputs.npz")
    image = torch.from_numpy(inp["image"]).permute(2, 0, 1)[None]  # (1, 3, H, W)
    noise = torch.from_numpy(inp["noise"]).permute(0, 3, 1, 2)[None]  # (1, F, C, h, w)
    text = torch.from_numpy(inp["text"])[None]
    t = torch.tensor([T])
    cos, sin = get_3d_rotary_pos_embed(64, ((0, 0), (4, 4)), (4, 4), 3)

    def step(x):
        x = x.clone().requires_grad_(True)
        z = vae.encode(x[:, :, None]).latent_dist.mean.permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w)
        image_latents = torch.cat([z * 0.7, torch.zeros_like(z).repeat(1, 2, 1, 1, 1)], dim=1)
        x0 = (z * 0.7).repeat(1, 3, 1, 1, 1)
        x_t = sched.add_noise(x0, noise, t)
        v = tr(torch.cat([x_t, image_latents], dim=2), text, t, image_rotary_emb=(cos, sin), return_dict=False)[0]
        loss = ((v - sched.get_velocity(x0, noise, t)) ** 2).mean()
        loss.backward()
        return loss.item(), x.grad

    result = measure_eager(step, image, repeats)
    return dict(result, grad_norm=float(result.pop("grad").norm()))


def worker_jax(folder: Path, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from anti_i2v_jax.backbones.cogvideox import scheduler
    from anti_i2v_jax.backbones.cogvideox.config import SchedulerConfig
    from anti_i2v_jax.backbones.cogvideox.transformer import (
        CogVideoXTransformer3DModel,
        rotary_embedding,
    )
    from anti_i2v_jax.backbones.cogvideox.vae import (
        AutoencoderKLCogVideoX,
        image_encoder_params,
    )
    from weights_convert.cogvideox import load_diffusers

    config, _, host_params, _ = load_diffusers(folder, with_text=False)
    # What the attack holds (CogVideoXBackbone.attack_params): the image encoder with its temporal taps
    # summed (exact for one frame) and the transformer; on the device once.
    params = jax.device_put(
        {"vae": image_encoder_params(host_params["vae"]), "transformer": host_params["transformer"]}
    )
    del host_params  # memory-mapped file views: unmapped once dropped
    import gc

    gc.collect()
    inp = np.load(folder / "inputs.npz")
    ac = scheduler.alphas_cumprod(SchedulerConfig())
    vae = AutoencoderKLCogVideoX(config.vae, image_only=True)
    tr = CogVideoXTransformer3DModel(config.transformer)
    rope = tuple(jnp.asarray(r) for r in rotary_embedding(config.transformer, 3, 4, 4))
    noise, text, t = jnp.asarray(inp["noise"]), jnp.asarray(inp["text"])[None], jnp.asarray(T)

    def loss_fn(x, params):
        mean, _ = vae.apply({"params": params["vae"]}, x[None, None], method=vae.encode)
        z = mean[0] * 0.7  # (1, h, w, C)
        image_latents = jnp.concatenate([z, jnp.zeros((2, *z.shape[1:]))], 0)
        x0 = jnp.repeat(z, 3, axis=0)
        x_t = scheduler.add_noise(ac, x0, noise, t)
        v = tr.apply({"params": params["transformer"]}, jnp.concatenate([x_t, image_latents], -1)[None], text,
                     t[None], rope)[0]
        return jnp.mean((v - scheduler.get_velocity(ac, x0, noise, t)) ** 2)

    return jax_worker_result(jax.value_and_grad(loss_fn), (jnp.asarray(inp["image"]), params), repeats, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="reuse / keep the checkpoint folder here")
    parser.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = worker_torch if args.worker == "torch" else worker_jax
        print(json.dumps(fn(args.folder, args.repeats)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "ckpt"
        if not (folder / "inputs.npz").exists():
            folder.mkdir(parents=True, exist_ok=True)
            build_checkpoint(folder)
        results = {}
        for which in ("torch", "jax"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", which, "--folder", str(folder), "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True,
            )
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    pt, jx = results["torch"], results["jax"]
    print(f"CogVideoX attack step (VAE encode + 4-block transformer + grad to a 64x64 image), "
          f"{args.repeats} repeats, device {jx['device']}")
    print("| | diffusers (eager) | JAX (jit) | JAX / PyTorch |")
    print("|---|---|---|---|")
    print(f"| median step | {pt['median_s'] * 1e3:.0f} ms | {jx['median_s'] * 1e3:.0f} ms | {jx['median_s'] / pt['median_s']:.2f}x |")
    print(f"| median step in a {SCAN_STEPS}-step scan (as protect runs it) | (same) | {jx['scan_step_s'] * 1e3:.0f} ms | "
          f"{jx['scan_step_s'] / pt['median_s']:.2f}x |")
    print(f"| peak RSS during the steps | {pt['peak_rss_mb']:.0f} MB | {jx['peak_rss_mb']:.0f} MB | "
          f"{jx['peak_rss_mb'] / pt['peak_rss_mb']:.2f}x |")
    print(rate_row(pt, jx))
    print(f"| first step / compile | {pt['first_s']:.1f} s (eager) | {jx['compile_s']:.1f} s (compile) | |")
    print(f"| loss | {pt['loss']:.6f} | {jx['loss']:.6f} | diff {abs(pt['loss'] - jx['loss']):.1e} |")
    print(f"| grad norm | {pt['grad_norm']:.6g} | {jx['grad_norm']:.6g} | |")


if __name__ == "__main__":
    main()
