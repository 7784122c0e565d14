"""The paper's main table: evaluate.py over the backbones with the paper's settings, beside its numbers.

    python experiments/reproduce_table.py --images FACES/ --out results/ \\
        --backbones cogvideox-5b-i2v,opensora-1.2,dynamicrafter-512 \\
        --weights cogvideox-5b-i2v=weights/cogvideox --weights opensora-1.2=weights/opensora \\
        --weights dynamicrafter-512=weights/dc512 --dino weights/dino-vits16 [--qalign-csv q.csv]

Runs ``experiments/evaluate.py`` with the paper's shared settings (16/255, 200 steps; every method: anti-i2v,
advdm, mist, vgmshield, sds and clean), then prints the paper's five columns for each backbone and method as
"ours (paper)", the paper's value where it published one (its CelebV-Text table, as far as it is known: not every
row is), and writes the same to ``comparison.md`` under ``--out``. A metric without its model shows "n/a"
with the reason (evaluate.py's table.md lists them); nothing stands in for a paper metric.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate  # noqa: E402

# The paper's CelebV-Text table (ISM, C-FIQA, Q-A(F), Q-A(V), DINO), only the rows that are public.
PAPER = {
    ("CogVideoX", "clean"): (0.721, 0.522, 0.746, 0.802, 0.828),
    ("CogVideoX", "mist"): (0.561, 0.463, 0.476, 0.577, 0.750),
    ("CogVideoX", "anti-i2v"): (0.448, 0.433, 0.447, 0.532, 0.722),
    ("DynamiCrafter", "clean"): (0.528, 0.467, 0.724, 0.794, 0.622),
    ("DynamiCrafter", "advdm"): (0.269, 0.370, 0.167, 0.207, 0.397),
    ("DynamiCrafter", "anti-i2v"): (0.151, 0.303, 0.032, 0.047, 0.167),
}
FAMILIES = {"cogvideox": "CogVideoX", "opensora": "Open-Sora", "dynamicrafter": "DynamiCrafter"}


def family(backbone: str) -> str | None:
    """The paper's model name for a real backbone; None for a built-in tiny one (random weights)."""
    from anti_i2v_jax.backbones import registry

    if not registry.get(backbone).needs_weights:
        return None
    return next((v for k, v in FAMILIES.items() if backbone.startswith(k)), None)


def comparison(rows: list[dict]) -> str:
    """Markdown: per backbone and method, the mean of each paper metric as "ours (paper)"."""
    from anti_i2v_jax.eval.suite import PAPER_METRICS

    keys = list(PAPER_METRICS)
    seen: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        seen.setdefault((r["backbone"], r["method"]), []).append(r)
    lines = ["| Model | Method | " + " | ".join(PAPER_METRICS[k][0] + " ↓" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for (backbone, method), members in seen.items():
        paper = PAPER.get((family(backbone), method))
        cells = []
        for i, k in enumerate(keys):
            values = [float(m[k]) for m in members if m.get(k)]
            ours = f"{sum(values) / len(values):.3f}" if values else "n/a"
            cells.append(f"{ours} ({paper[i]:.3f})" if paper else ours)
        lines.append(f"| {backbone} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = evaluate.parser()
    p.description = __doc__.split("\n\n")[0]
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.set_defaults(backbones="cogvideox-5b-i2v,opensora-1.2,dynamicrafter-512", methods=",".join(evaluate.METHODS),
                   steps=200, eps=16.0)
    args = p.parse_args(argv)
    from anti_i2v_jax.io import atomic_write

    rows: list[dict] = []
    code = evaluate.guarded("reproduce_table", lambda: rows.extend(evaluate.run(args)))
    if code:
        return code
    text = (f"# Ours (paper), eps {args.eps:g}/255, {args.steps} steps\n\n{comparison(rows)}\n\n"
            "The paper's numbers are its CelebV-Text means over its own images and captions; a row without them "
            "was not published. See table.md for the reasons of n/a cells and the offline measures.\n")
    atomic_write(args.out / "comparison.md", lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
