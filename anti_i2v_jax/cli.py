"""The ``anti-i2v`` command: protect images, list backbones."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from anti_i2v_jax.errors import AttackError, UserError

DEFAULT_BACKBONE = "cogvideox-tiny"


def _parser() -> argparse.ArgumentParser:
    from anti_i2v_jax.attack import METHOD_NOTES, METHODS

    parser = argparse.ArgumentParser(
        prog="anti-i2v",
        description="Protect photos against image-to-video generation (Anti-I2V, in JAX).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("protect", help="add a protective perturbation to images")
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=Path, help="image files")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"model to attack (default {DEFAULT_BACKBONE})")
    p.add_argument("--weights", type=Path, help="converted weights folder (python -m weights_convert)")
    p.add_argument("--prompt", help='text prompt: a caption of the image (default "a video")')
    p.add_argument("--eps", type=float, default=16.0, help="L-inf budget in 8-bit levels (default 16, i.e. 16/255)")
    p.add_argument("--steps", type=int, default=200, help="optimisation steps (default 200)")
    p.add_argument("--method", default="anti-i2v", choices=sorted(METHODS), metavar="METHOD",
                   help="objective preset (default anti-i2v): " + "; ".join(f"{k}: {v}" for k, v in METHOD_NOTES.items()))
    p.add_argument("--schedule", help="perturbation spaces: alternate, lab, dct, rgb, or a list like lab,dct "
                                      "(default: the method's; anti-i2v alternates lab and dct, the baselines use rgb)")
    p.add_argument("--target", type=Path, help="IRA/MIST target image (default: a seeded procedural texture)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference-video", type=Path, metavar="FILE",
                     help="a clean video of the person (animated GIF/PNG/WebP, or a folder of frames) whose latents "
                          "replace the repeated image as the diffusion target; frame 0 stays the image")
    ref.add_argument("--reference", choices=["auto"],
                     help="auto: first generate the clean video from each photo and the prompt with the backbone, "
                          "then use it as the reference video (the paper's protocol)")
    p.add_argument("--lpips", type=Path, metavar="VGG16_PTH",
                   help="LPIPS-VGG for the LPIPS terms (anti-i2v's auxiliary loss, VGMShield): torchvision's VGG16 "
                        "state dict (vgg16-397923af.pth) with --lpips-heads, or one whole LPIPS state dict "
                        "(default: none; those terms run without LPIPS and the report says so)")
    p.add_argument("--lpips-heads", type=Path, metavar="PTH",
                   help="the LPIPS linear heads: the lpips package's weights/v0.1/vgg.pth (with --lpips)")
    p.add_argument("--clip", type=Path, metavar="FILE",
                   help="an OpenCLIP image encoder for the CLIP terms (anti-i2v's auxiliary loss, VGMShield) on "
                        "backbones without one (CogVideoX, Open-Sora): open_clip_pytorch_model.bin (or .safetensors) "
                        "of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (default: none; DynamiCrafter uses its own)")
    p.add_argument("--out", type=Path, default=Path("protected"), help="output folder (default ./protected)")
    p.add_argument("--devices", type=int, default=1, help="protect this many images at once, one per device")
    p.add_argument("--per-device", type=int, default=1, metavar="K",
                   help="images per device (default 1): a batch of --devices x K same-size images runs at once, with "
                        "--parallel dispatch")
    p.add_argument("--batching", default="map", choices=["map", "vmap"],
                   help="how K images share a device: map (default) runs them one after another inside one program, "
                        "so each image's bytes equal a run alone; vmap batches them into one computation, which "
                        "fills a large GPU but may round differently by a few levels")
    p.add_argument("--parallel", default="dispatch", choices=["dispatch", "shard_map", "pmap"],
                   help="how --devices N runs: dispatch (default) runs each image's own one-device program on every "
                        "device, so its bytes equal a run alone; shard_map (a mesh) and pmap build one N-device "
                        "program, which XLA may round differently by a level or so")
    p.add_argument("--seed", type=int, default=0, help="seed of the random start, timesteps and noise (default 0)")
    p.add_argument("--max-side", type=int, help="downscale inputs whose longer side exceeds this (default: no limit)")
    p.add_argument("--chunk-size", type=int, default=10,
                   help="steps per compiled chunk: progress and finiteness checks between chunks (default 10)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable saves (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_geometry_options(p)
    _add_execution_options(p)

    g = sub.add_parser("generate", help="animate an image with a backbone (to check a protection)")
    g.add_argument("image", type=Path, help="the (protected or clean) image to animate")
    g.add_argument("--prompt", required=True, help="what the video should show")
    g.add_argument("--negative-prompt", default="", help='the unconditional prompt of guidance (default "")')
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"model to sample with (default {DEFAULT_BACKBONE})")
    g.add_argument("--weights", type=Path, help="converted weights folder (python -m weights_convert)")
    g.add_argument("--steps", type=int, help="sampling steps (default: the backbone's, 50 for CogVideoX and "
                                             "DynamiCrafter, 30 for Open-Sora)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the backbone's, 6 for "
                                                  "CogVideoX, 7 for Open-Sora, 7.5 for DynamiCrafter)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    g.add_argument("--fps", type=int, default=8, help="frame rate of the written GIF (default 8)")
    g.add_argument("--out", type=Path, default=Path("generated"),
                   help="output folder; the files go to OUT/BACKBONE/ (default ./generated)")
    _add_geometry_options(g)
    _add_execution_options(g)

    sub.add_parser("backbones", help="list the registered backbones")
    return parser


def _add_geometry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("geometry of the video the model makes (default: the backbone's model card)")
    g.add_argument("--frames", type=int, help="pixel frames (CogVideoX: 4k+1; Open-Sora: at least 17)")
    g.add_argument("--height", type=int, help="model input height in pixels (a multiple of the model's cell: "
                                               "16 CogVideoX, 8 Open-Sora, 64 DynamiCrafter)")
    g.add_argument("--width", type=int, help="model input width in pixels (same rule as --height)")
    g.add_argument("--model-fps", type=float, metavar="FPS",
                   help="the fps the model is conditioned on (Open-Sora, DynamiCrafter 512/1024) or the frame "
                        "stride (DynamiCrafter 256); CogVideoX has none")


def _add_execution_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default, exact) or bf16: bfloat16 weights and matmuls with float32 norms, softmax "
                        "statistics, losses and perturbation; halves memory, for real-size runs on a GPU")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each denoiser block in the backward pass instead of storing it "
                        "(default: on for real-size backbones, off for the tiny ones)")


def _load_backbone(args: argparse.Namespace):
    from anti_i2v_jax.backbones import registry

    backbone = registry.load(args.backbone, args.weights)
    geometry = {"frames": args.frames, "height": args.height, "width": args.width, "fps": args.model_fps}
    if any(v is not None for v in geometry.values()):
        if not hasattr(backbone, "with_geometry"):
            raise UserError(f"backbone {args.backbone!r} has a fixed geometry; drop --frames/--height/--width/--model-fps")
        backbone = backbone.with_geometry(**geometry)
    if args.precision == "fp32" and args.remat is None:  # the defaults: nothing to change
        return backbone
    if not hasattr(backbone, "configured"):
        raise UserError(f"backbone {args.backbone!r} has no precision/remat settings; drop --precision and --remat")
    return backbone.configured(precision=args.precision, remat=args.remat)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anti-i2v``; returns the exit code (2: bad input, 1: the run failed)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "backbones":
            return _backbones()
        if args.command == "generate":
            return _generate(args)
        return _protect(args)
    except UserError as e:
        print(f"anti-i2v: error: {e}", file=sys.stderr)
        return 2
    except AttackError as e:
        print(f"anti-i2v: run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("anti-i2v: interrupted; run the same command again to resume from the last save", file=sys.stderr)
        return 130


def _backbones() -> int:
    from anti_i2v_jax.backbones import registry

    specs = registry.specs()
    if not specs:
        print("no backbones registered")
        return 0
    width = max(len(s.name) for s in specs)
    for s in specs:
        print(f"{s.name:<{width}}  {'needs --weights' if s.needs_weights else 'built in      '}  {s.summary}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from anti_i2v_jax import io

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    _check_out_folder(args.out)
    image = io.load_image(args.image)
    backbone = _load_backbone(args)
    if not hasattr(backbone, "generate"):
        raise UserError(f"backbone {args.backbone!r} cannot generate videos yet")
    given = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    frames = backbone.generate(image, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                               **{k: v for k, v in given.items() if v is not None})  # else the backbone's defaults
    stem = args.out / args.backbone / args.image.stem  # one folder per backbone: runs never overwrite each other
    gif = io.save_video(f"{stem}_video.gif", frames, fps=args.fps, protect=[args.image])
    grid = io.save_image(f"{stem}_frames.png", io.frame_grid(frames), protect=[args.image])
    print(f"{args.image} -> {gif}, {grid}  ({len(frames)} frames, {backbone.name})")
    return 0


def _protect(args: argparse.Namespace) -> int:
    import numpy as np

    from anti_i2v_jax import io
    from anti_i2v_jax.attack import AttackConfig, Protector, check_image

    _check_protect_args(args)
    overrides = dict(
        eps=args.eps / 255.0,
        steps=args.steps,
        seed=args.seed,
        chunk_size=args.chunk_size,
        checkpoint_every=args.checkpoint_every,
    )
    if args.schedule:
        overrides["schedule"] = args.schedule
    if args.prompt is not None:
        overrides["prompt"] = args.prompt
    config = AttackConfig.for_method(args.method, **overrides)
    if args.devices < 1:
        raise UserError(f"--devices must be >= 1, got {args.devices}")
    if args.per_device < 1:
        raise UserError(f"--per-device must be >= 1, got {args.per_device}")
    if args.per_device > 1 and args.devices > 1 and args.parallel != "dispatch":
        raise UserError(f"--per-device {args.per_device} runs with --parallel dispatch, not {args.parallel}")

    names = [p.stem for p in args.inputs]
    protected_paths = [*args.inputs, *([args.target] if args.target else [])]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UserError(f"inputs share the file name(s) {clashes}; their outputs would collide")
    inputs = {p.resolve() for p in protected_paths}
    for name in names:
        for suffix in ("_protected.png", "_report.json", "_loss.png"):
            if (args.out / f"{name}{suffix}").resolve() in inputs:
                raise UserError(f"output {args.out / (name + suffix)} would overwrite an input; choose another --out")
    originals = [io.load_image(p) for p in args.inputs]  # fail before any compute
    images = [io.fit_max_side(im, args.max_side) for im in originals]
    for path, before, im in zip(args.inputs, originals, images):
        if im.shape != before.shape:
            print(f"note: {path}: downscaled from {before.shape[1]}x{before.shape[0]} to {im.shape[1]}x{im.shape[0]} "
                  f"(--max-side {args.max_side}); the protected image has the smaller size", file=sys.stderr)
        if io.has_alpha(path):
            print(f"note: {path}: protected as seen on white; its transparency is put back on the protected PNG",
                  file=sys.stderr)
    target = io.load_image(args.target) if args.target else None

    backbone = _load_backbone(args)
    if args.lpips_heads and not args.lpips:
        raise UserError("--lpips-heads goes with --lpips (torchvision's VGG16 state dict)")
    if args.lpips:
        from anti_i2v_jax.nn import lpips

        if not hasattr(backbone, "with_lpips"):
            raise UserError(f"backbone {backbone.name!r} cannot carry LPIPS; drop --lpips")
        backbone = backbone.with_lpips(lpips.load(args.lpips, args.lpips_heads))
    if args.clip:
        from anti_i2v_jax.nn import openclip_image

        if not hasattr(backbone, "with_clip"):
            raise UserError(f"backbone {backbone.name!r} cannot carry a CLIP encoder; drop --clip")
        backbone = backbone.with_clip(openclip_image.load(args.clip))
    for path, im in zip(args.inputs, images):
        try:
            check_image(im, backbone)
        except UserError as e:
            after = f" after --max-side {args.max_side}" if args.max_side and max(im.shape[:2]) == args.max_side else ""
            raise UserError(f"{path}{after}: {e}" + ("; raise --max-side" if after else "")) from None
    reference = args.reference_video or args.reference
    if reference is not None:
        if not hasattr(backbone, "with_reference_video"):
            raise UserError(f"backbone {backbone.name!r} cannot take a reference video; drop --reference/--reference-video")
        if args.devices != 1 or args.per_device != 1:
            raise UserError("--reference/--reference-video protect one image at a time: use --devices 1 --per-device 1")
        if args.reference == "auto" and not hasattr(backbone, "generate"):
            raise UserError(f"backbone {backbone.name!r} cannot generate the reference video; give --reference-video")
        clip = io.load_video(args.reference_video) if args.reference_video else None
        for i, name in enumerate(names):
            video = clip if clip is not None else backbone.generate(images[i], config.prompt, seed=args.seed)
            with_ref = backbone.with_reference_video(backbone.params, video.astype(np.float32) / 255.0)
            protector = Protector(with_ref, config)
            args.out.mkdir(parents=True, exist_ok=True)
            (result,) = protector.protect([images[i]], target=target, checkpoint_dir=args.out / f"{name}.state",
                                          progress=not args.quiet)
            _write_outputs(args, protector, backbone.name, args.inputs[i], originals[i].shape, images[i], result,
                           protected_paths)
        return 0

    protector = Protector(backbone, config)
    args.out.mkdir(parents=True, exist_ok=True)

    # Images of one size run together, --per-device of them on each of --devices; otherwise one at a time.
    slots = args.devices * args.per_device
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        groups[im.shape if slots > 1 else (i,)].append(i)
    for members in groups.values():
        for start in range(0, len(members), slots):
            idx = members[start : start + slots]
            state_dir = args.out / (f"{names[idx[0]]}.state" if len(idx) == 1 else f"{names[idx[0]]}.batch.state")
            results = protector.protect(
                [images[i] for i in idx],
                target=target,
                mode="sequential" if args.devices == 1 else args.parallel,
                devices=min(args.devices, -(-len(idx) // args.per_device)),
                per_device=args.per_device,
                batching=args.batching,
                checkpoint_dir=state_dir,
                progress=not args.quiet,
            )
            for i, result in zip(idx, results):
                _write_outputs(args, protector, backbone.name, args.inputs[i], originals[i].shape, images[i], result,
                               protected_paths)
    return 0


def _check_protect_args(args: argparse.Namespace) -> None:
    """The CLI's own settings, checked in the CLI's words before anything is loaded."""
    if not 1.0 <= args.eps <= 255.0:
        raise UserError(f"--eps is in 8-bit levels and must be in [1, 255], got {args.eps:g}"
                        + ("; below one level the saved 8-bit image cannot change" if 0 < args.eps < 1 else ""))
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps} (0 steps would save the input unchanged)")
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    if args.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    _check_out_folder(args.out)


def _check_out_folder(out: Path) -> None:
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"is under the file {parent}"
                raise UserError(f"--out {out} {what}; choose a folder")
            return


def _write_outputs(args, protector, backbone_name, src: Path, input_shape, original, result, protected_paths) -> None:
    import dataclasses
    import math

    import jax
    import numpy as np

    from anti_i2v_jax import io, metrics
    from anti_i2v_jax.attack import _Layers, uses_target

    stem = args.out / src.stem
    alpha = io.load_alpha(src, result.image.shape[:2])  # None for an opaque input
    saved = result.image if alpha is None else np.concatenate([result.image, alpha[..., None]], axis=-1)
    image_path = io.save_image(f"{stem}_protected.png", saved, protect=protected_paths)
    config = protector.config
    change = metrics.linf(result.image, original)
    psnr = metrics.psnr(result.image, original)
    reference = (f"auto (generated by {backbone_name} from the photo and the prompt)" if args.reference == "auto"
                 else str(args.reference_video) if args.reference_video else None)
    report = {
        "input": str(src),
        "output": str(image_path),
        "backbone": backbone_name,
        "weights": str(args.weights) if args.weights else None,
        "precision": args.precision,
        "remat": args.remat,
        "method": config.method,
        "prompt": config.prompt,
        "target": (str(args.target) if args.target else f"procedural texture (seed {config.target_seed})")
        if uses_target(config) else None,
        "layers": dataclasses.asdict(_Layers.resolve(protector.backbone, config)),
        "model_size": list(protector.backbone.model_size),
        "frames": protector.backbone.geometry.frames if hasattr(protector.backbone, "geometry") else None,
        "geometry": dataclasses.asdict(protector.backbone.geometry) if hasattr(protector.backbone, "geometry") else None,
        "max_side": args.max_side,
        "input_size": list(input_shape[:2]),
        "alpha": "the input's transparency, put back on the protected RGB (computed on white)" if alpha is not None
        else None,
        "reference_video": reference,
        "lpips": getattr(getattr(protector.backbone, "lpips", None), "source", None),
        "clip": getattr(getattr(protector.backbone, "clip", None), "source", None),
        "terms_off": protector.term_notes,
        "settings": config.to_dict(),
        "size": list(original.shape[:2]),
        "linf_levels": change,
        "linf": change / 255.0,
        "budget_levels": config.eps * 255.0,
        "psnr_db": psnr if math.isfinite(psnr) else None,  # None: the image is unchanged
        "ssim": metrics.ssim(result.image, original),
        "wall_seconds": result.seconds,
        "resumed_from_step": result.resumed_from,
        "devices": args.devices,
        "per_device": args.per_device,
        "batching": args.batching if args.per_device > 1 else None,
        "jax": {"version": jax.__version__, "backend": jax.default_backend()},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "history": {k: v.tolist() for k, v in result.history.items()},
    }
    io.save_json(f"{stem}_report.json", report, protect=protected_paths)
    _plot_losses(Path(f"{stem}_loss.png"), result.history, f"{src.name} [{backbone_name}, {config.method}]", protected_paths)
    print(f"{src} -> {image_path}  (L-inf {change}/255, PSNR {psnr:.2f} dB, SSIM {report['ssim']:.4f})")


def _plot_losses(path: Path, history, title: str, protected_paths) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anti_i2v_jax import io

    terms = list(history)
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    for ax, term in zip(axes[0], terms):
        values = np.asarray(history[term], np.float64)
        ax.plot(values, lw=0.8, alpha=0.35, label="per step")
        k = max(1, len(values) // 20)  # terms with a random timestep are noisy step to step
        if k > 1:
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k - 1, len(values)), smooth, lw=1.5, label=f"mean of {k}")
            ax.legend(fontsize=7)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.set_ylabel("loss value" if term != "total" else "weighted objective")
    fig.suptitle(title)
    fig.tight_layout()
    io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), protect=protected_paths)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
