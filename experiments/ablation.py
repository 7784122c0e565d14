"""The ablation ladder: which part of Anti-I2V does what, on the same photos, seed and prompt.

    python experiments/ablation.py --images examples/ --out ablation/ [--backbones cogvideox-tiny,...]
        [--steps 200] [--eps 16] [--gen-steps N] [--weights NAME=DIR ...] [--dino DIR]

Rungs (each the anti-i2v preset with only these changes; terms normalised by their start value as in the
preset):
  rgb             diffusion loss only, RGB sign steps ("similar to AdvDM", without its random start)
  lab             diffusion loss only, a*/b* steps
  dct             diffusion loss only, low-frequency DCT steps
  dual            diffusion loss only, a*/b* and DCT steps alternating (the dual space)
  dual+ira        + IRA on the denoiser
  dual+ira+irc    + IRC
  dual+ira+irc+vae  + IRA on the VAE encoder
  full            the anti-i2v preset (adds the auxiliary CLIP term where the backbone has a CLIP image tower)
Each is evaluated as ``experiments/evaluate.py`` does (one row per rung; ``clean`` is the unprotected row);
writes ``results.csv`` and ``table.md`` under ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate  # noqa: E402

_DM = ("dm", -1.0)
LADDER: dict[str, dict] = {
    "rgb": {"schedule": "rgb", "weights": (_DM,)},
    "lab": {"schedule": "lab", "weights": (_DM,)},
    "dct": {"schedule": "dct", "weights": (_DM,)},
    "dual": {"schedule": "alternate", "weights": (_DM,)},
    "dual+ira": {"schedule": "alternate", "weights": (("ira", 1.0), _DM)},
    "dual+ira+irc": {"schedule": "alternate", "weights": (("irc", 1.0), ("ira", 1.0), _DM)},
    "dual+ira+irc+vae": {"schedule": "alternate", "weights": (("irc", 1.0), ("ira", 1.0), ("ira_vae", 1.0), _DM)},
    "full": {},
}


def variants(rungs: list[str]) -> dict[str, dict]:
    """evaluate.run's variants for the chosen rungs, in ladder order."""
    return {r: {"method": "anti-i2v", "overrides": LADDER[r]} for r in LADDER if r in rungs}


def main(argv=None) -> int:
    p = evaluate.parser()
    p.description = __doc__.split("\n\n")[0]
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--rungs", default=",".join(LADDER), help="comma-separated subset of the ladder (default: all)")
    args = p.parse_args(argv)

    def work():
        from anti_i2v_jax.errors import UserError

        rungs = [r for r in args.rungs.split(",") if r]
        bad = [r for r in rungs if r not in LADDER]
        if bad or not rungs:
            raise UserError(f"unknown rung(s) {bad}; choose from {', '.join(LADDER)}")
        evaluate.run(args, variants(rungs))

    code = evaluate.guarded("ablation", work)
    if code == 0:
        print((args.out / "table.md").read_text())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
