"""Evaluate protection as the paper does: protect, generate from the clean and the protected photo, score.

    python experiments/evaluate.py --images examples/ --out results/ [--backbones cogvideox-tiny,...]
        [--methods anti-i2v,advdm,mist,vgmshield,sds,clean] [--steps 200] [--eps 16] [--seed 0]
        [--prompt TEXT] [--gen-steps N] [--weights NAME=DIR ...] [--dino DIR] [--arcface PTH] [--cfiqa PTH]
        [--qalign-csv FILE]

For every backbone x image x method: protect the photo (the method's preset at ``--eps``/255 and ``--steps``;
``clean`` leaves it as is), generate a video from it with the same seed and prompt as the clean photo's video,
and score every metric (docs/evaluation.md). Inputs: image files, or folders of them; a subfolder of frames
(CelebV-Text style, ``clip/00000.jpg``) contributes its first frame in name order.

Writes under ``--out``:
  ``results.csv``     one row per backbone, image and method: every metric, empty where it has no value, and
                      ``missing`` naming each absent metric with the reason
  ``table.md``        the paper's table (ISM, C-FIQA, Q-A(F), Q-A(V), DINO; mean over images; lower is better),
                      then the offline measures in their own table (never beside the paper's columns)
  ``<backbone>/<image>/``  ``<method>_protected.png``, ``<method>_video.npz`` (the frames; the GIF beside it is
                      for viewing) and ``strip.png`` (the clean video above each method's video)
Restartable: a protected photo or a video already on disk is read back instead of recomputed.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import sys
from collections import defaultdict
from pathlib import Path

IRESNETS = ("iresnet18", "iresnet34", "iresnet50", "iresnet100")  # anti_i2v_jax.eval.iresnet.ARCHS
SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
METHODS = ("anti-i2v", "advdm", "mist", "vgmshield", "sds", "clean")
STRIP_FRAMES = 6


def find_photos(paths: list[Path]) -> dict[str, Path]:
    """name -> image file: files as given; a folder's images, and the first frame of each frame subfolder."""
    from anti_i2v_jax.errors import UserError

    found: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        if name in found and found[name] != path:
            raise UserError(f"two inputs are both named {name!r} ({found[name]}, {path}); rename one")
        found[name] = path

    for p in paths:
        if p.is_file():
            add(p.stem, p)
        elif p.is_dir():
            for child in sorted(p.iterdir()):
                if child.is_file() and child.suffix.lower() in SUFFIXES:
                    add(child.stem, child)
                elif child.is_dir():
                    frames = sorted(f for f in child.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
                    if frames:
                        add(child.name, frames[0])
        else:
            raise UserError(f"{p}: no such file or folder")
    if not found:
        raise UserError(f"no images found in {', '.join(map(str, paths))}")
    return found


def parse_weights(items: list[str]) -> dict[str, Path]:
    from anti_i2v_jax.errors import UserError

    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--weights {item!r}: expected NAME=DIR, e.g. cogvideox-5b-i2v=weights/cogvideox")
        out[name] = Path(path)
    return out


def read_qalign(path: Path | None) -> dict[str, dict[str, float]] | None:
    """``experiments/qalign_score.py``'s CSV: video (``backbone/image/method_video.npz`` under --out),
    qalign_frame, qalign_video -> {video: scores}."""
    if path is None:
        return None
    from anti_i2v_jax.errors import UserError

    if not path.is_file():
        raise UserError(f"--qalign-csv {path}: no such file (experiments/qalign_score.py writes it)")
    with path.open(newline="") as f:
        return {Path(r["video"]).as_posix(): {k: float(r[k]) for k in ("qalign_frame", "qalign_video") if r.get(k)}
                for r in csv.DictReader(f)}


def columns():
    from anti_i2v_jax.eval.suite import OFFLINE_METRICS, PAPER_METRICS

    return ["backbone", "image", "method", *PAPER_METRICS, *OFFLINE_METRICS, "missing"]


def row_of(backbone: str, image: str, method: str, scores: dict) -> dict:
    from anti_i2v_jax.eval.base import Missing

    row = {"backbone": backbone, "image": image, "method": method}
    missing = []
    for k, v in scores.items():
        if isinstance(v, Missing):
            row[k] = ""
            missing.append(f"{k}: {v.reason}")
        else:
            row[k] = "" if v is None else f"{v:.6g}"
    row["missing"] = " | ".join(missing)
    return row


def write_csv(path: Path, rows: list[dict], protect) -> None:
    from anti_i2v_jax.io import atomic_write

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()), protect=protect)


def mean_table(rows: list[dict], metrics: dict[str, tuple[str, str]], arrow: bool) -> tuple[str, dict[str, str]]:
    """A markdown table of the per-(backbone, method) means over images, and the reasons of its n/a cells."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["backbone"], r["method"])].append(r)
    reasons: dict[str, str] = {}
    for r in rows:
        for part in filter(None, r["missing"].split(" | ")):
            key, _, why = part.partition(": ")
            if key in metrics:
                reasons.setdefault(key, why)
    heads = [metrics[k][0] + (" ↓" if arrow else "") for k in metrics]
    lines = ["| Model | Method | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for (backbone, method), members in groups.items():
        cells = []
        for k in metrics:
            values = [float(m[k]) for m in members if m.get(k) not in ("", None)]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "n/a")
        lines.append(f"| {backbone} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines), reasons


def write_table(path: Path, rows: list[dict], settings: str, protect) -> str:
    from anti_i2v_jax.eval.suite import OFFLINE_METRICS, PAPER_METRICS
    from anti_i2v_jax.io import atomic_write

    paper, paper_why = mean_table(rows, PAPER_METRICS, arrow=True)
    offline, offline_why = mean_table(rows, OFFLINE_METRICS, arrow=False)
    parts = [f"# Evaluation ({settings})", "", "## The paper's metrics (mean over images; lower is better)", "",
             paper, ""]
    parts += [f"- n/a {PAPER_METRICS[k][0]}: {why}" for k, why in paper_why.items()]
    parts += ["", "## Offline measures (shipped weights; not comparable with the paper's numbers)", "", offline, ""]
    parts += [f"- {head}: {desc}" for head, desc in OFFLINE_METRICS.values()]
    parts += [f"- n/a {OFFLINE_METRICS[k][0]}: {why}" for k, why in offline_why.items()]
    text = "\n".join(parts) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), protect=protect)
    return text


def save_strip(path: Path, photos: dict[str, object], videos: dict[str, object], protect) -> None:
    """One row per method: its photo, then frames spread over its video (the clean row first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from anti_i2v_jax.io import atomic_write

    methods = list(videos)
    t = len(next(iter(videos.values())))
    picks = np.linspace(0, t - 1, min(STRIP_FRAMES, t)).round().astype(int)
    fig, axes = plt.subplots(len(methods), len(picks) + 1, figsize=(1.6 * (len(picks) + 1), 1.6 * len(methods)),
                             squeeze=False)
    for i, m in enumerate(methods):
        cells = [photos[m], *(videos[m][j] for j in picks)]
        for j, img in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("photo" if j == 0 else f"frame {picks[j - 1]}", fontsize=8)
        axes[i, 0].set_ylabel(m, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), protect=protect)
    plt.close(fig)


def run(args: argparse.Namespace, variants: dict[str, dict] | None = None) -> list[dict]:
    """The whole evaluation; returns the CSV rows. ``variants`` (name -> {"method": preset, "overrides": {...}})
    replaces ``--methods`` with configurations of one's own (the ablation's ladder)."""
    import numpy as np
    from tqdm.auto import tqdm

    import anti_i2v_jax as ai
    from anti_i2v_jax import io
    from anti_i2v_jax.eval.suite import EvalSettings, Evaluator

    backbones = [b for b in args.backbones.split(",") if b]
    variants = variants or {m: {"method": m} for m in args.methods.split(",") if m and m != "clean"}
    methods = [*variants, "clean"]
    unknown = sorted({v["method"] for v in variants.values()} - set(ai.METHODS))
    if unknown:
        raise ai.UserError(f"unknown method(s) {unknown}; choose from clean, {', '.join(ai.METHODS)}")
    if args.steps < 1 or args.eps <= 0:
        raise ai.UserError("--steps must be at least 1 and --eps positive")
    weights = parse_weights(args.weights)
    for flag, path in (("--dino", args.dino), ("--arcface", args.arcface), ("--cfiqa", args.cfiqa)):
        if path is not None and not path.exists():  # before any protection runs
            raise ai.UserError(f"{flag} {path}: no such file or folder")
    photos = find_photos(args.images)
    inputs = list(photos.values())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(EvalSettings(
        dino=args.dino, dino_reference=args.dino_reference, arcface=args.arcface, arcface_arch=args.arcface_arch,
        cfiqa=args.cfiqa, cfiqa_arch=args.cfiqa_arch, qalign=read_qalign(args.qalign_csv)))
    rows: list[dict] = []
    bar = tqdm(total=len(backbones) * len(photos) * len(methods), unit="run", disable=args.quiet)
    for name in backbones:
        backbone = ai.load_backbone(name, weights.get(name))
        gen = {"seed": args.seed}
        if args.gen_steps is not None:
            gen["num_inference_steps"] = args.gen_steps
        for stem, src in photos.items():
            clean = io.fit_max_side(io.load_image(src), args.max_side)
            folder = out / name / stem
            folder.mkdir(parents=True, exist_ok=True)
            prompt = args.prompt
            shots, videos = {}, {}
            for method in ["clean", *[m for m in methods if m != "clean"]]:
                bar.set_description(f"{name} {stem} {method}")
                png = folder / f"{method}_protected.png"
                if method == "clean":
                    photo = clean
                elif png.exists():
                    photo = io.load_image(png)
                else:
                    spec = variants[method]
                    config = ai.AttackConfig.for_method(spec["method"], eps=args.eps / 255.0, steps=args.steps,
                                                        seed=args.seed, prompt=prompt, **spec.get("overrides", {}))
                    photo = ai.protect(backbone, clean, config, checkpoint_dir=out / ".state" / name / stem / method).image
                    io.save_image(png, photo, protect=inputs)
                npz = folder / f"{method}_video.npz"
                if npz.exists():
                    video = np.load(npz)["frames"]
                else:
                    video = backbone.generate(photo, prompt, **gen)
                    io.atomic_write(npz, lambda f, v=video: np.savez_compressed(f, frames=v), protect=inputs)
                    io.save_video(folder / f"{method}_video.gif", video, fps=8, protect=inputs)
                shots[method], videos[method] = photo, video
                scores = evaluator.photo(clean, photo)
                scores.update(evaluator.video(clean, videos["clean"], video, video_name=f"{name}/{stem}/{npz.name}"))
                rows.append(row_of(name, stem, method, scores))
                write_csv(out / "results.csv", rows, inputs)
                bar.update()
            save_strip(folder / "strip.png", shots, videos, inputs)
    bar.close()
    _remove_empty_dirs(out / ".state")  # each finished run removed its own checkpoint
    settings = f"eps {args.eps:g}/255, {args.steps} steps, seed {args.seed}, prompt {args.prompt!r}"
    write_table(out / "table.md", rows, settings, inputs)
    return rows


def _remove_empty_dirs(root: Path) -> None:
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files and/or folders of them")
    p.add_argument("--out", type=Path, required=True, help="output folder (results.csv, table.md, per-image folders)")
    p.add_argument("--backbones", default="cogvideox-tiny", help="comma-separated (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated presets and clean (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="protection steps (default: %(default)s, the paper's)")
    p.add_argument("--eps", type=float, default=16.0, help="L-inf budget in 8-bit levels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="protection and generation seed (default: %(default)s)")
    p.add_argument("--prompt", default="a person looking at the camera",
                   help="caption for protection and generation, the same for clean and protected (default: %(default)r)")
    p.add_argument("--gen-steps", type=int, help="denoising steps of generation (default: the backbone's)")
    p.add_argument("--max-side", type=int, default=None, help="downscale inputs whose longer side exceeds this")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=DIR",
                   help="converted weights of a real backbone; repeat per backbone")
    p.add_argument("--dino", type=Path, help="local facebook/dino-vits16 folder (config.json + safetensors)")
    p.add_argument("--dino-reference", choices=("clean-video", "clean-photo"), default="clean-video",
                   help="DINO against the clean photo's video frame by frame, or against the clean photo "
                   "(default: %(default)s)")
    p.add_argument("--arcface", type=Path, help="the ISM column: a folder with DeepFace's arcface_weights.h5 + retinaface.h5 (the paper's pipeline), a local insightface ONNX model pack folder (e.g. buffalo_l: SCRFD detector + ArcFace) or an arcface_torch backbone.pth (on dlib faces)")
    p.add_argument("--arcface-arch", choices=IRESNETS, default="iresnet100",
                   help="the ArcFace checkpoint's iResNet (default: %(default)s)")
    p.add_argument("--cfiqa", type=Path, help="local CR-FIQA backbone.pth (the C-FIQA column)")
    p.add_argument("--cfiqa-arch", choices=IRESNETS, default="iresnet50",
                   help="CR-FIQA (S) is iresnet50, (L) iresnet100 (default: %(default)s)")
    p.add_argument("--qalign-csv", type=Path, help="scores written by experiments/qalign_score.py")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def guarded(prog: str, work) -> int:
    """Run ``work()`` as a script's body: a UserError is one line and exit 2, Ctrl-C exit 130, else 0. Shared by
    the experiment scripts built on this one."""
    from anti_i2v_jax.errors import UserError

    try:
        work()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    code = guarded("evaluate", lambda: run(args))
    if code == 0:
        print(f"wrote {args.out / 'results.csv'} and {args.out / 'table.md'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
