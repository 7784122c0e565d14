"""Golden case for the CR-FIQA iResNet, computed by the upstream PyTorch module (fdbtrs/CR-FIQA
``backbones/iresnet.py``) with seeded weights. Format: tests/golden/README.md, except that the checkpoint is not
stored: an iResNet's widths are fixed (64-512), so even the smallest one is ~25 MB. ``case.json`` records every
key's name and shape and the seed; the weights are ``tools/golden/seeded.py``'s ``seeded_weights(shapes, seed)``,
which the test rebuilds. Runs with torch and the upstream checkout (no other dependency):

    python tools/golden/crfiqa.py --upstream /path/to/CR-FIQA --case tiny-r18
    python tools/golden/crfiqa.py --upstream /path/to/CR-FIQA --check tests/golden/crfiqa/tiny-r18
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import seeded_weights  # noqa: E402

DEFAULT_UPSTREAM = Path("/work/scratch/crfiqa-src")
TOL = {"atol": 1e-4, "rtol": 1e-4}


def run(upstream: Path, case: dict, inputs: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    sys.path.insert(0, str(upstream))
    from backbones.iresnet import IBasicBlock, IResNet

    model = IResNet(IBasicBlock, case["layers"], num_features=case["num_features"], qs=1, use_se=False).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    if case.get("keys") and case["keys"] != shapes:
        raise SystemExit("the upstream module's keys differ from the case's")
    weights = seeded_weights(shapes, case["seed"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        feat, qs = model(torch.from_numpy(inputs))
    return {"embedding": feat.numpy(), "quality": qs.numpy()[:, 0]}, shapes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", type=Path, default=DEFAULT_UPSTREAM)
    p.add_argument("--case", help="write tests/golden/crfiqa/<case>")
    p.add_argument("--check", type=Path, help="recompute a case and compare")
    args = p.parse_args()
    from safetensors.numpy import load_file, save_file

    if args.check:
        case = json.loads((args.check / "case.json").read_text())
        inputs = load_file(args.check / "inputs.safetensors")["images"]
        outputs, _ = run(args.upstream, case, inputs)
        stored = load_file(args.check / "outputs.safetensors")
        for k, v in outputs.items():
            print(k, "max diff", float(np.abs(v - stored[k]).max()))
        return 0
    commit = subprocess.run(["git", "-C", str(args.upstream), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "a8f98da6ee03db1e8dc091b5910931d41d69fa44 (archive)"
    case = {"backbone": "crfiqa", "component": "iresnet", "layers": [2, 2, 2, 2], "num_features": 512, "seed": 0,
            "upstream": f"fdbtrs/CR-FIQA @ {commit}, backbones/iresnet.py",
            "call": "IResNet(IBasicBlock, layers, num_features, qs=1, use_se=False).eval()(images) -> (feat, qs)",
            "weights": "not stored: tools/golden/seeded.py seeded_weights(keys, seed)",
            "inputs": {"images": "(2, 3, 112, 112) float32, normalised BGR faces: a smooth random pattern"},
            "outputs": {"embedding": "(2, 512) feat (after BatchNorm1d)", "quality": "(2,) qs[:, 0]"},
            "tolerance": TOL}
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:112, 0:112] / 112.0
    base = np.stack([np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in range(3)])
    inputs = np.stack([base, -base[::-1]]) * 0.8 + 0.1 * rng.standard_normal((2, 3, 112, 112))
    inputs = inputs.astype(np.float32)
    outputs, shapes = run(args.upstream, case, inputs)
    case["keys"] = shapes
    out = REPO / "tests" / "golden" / "crfiqa" / args.case
    out.mkdir(parents=True, exist_ok=True)
    (out / "case.json").write_text(json.dumps(case, indent=1) + "\n")
    save_file({"images": inputs}, out / "inputs.safetensors")
    save_file(outputs, out / "outputs.safetensors")
    print(f"wrote {out}: quality {outputs['quality']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
