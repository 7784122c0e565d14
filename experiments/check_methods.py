"""Every method on every tiny backbone through the CLI: does the protected image differ from the input?

    python experiments/check_methods.py [--steps 4] [--methods a,b] [--backbones x,y] [--image PATH]

Runs ``anti-i2v protect IMAGE --method M --backbone B --steps N`` in this process for each pair, into a
temporary folder, and prints one table row per pair: the L-inf change in 8-bit levels, the PSNR, the terms
that were on (and any that the backbone cannot compute) and the wall time. Exits 1 if any run left the
image unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from anti_i2v_jax import METHODS
    from anti_i2v_jax.backbones import registry
    from anti_i2v_jax.cli import main as cli

    tiny = [s.name for s in registry.specs() if s.abstract is None]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default=",".join(sorted(METHODS)))
    parser.add_argument("--backbones", default=",".join(tiny))
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "astronaut.png")
    args = parser.parse_args(argv)

    print("| backbone | method | L-inf (levels) | PSNR dB | terms | off | seconds |")
    print("|---|---|---|---|---|---|---|")
    unchanged = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            for method in args.methods.split(","):
                out = Path(tmp) / f"{backbone}-{method}"
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    code = cli(["protect", str(args.image), "--method", method, "--backbone", backbone,
                                "--steps", str(args.steps), "--out", str(out), "--quiet"])
                seconds = time.perf_counter() - t0
                if code != 0:
                    print(f"| {backbone} | {method} | exit {code} | | | | {seconds:.0f} |", flush=True)
                    unchanged.append((backbone, method))
                    continue
                report = json.loads((out / f"{args.image.stem}_report.json").read_text())
                terms = ", ".join(k for k in report["history"] if k != "total")
                off = ", ".join(report.get("terms_off", {})) or "-"
                psnr = report["psnr_db"]
                print(f"| {backbone} | {method} | {report['linf_levels']} | "
                      f"{'inf' if psnr is None else f'{psnr:.1f}'} | {terms} | {off} | {seconds:.0f} |", flush=True)
                if report["linf_levels"] == 0:
                    unchanged.append((backbone, method))
    if unchanged:
        print(f"unchanged: {unchanged}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
