"""Does protection survive purification? Two measurements, written under ``--out``.

    python experiments/robustness.py --images examples/ --out robust/ [--backbones cogvideox-tiny,...]
        [--methods anti-i2v] [--purifications none,jpeg90,jpeg75,jpeg50,blur,resize0.5] [--steps 200] [--eps 16]

1. Without any model (always): for each photo and each perturbation space (RGB, a*/b*, low-frequency DCT, and
   the alternating schedule), the engine's own projected sign steps along a fixed random direction make a
   perturbation of the full budget; each purification is applied to the clean and the perturbed photo, and
   ``kept`` is the share of the perturbation still there (its component along the original). Writes
   ``survival.csv``, ``survival.md`` (mean over photos) and ``survival.png``.
2. With models (``--backbones``): each method's protected photo (computed, or read back from an
   ``experiments/evaluate.py`` output in the same ``--out``) is purified, a video generated from it with the
   seed and prompt of the clean photo's video, and every metric scored again. Writes ``robustness.csv`` and
   ``robustness.md`` (rows: method + purification; the paper's metrics and the offline ones in separate tables).
Purifications: JPEG at quality 90/75/50, a 5x5 Gaussian blur with sigma 1, and a resize to half size and back.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate  # noqa: E402

IRESNETS = evaluate.IRESNETS
SPACES = {"rgb": "RGB", "lab": "a*/b*", "dct": "DCT (low band)", "alternate": "a*/b* + DCT alternating"}


def model_free(args, photos: dict[str, Path], inputs: list[Path]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from anti_i2v_jax import io
    from anti_i2v_jax.attack import AttackConfig
    from anti_i2v_jax.eval.purify import (
        PURIFICATIONS,
        directional_perturbation,
        survival,
    )

    purifications = [p for p in args.purifications.split(",") if p != "none"]
    rows = []
    for stem, src in photos.items():
        clean = io.fit_max_side(io.load_image(src), args.max_side)
        for space in SPACES:
            protected = directional_perturbation(clean, space, steps=args.steps, eps=args.eps / 255.0, seed=args.seed,
                                                 config=AttackConfig(eps=args.eps / 255.0))
            for name in purifications:
                s = survival(clean, protected, PURIFICATIONS[name])
                rows.append({"image": stem, "space": space, "purification": name, "kept": f"{s['kept']:.4f}",
                             "energy": f"{s['energy']:.4f}"})
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "space", "purification", "kept", "energy"])
    writer.writeheader()
    writer.writerows(rows)
    io.atomic_write(args.out / "survival.csv", lambda f: f.write(buf.getvalue().encode()), protect=inputs)

    mean = defaultdict(list)
    for r in rows:
        mean[(r["space"], r["purification"])].append(float(r["kept"]))
    table = [f"Share of the perturbation kept after each purification (mean over {len(photos)} photo(s); "
             f"{args.eps:g}/255, {args.steps} steps along a fixed random direction; 1 = untouched)", "",
             "| Space | " + " | ".join(purifications) + " |", "|---|" + "---|" * len(purifications)]
    for space, label in SPACES.items():
        table.append(f"| {label} | " + " | ".join(f"{np.mean(mean[(space, p)]):.3f}" for p in purifications) + " |")
    text = "\n".join(table) + "\n"
    io.atomic_write(args.out / "survival.md", lambda f: f.write(text.encode()), protect=inputs)

    fig, ax = plt.subplots(figsize=(1.2 * len(purifications) + 2, 3))
    width = 0.8 / len(SPACES)
    for i, (space, label) in enumerate(SPACES.items()):
        ax.bar(np.arange(len(purifications)) + i * width, [np.mean(mean[(space, p)]) for p in purifications],
               width, label=label)
    ax.set_xticks(np.arange(len(purifications)) + 0.4 - width / 2, purifications)
    ax.set_ylabel("perturbation kept")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    io.atomic_write(args.out / "survival.png", lambda f: fig.savefig(f, format="png", dpi=100), protect=inputs)
    plt.close(fig)
    return text


def with_models(args, photos: dict[str, Path], inputs: list[Path]) -> str:
    import numpy as np
    from tqdm.auto import tqdm

    import anti_i2v_jax as ai
    from anti_i2v_jax import io
    from anti_i2v_jax.eval.purify import PURIFICATIONS
    from anti_i2v_jax.eval.suite import EvalSettings, Evaluator

    backbones = [b for b in args.backbones.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    purifications = args.purifications.split(",")
    weights = evaluate.parse_weights(args.weights)
    evaluator = Evaluator(EvalSettings(
        dino=args.dino, dino_reference=args.dino_reference, arcface=args.arcface, arcface_arch=args.arcface_arch,
        cfiqa=args.cfiqa, cfiqa_arch=args.cfiqa_arch))
    gen = {"seed": args.seed, **({"num_inference_steps": args.gen_steps} if args.gen_steps else {})}
    rows = []
    bar = tqdm(total=len(backbones) * len(photos) * len(methods) * len(purifications), unit="video",
               disable=args.quiet)
    for name in backbones:
        backbone = ai.load_backbone(name, weights.get(name))
        for stem, src in photos.items():
            clean = io.fit_max_side(io.load_image(src), args.max_side)
            folder = args.out / name / stem
            folder.mkdir(parents=True, exist_ok=True)
            clean_npz = folder / "clean_video.npz"
            if clean_npz.exists():
                clean_video = np.load(clean_npz)["frames"]
            else:
                clean_video = backbone.generate(clean, args.prompt, **gen)
                io.atomic_write(clean_npz, lambda f, v=clean_video: np.savez_compressed(f, frames=v), protect=inputs)
            for method in methods:
                png = folder / f"{method}_protected.png"
                if png.exists():
                    protected = io.load_image(png)
                else:
                    config = ai.AttackConfig.for_method(method, eps=args.eps / 255.0, steps=args.steps,
                                                        seed=args.seed, prompt=args.prompt)
                    protected = ai.protect(backbone, clean, config,
                                           checkpoint_dir=args.out / ".state" / name / stem / method).image
                    io.save_image(png, protected, protect=inputs)
                for purification in purifications:
                    bar.set_description(f"{name} {stem} {method} {purification}")
                    photo = PURIFICATIONS[purification](protected)
                    npz = folder / f"{method}_{purification}_video.npz"
                    if npz.exists():
                        video = np.load(npz)["frames"]
                    else:
                        video = backbone.generate(photo, args.prompt, **gen)
                        io.atomic_write(npz, lambda f, v=video: np.savez_compressed(f, frames=v), protect=inputs)
                    scores = evaluator.photo(clean, photo)
                    scores.update(evaluator.video(clean, clean_video, video))
                    rows.append(evaluate.row_of(name, stem, f"{method} + {purification}", scores))
                    bar.update()
    bar.close()
    evaluate._remove_empty_dirs(args.out / ".state")
    evaluate.write_csv(args.out / "robustness.csv", rows, inputs)
    return evaluate.write_table(args.out / "robustness.md", rows,
                                f"purified before generation; eps {args.eps:g}/255, {args.steps} steps", inputs)


def main(argv=None) -> int:
    from anti_i2v_jax.eval.purify import PURIFICATIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files and/or folders of them")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--backbones", default="", help="comma-separated; empty (default): only the model-free part")
    p.add_argument("--methods", default="anti-i2v", help="comma-separated presets (default: %(default)s)")
    p.add_argument("--purifications", default=",".join(PURIFICATIONS),
                   help=f"comma-separated, of {', '.join(PURIFICATIONS)} (default: all)")
    p.add_argument("--steps", type=int, default=200, help="protection steps (default: %(default)s)")
    p.add_argument("--eps", type=float, default=16.0, help="L-inf budget in 8-bit levels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="protection and generation seed (default: %(default)s)")
    p.add_argument("--prompt", default="a person looking at the camera", help="caption (default: %(default)r)")
    p.add_argument("--gen-steps", type=int, help="denoising steps of generation (default: the backbone's)")
    p.add_argument("--max-side", type=int, help="downscale inputs whose longer side exceeds this")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=DIR", help="converted weights, per backbone")
    p.add_argument("--dino", type=Path, help="local facebook/dino-vits16 folder")
    p.add_argument("--dino-reference", choices=("clean-video", "clean-photo"), default="clean-video")
    p.add_argument("--arcface", type=Path, help="a folder with DeepFace's arcface_weights.h5 + retinaface.h5, a local insightface ONNX model pack folder (e.g. buffalo_l) or an arcface_torch backbone.pth")
    p.add_argument("--arcface-arch", choices=IRESNETS, default="iresnet100")
    p.add_argument("--cfiqa", type=Path, help="local CR-FIQA backbone.pth")
    p.add_argument("--cfiqa-arch", choices=IRESNETS, default="iresnet50")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def work():
        from anti_i2v_jax.errors import UserError

        bad = [x for x in args.purifications.split(",") if x not in PURIFICATIONS]
        if bad:
            raise UserError(f"unknown purification(s) {bad}; choose from {', '.join(PURIFICATIONS)}")
        if args.steps < 1 or args.eps <= 0:
            raise UserError("--steps must be at least 1 and --eps positive")
        photos = evaluate.find_photos(args.images)
        inputs = list(photos.values())
        args.out.mkdir(parents=True, exist_ok=True)
        print(model_free(args, photos, inputs))
        if args.backbones:
            print(with_models(args, photos, inputs))

    return evaluate.guarded("robustness", work)


if __name__ == "__main__":
    raise SystemExit(main())
