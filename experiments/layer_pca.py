"""The paper's layer analysis: what each denoiser block sees of a photo, as 3-component PCA images.

    python experiments/layer_pca.py --image examples/astronaut.png --out pca/ [--backbone cogvideox-tiny]
        [--weights DIR] [--timesteps 200,500,800] [--layers 0,1,2] [--protected P.png] [--report R.json]

For each timestep: the photo's image condition and video latents are noised at that timestep (one fixed
noise draw, ``--seed``), the denoiser runs once with every block tapped, and each block's video tokens are
projected onto their first 3 principal components, shown as RGB (components fitted on the clean photo's
tokens; min-max scaled per component). ``pca_t<T>.png`` is a grid: one row per block, one column per latent
frame; with ``--protected`` each row shows the clean photo's frames, then the protected photo's (projected on
the clean photo's components), and ``displacement.csv``/``displacement.png`` give per block and timestep the
relative feature change ``||f(protected) - f(clean)|| / ||f(clean)||``: which blocks a protection moves, and
whether they are its IRC/IRA layer choices (marked). ``--report`` (a ``*_report.json`` from ``anti-i2v
protect``) adds ``history.png``: each loss term per step of that run.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
import sys
from pathlib import Path


def token_grid(n_tokens: int, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(frames, h, w) of a transformer tap of ``n_tokens`` video tokens over latents (F, H, W, C): patches of
    1, 2 or 4 pixels, frames patched by 1 or 2 (CogVideoX 1.5 pads to an even count), frame-major order."""
    f, h, w = latent_shape[:3]
    for tf in (1, 2):
        for p in (1, 2, 4):
            grid = (-(-f // tf), h // p, w // p)
            if grid[0] * grid[1] * grid[2] == n_tokens:
                return grid
    raise ValueError(f"cannot lay out {n_tokens} tokens over latents {latent_shape}")


def as_grid(tap, latent_shape):
    """A block tap as (frames, h, w, channels): U-Net taps already are; DiT taps (tokens, D) are unflattened."""
    import numpy as np

    tap = np.asarray(tap, np.float32)
    if tap.ndim == 4:
        return tap
    return tap.reshape(*token_grid(tap.shape[0], latent_shape), tap.shape[-1])


def pca_images(clean, other=None):
    """(frames, h, w, D) features -> uint8 RGB images of their first 3 principal components (fitted on
    ``clean``; ``other`` projected onto the same components and scaled by the clean range)."""
    import numpy as np

    x = clean.reshape(-1, clean.shape[-1])
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:3].T  # (D, 3); fewer than 3 channels leave the rest zero
    basis = np.pad(basis, ((0, 0), (0, 3 - basis.shape[1])))

    def project(f):
        return (f.reshape(-1, f.shape[-1]) - mean) @ basis

    pc = project(clean)
    lo, hi = pc.min(axis=0), pc.max(axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)

    def to_rgb(f):
        return np.clip((project(f) - lo) / scale * 255, 0, 255).astype(np.uint8).reshape(*f.shape[:3], 3)

    return to_rgb(clean), None if other is None else to_rgb(other)


def block_features(backbone, photo, prompt: str, timesteps: list[int], layers: list[int], seed: int):
    """{t: {block: (frames, h, w, D)}} of ``photo`` (uint8) at each timestep, one fixed noise draw."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    params = getattr(backbone, "attack_params", backbone.params)
    text = backbone.encode_text(backbone.params, prompt)  # the text encoder may not be among attack_params

    @jax.jit
    def run(p, x, t):
        cond, _ = backbone.condition(p, x, None)
        noisy = backbone.add_noise(p, cond, jax.random.key(seed), t=t)
        _, taps = backbone.denoise(p, noisy, cond, text, taps=tuple(layers))
        return noisy.x0.shape, taps

    x = jnp.asarray(np.asarray(photo, np.float32) / 255.0)
    out = {}
    for t in timesteps:
        _, taps = run(params, x, t)
        shape = jax.eval_shape(lambda p, xx: backbone.add_noise(p, backbone.condition(p, xx, None)[0],
                                                                 jax.random.key(0), t=t).x0, params, x).shape
        out[t] = {b: as_grid(taps[b], shape) for b in layers}
    return out


def save_grid(path: Path, rows: list[tuple[str, list]], protect, titles=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anti_i2v_jax import io

    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols, 1.1 * len(rows)), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                ax.imshow(images[j], interpolation="nearest")
            else:
                ax.axis("off")
        axes[i, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    for j, title in enumerate(titles):
        axes[0, j].set_title(title, fontsize=7)
    fig.tight_layout()
    io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), protect=protect)
    plt.close(fig)


def plot_lines(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str, protect,
               marks=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anti_i2v_jax import io

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 60 else None, ms=3, label=label)
    for m in marks:
        ax.axvline(m, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), protect=protect)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True, help="the photo")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--backbone", default="cogvideox-tiny", help="backbone name (default: %(default)s)")
    p.add_argument("--weights", type=Path, help="converted weights of a real backbone")
    p.add_argument("--timesteps", default="200,500,800", help="comma-separated, in the backbone's units "
                   "(0-999; default: %(default)s)")
    p.add_argument("--layers", help="comma-separated block indices (default: every block)")
    p.add_argument("--prompt", default="a person looking at the camera", help="caption (default: %(default)r)")
    p.add_argument("--seed", type=int, default=0, help="the noise draw (default: %(default)s)")
    p.add_argument("--protected", type=Path, help="a protected version of the photo, shown beside it")
    p.add_argument("--report", type=Path, help="a protect run's *_report.json: plot its per-step loss terms")
    args = p.parse_args(argv)

    import numpy as np

    import anti_i2v_jax as ai
    from anti_i2v_jax import io

    try:
        timesteps = [int(t) for t in args.timesteps.split(",") if t]
        if not timesteps or any(not 0 <= t < 1000 for t in timesteps):
            raise ai.UserError(f"--timesteps {args.timesteps!r}: give integers in [0, 999]")
        backbone = ai.load_backbone(args.backbone, args.weights)
        n = backbone.layers.num_layers
        layers = list(range(n)) if not args.layers else [int(x) for x in args.layers.split(",")]
        bad = [b for b in layers if not 0 <= b < n]
        if bad:
            raise ai.UserError(f"--layers {bad}: {backbone.name} has blocks 0-{n - 1}")
        photo = io.load_image(args.image)
        protected = io.load_image(args.protected) if args.protected else None
        if protected is not None and protected.shape != photo.shape:
            raise ai.UserError(f"--protected is {protected.shape[1]}x{protected.shape[0]}, the photo "
                               f"{photo.shape[1]}x{photo.shape[0]}: give the protected version of this photo")
        if args.report is not None and not args.report.is_file():
            raise ai.UserError(f"--report {args.report}: no such file")
        try:
            report = json.loads(args.report.read_text()) if args.report else None
        except json.JSONDecodeError as e:
            raise ai.UserError(f"--report {args.report}: not JSON ({e})") from None
        if report is not None and "history" not in report:
            raise ai.UserError(f"{args.report}: no 'history' in it; give a *_report.json written by anti-i2v protect")
        inputs = [p for p in (args.image, args.protected, args.report) if p]
        args.out.mkdir(parents=True, exist_ok=True)

        clean_f = block_features(backbone, photo, args.prompt, timesteps, layers, args.seed)
        prot_f = block_features(backbone, protected, args.prompt, timesteps, layers, args.seed) if protected is not None else None
        for t in timesteps:
            rows = []
            for b in layers:
                a, o = pca_images(clean_f[t][b], None if prot_f is None else prot_f[t][b])
                rows.append((f"block {b}", [*a, *(o if o is not None else [])]))
            frames = len(clean_f[t][layers[0]])
            titles = [f"clean f{i}" for i in range(frames)] + ([f"prot. f{i}" for i in range(frames)] if prot_f else [])
            save_grid(args.out / f"pca_t{t}.png", rows, inputs, titles)
        if prot_f is not None:
            chosen = {"irc": (backbone.layers.irc_early, *backbone.layers.irc_deep), "ira": backbone.layers.ira_layers}
            table, series = [], {}
            for t in timesteps:
                values = []
                for b in layers:
                    c, q = clean_f[t][b], prot_f[t][b]
                    d = float(np.linalg.norm(q - c) / max(np.linalg.norm(c), 1e-12))
                    values.append(d)
                    table.append({"timestep": t, "block": b, "displacement": f"{d:.6g}",
                                  "irc_layer": int(b in chosen["irc"]), "ira_layer": int(b in chosen["ira"])})
                series[f"t={t}"] = (layers, values)
            buf = _io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
            io.atomic_write(args.out / "displacement.csv", lambda f: f.write(buf.getvalue().encode()), protect=inputs)
            plot_lines(args.out / "displacement.png", series, "block", "||f(protected) - f(clean)|| / ||f(clean)||",
                       f"{backbone.name}: feature change per block (dotted: IRC layers)", inputs, marks=chosen["irc"])
        if report is not None:
            history = {k: v for k, v in report["history"].items() if k != "total"}
            series = {k: (list(range(1, len(v) + 1)), v) for k, v in history.items()}
            plot_lines(args.out / "history.png", series, "step", "term value",
                       f"{args.report.name}: loss terms per step", inputs)
    except ai.UserError as e:
        print(f"layer_pca: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
