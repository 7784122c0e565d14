"""Protect every image in a folder tree: a data-pipeline example on the public API.

    python experiments/protect_folder.py IN_DIR --out OUT_DIR [--backbone NAME] [--weights DIR] [--steps N]
        [--method M] [--eps 16] [--prompt TEXT] [--devices N] [--per-device K] [--max-side PIXELS] [--seed S]

Finds the images under IN_DIR (png, jpg, jpeg, webp, bmp, tif, tiff, recursively), downscales those over
``--max-side``, groups them by size and protects each group in rounds of ``--devices`` x ``--per-device``
images (K per device, each device running its own program; with the default ``--batching map`` an image's
bytes do not depend on its batch).
``OUT_DIR`` mirrors the tree: ``a/b.jpg`` -> ``OUT_DIR/a/b_protected.png``. Restartable: images whose output
exists are skipped, and a round cut short resumes from its last checkpoint (``OUT_DIR/.state/``). One
progress bar counts optimisation steps over the whole folder. ``OUT_DIR/results.csv`` gets one row per image:
input, output, size, PSNR, SSIM, L-inf (levels), the final loss, seconds, and an error for an image that could
not be read (the run goes on without it). Every file is written atomically; nothing under IN_DIR is touched.

Several processes (hosts): start one per host with JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=P and
JAX_PROCESS_ID=p (or ``--distributed`` under a cluster manager JAX detects). Each takes every P-th image of
the sorted list, protects it on its own devices exactly as a single process would (same bytes), and writes
its images and ``results.p<p>-of-<P>.csv``; ``--devices`` counts the process's own devices.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io as _io
import sys
from collections import defaultdict
from pathlib import Path

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
COLUMNS = ["input", "output", "height", "width", "psnr_db", "ssim", "linf_levels", "final_loss", "seconds", "error"]


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def output_of(src: Path, in_dir: Path, out_dir: Path) -> Path:
    rel = src.relative_to(in_dir)
    return out_dir / rel.parent / f"{rel.stem}_protected.png"


def read_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["input"]: row for row in csv.DictReader(f)}


def write_rows(path: Path, rows: dict[str, dict], protect) -> None:
    from anti_i2v_jax.io import atomic_write

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for key in sorted(rows):
        writer.writerow({k: rows[key].get(k, "") for k in COLUMNS})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()), protect=protect)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("in_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output folder (mirrors the input tree)")
    parser.add_argument("--backbone", default="cogvideox-tiny")
    parser.add_argument("--weights", type=Path, help="converted weights folder (real backbones)")
    parser.add_argument("--method", default="anti-i2v")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eps", type=float, default=16.0, help="L-inf budget in 8-bit levels")
    parser.add_argument("--prompt", help="one caption for every image (default: the config's)")
    parser.add_argument("--devices", type=int, default=1, help="devices to use, one image program each")
    parser.add_argument("--distributed", action="store_true",
                        help="start JAX's multi-process runtime even without JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
                        "JAX_PROCESS_ID (which start it when set): its cluster detection (SLURM, MPI, ...)")
    parser.add_argument("--per-device", type=int, default=1, metavar="K",
                        help="images per device (a round is devices x K same-size images)")
    parser.add_argument("--batching", choices=("map", "vmap"), default="map",
                        help="K images on a device: map (bytes equal to a run alone) or vmap (fills a large GPU)")
    parser.add_argument("--max-side", type=int, help="downscale images whose longer side exceeds this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from tqdm.auto import tqdm

    import anti_i2v_jax as ai
    from anti_i2v_jax import io, metrics

    try:
        from anti_i2v_jax import distributed

        process, processes = distributed.initialize(required=args.distributed)
        in_dir, out_dir = args.in_dir.resolve(), args.out.resolve()
        if not in_dir.is_dir():
            raise ai.UserError(f"{args.in_dir}: not a folder")
        if out_dir == in_dir or in_dir in out_dir.parents:
            raise ai.UserError("--out must not be inside the input folder (outputs would be found as inputs)")
        if not 1 <= args.devices <= jax.local_device_count():
            raise ai.UserError(f"--devices {args.devices}: this process has {jax.local_device_count()} device(s)")
        if args.per_device < 1:
            raise ai.UserError(f"--per-device must be at least 1, got {args.per_device}")
        overrides = dict(steps=args.steps, eps=args.eps / 255.0, seed=args.seed, chunk_size=args.chunk_size,
                         checkpoint_every=args.checkpoint_every)
        if args.prompt is not None:
            overrides["prompt"] = args.prompt
        config = ai.AttackConfig.for_method(args.method, **overrides)
        found = find_images(in_dir)
        sources = distributed.shard(found, process, processes)  # every process its own share, and its own CSV
        csv_path = out_dir / ("results.csv" if processes == 1 else f"results.p{process}-of-{processes}.csv")
        rows = read_rows(csv_path)
        todo = [p for p in sources if not output_of(p, in_dir, out_dir).exists()]
        share = "" if processes == 1 else f"process {process} of {processes}: {len(sources)} of them; "
        print(f"{len(found)} images under {args.in_dir}; {share}{len(sources) - len(todo)} already done",
              file=sys.stderr)

        images, groups = {}, defaultdict(list)
        for src in todo:
            key = str(src.relative_to(in_dir))
            try:
                images[src] = io.load_image(src, max_side=args.max_side)
            except ai.ImageError as e:
                rows[key] = {"input": key, "error": str(e)}
                continue
            groups[images[src].shape].append(src)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_rows(csv_path, rows, found)
        if not images:
            return 0

        backbone = ai.load_backbone(args.backbone, args.weights)
        protector = ai.Protector(backbone, config)
        bar = tqdm(total=len(images) * config.steps, unit="step", desc=f"{len(images)} images [{backbone.name}]")
        for shape, members in sorted(groups.items()):
            for start in range(0, len(members), args.devices * args.per_device):
                batch = members[start : start + args.devices * args.per_device]
                rels = [str(p.relative_to(in_dir)) for p in batch]
                state = out_dir / ".state" / hashlib.sha256("\n".join(rels).encode()).hexdigest()[:16]
                counted = {"steps": None}

                def advance(step, history, n=len(batch), counted=counted):
                    if counted["steps"] is None:  # a resumed round counts the steps its checkpoint had done
                        counted["steps"] = max(0, step - config.chunk_size)
                        bar.update(counted["steps"] * n)
                    bar.update((step - counted["steps"]) * n)
                    counted["steps"] = step

                results = protector.protect(
                    [images[p] for p in batch], checkpoint_dir=state, callback=advance,
                    mode="dispatch" if args.devices > 1 else "sequential",
                    devices=min(args.devices, -(-len(batch) // args.per_device)),
                    per_device=args.per_device, batching=args.batching,
                )
                for src, rel, result in zip(batch, rels, results):
                    out = output_of(src, in_dir, out_dir)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    io.save_image(out, result.image, protect=found)
                    original = images[src]
                    psnr = metrics.psnr(result.image, original)
                    rows[rel] = {
                        "input": rel, "output": str(out.relative_to(out_dir)), "height": shape[0], "width": shape[1],
                        "psnr_db": f"{psnr:.3f}" if np.isfinite(psnr) else "",
                        "ssim": f"{metrics.ssim(result.image, original):.4f}",
                        "linf_levels": metrics.linf(result.image, original),
                        "final_loss": f"{float(result.history['total'][-1]):.6g}",
                        "seconds": f"{result.seconds:.1f}", "error": "",
                    }
                write_rows(csv_path, rows, found)  # after every round: a restart keeps what is done
        bar.close()
    except ai.UserError as e:
        print(f"protect_folder: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("protect_folder: interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    print(f"wrote {csv_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
