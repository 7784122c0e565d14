"""Q-Align frame and video quality of the videos experiments/evaluate.py generated (PyTorch, a local model).

    python experiments/qalign_score.py RESULTS_DIR --model /path/to/one-align [--device cuda] [--out q.csv]

Reads every ``<backbone>/<image>/<method>_video.npz`` under RESULTS_DIR and scores it with Q-Align
(``q-future/one-align``, a local download: mPLUG-Owl2 with its own code, ``trust_remote_code``; about 16 GB in
fp16, so a GPU). Frame quality: each frame as an image ("How would you rate the quality of this image?"), mean
over frames. Video quality: frames at 1 fps (the backbone's playback rate: CogVideoX and DynamiCrafter 8,
Open-Sora 24) as one video input. The model's ``score`` pads to a square with its processor's mean colour and
weights the softmax over [excellent, good, fair, poor, bad] by [5, 4, 3, 2, 1]; here that is mapped to the
paper's [0, 1] scale by (s - 1) / 4 (anti_i2v_jax.eval.qalign states and tests these rules).
Writes ``qalign.csv`` (video, qalign_frame, qalign_video) in RESULTS_DIR; give it to evaluate.py with
``--qalign-csv`` (a second evaluate run reuses every photo and video on disk).
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="an experiments/evaluate.py --out folder")
    p.add_argument("--model", type=Path, required=True, help="local Q-Align model folder (q-future/one-align)")
    p.add_argument("--device", default="cuda", help="torch device (default: %(default)s)")
    p.add_argument("--out", type=Path, help="CSV to write (default: RESULTS/qalign.csv)")
    args = p.parse_args(argv)

    import numpy as np

    from anti_i2v_jax.eval import qalign
    from anti_i2v_jax.io import atomic_write

    videos = sorted(args.results.glob("*/*/*_video.npz"))
    if not videos:
        print(f"qalign_score: error: no */*/*_video.npz under {args.results}; run experiments/evaluate.py first",
              file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"qalign_score: error: {args.model} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    try:
        import torch
        from PIL import Image
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"qalign_score: error: needs torch and transformers ({e.name} missing)", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, torch_dtype=torch.float16,
                                                 attn_implementation="eager").to(args.device).eval()
    rows = []
    for path in videos:
        frames = np.load(path)["frames"]
        images = [Image.fromarray(f) for f in frames]
        backbone = path.parent.parent.name
        with torch.inference_mode():
            per_frame = model.score(images, task_="quality", input_="image").float().cpu().numpy()
            picks = qalign.sample_1fps(len(frames), qalign.playback_fps(backbone))
            video = model.score([[images[i] for i in picks]], task_="quality", input_="video").float().cpu().numpy()
        rows.append({"video": path.relative_to(args.results).as_posix(),
                     "qalign_frame": f"{float(np.mean(qalign.from_five_point(per_frame))):.6g}",
                     "qalign_video": f"{float(qalign.from_five_point(video[0])):.6g}"})
        print(f"{rows[-1]['video']}: frame {rows[-1]['qalign_frame']}, video {rows[-1]['qalign_video']}", file=sys.stderr)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["video", "qalign_frame", "qalign_video"])
    writer.writeheader()
    writer.writerows(rows)
    out = args.out or args.results / "qalign.csv"
    atomic_write(out, lambda f: f.write(buf.getvalue().encode()))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
