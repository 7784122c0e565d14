"""``python -m weights_convert BACKBONE ...``: convert upstream checkpoints to orbax + config.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anti_i2v_jax.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__)
    sub = parser.add_subparsers(dest="backbone", required=True)
    p = sub.add_parser("cogvideox", help="a diffusers CogVideoX(1.5)-5B-I2V folder")
    p.add_argument("--src", type=Path, required=True, help="the downloaded diffusers folder (model_index.json ...)")
    o = sub.add_parser("opensora", help="hpcai-tech/OpenSora-STDiT-v3 + OpenSora-VAE-v1.2 [+ T5 v1.1 XXL]")
    o.add_argument("--stdit", type=Path, required=True, help="the STDiT3 folder (config.json + model.safetensors)")
    o.add_argument("--vae", type=Path, required=True, help="the VAE folder (config.json + model.safetensors)")
    o.add_argument("--t5", type=Path, help="the T5 encoder folder (config.json + safetensors [+ tokenizer/])")
    d = sub.add_parser("dynamicrafter", help="a DynamiCrafter model.ckpt / model.safetensors + its config.yaml")
    d.add_argument("--src", type=Path, required=True, help="model.ckpt (Lightning) or model.safetensors")
    d.add_argument("--config", type=Path, required=True, help="the inference config.yaml of that checkpoint")
    d.add_argument("--tokenizer", type=Path,
                   help="the CLIP BPE vocabulary to keep for prompts: open_clip's bpe_simple_vocab_16e6.txt.gz (or "
                        "the open_clip package folder holding it), or a folder with vocab.json + merges.txt")
    for each in (p, o, d):
        each.add_argument("--dst", type=Path, help="output folder (new or empty); not needed with --dry-run")
        each.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
        each.add_argument("--dry-run", action="store_true", help="check the mapping and shapes only (safetensors: headers only)")
    args = parser.parse_args(argv)
    try:
        if not args.dry_run and args.dst is None:
            raise UserError("--dst is required unless --dry-run")
        if args.backbone == "cogvideox":
            from weights_convert import cogvideox

            return cogvideox.run(args.src, args.dst, args.dtype, args.dry_run)
        if args.backbone == "dynamicrafter":
            from weights_convert import dynamicrafter

            return dynamicrafter.run(args.src, args.config, args.dst, args.dtype, args.dry_run, args.tokenizer)
        if args.backbone == "opensora":
            from weights_convert import opensora

            return opensora.run(args.stdit, args.vae, args.t5, args.dst, args.dtype, args.dry_run)
    except UserError as e:  # bad input or settings: one line, exit 2 (as anti-i2v)
        print(f"weights_convert: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
