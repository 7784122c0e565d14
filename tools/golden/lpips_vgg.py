"""Golden case for LPIPS-VGG, computed by the ``lpips`` package (v0.1.4: ``lpips.LPIPS(net="vgg")``, the
ScalingLayer, torchvision's VGG16 slices, ``normalize_tensor``, the ``lin`` heads, the spatial average) with seeded
weights, its distances and the gradient of the summed distance with respect to the first image. The weights are
not stored (VGG16's trunk is ~59 MB): ``case.json`` records every key's name and shape and the seed, and the
weights are ``tools/golden/seeded.py``'s ``seeded_weights(keys, seed)``; the ``scaling_layer`` buffers keep
lpips' own constants. Needs a Python with ``lpips`` and a torchvision that imports (a scratch venv: ``pip install
torch==2.14.1 torchvision==0.29.1 lpips``); nothing is downloaded (``pnet_rand=True``, the weights are loaded
over the random ones).

    python tools/golden/lpips_vgg.py --case tiny-vgg
    python tools/golden/lpips_vgg.py --check tests/golden/lpips/tiny-vgg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import seeded_weights  # noqa: E402

TOL = {"atol": 1e-6, "rtol": 1e-4}
SIZES = {"pair": (2, 64, 96), "odd": (1, 45, 61)}  # N, H, W of each input pair (odd: the pools floor)


def _weights(model, case):
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("scaling_layer.")}
    if case.get("keys") and case["keys"] != shapes:
        raise SystemExit("the upstream module's keys differ from the case's")
    weights = seeded_weights(shapes, case["seed"])
    for k in shapes:  # the lin heads are shared by linK and lins.K: the same tensor under two names
        if k.startswith("lins."):
            weights[k] = weights["lin" + k.split(".")[1] + ".model.1.weight"]
    return weights, shapes


def run(case: dict, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    import lpips
    import torch

    # float64: a float32 backward routes max-pool gradients by rounding wherever two values of a 2x2 window
    # are within an ulp or so (a smooth image has a few such windows), so the reference is computed exactly
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().double()
    weights, shapes = _weights(model, case)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v).double() for k, v in weights.items()},
                                                strict=False)
    assert not unexpected and set(missing) == {"scaling_layer.shift", "scaling_layer.scale"}, (missing, unexpected)
    out = {}
    for name in SIZES:
        x = torch.from_numpy(inputs[f"{name}.x"]).double().requires_grad_(True)
        y = torch.from_numpy(inputs[f"{name}.y"]).double()
        d, per_layer = model(x, y, retPerLayer=True, normalize=True)  # normalize: inputs in [0, 1]
        d.sum().backward()
        out[f"{name}.distance"] = d.detach().numpy().reshape(-1)
        for k, v in enumerate(per_layer):
            out[f"{name}.layer.{k}"] = v.detach().numpy().reshape(-1)
        out[f"{name}.grad_x"] = x.grad.numpy()
    return {k: v.astype(np.float32) for k, v in out.items()}, shapes


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for name, (n, h, w) in SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([0.5 + 0.4 * np.sin(5 * xx + c) * np.cos(3 * yy - c) for c in range(3)])
        x = np.stack([np.roll(base, i * 7, axis=-1) for i in range(n)])
        y = np.clip(x + 0.08 * rng.standard_normal(x.shape), 0, 1)
        out[f"{name}.x"], out[f"{name}.y"] = x.astype(np.float32), y.astype(np.float32)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help="write tests/golden/lpips/<case>")
    p.add_argument("--check", type=Path, help="recompute a case and compare")
    args = p.parse_args()
    from safetensors.numpy import load_file, save_file

    if args.check:
        case = json.loads((args.check / "case.json").read_text())
        outputs, _ = run(case, load_file(args.check / "inputs.safetensors"))
        stored = load_file(args.check / "outputs.safetensors")
        for k, v in outputs.items():
            print(k, "max diff", float(np.abs(v - stored[k]).max()))
        return 0
    if not args.case:
        p.error("give --case NAME or --check DIR")
    from importlib.metadata import version

    case = {"backbone": "lpips", "component": "lpips-vgg", "seed": 0,
            "upstream": f"lpips {version('lpips')} (PyPI) with torchvision {version('torchvision')}'s vgg16",
            "call": "lpips.LPIPS(net='vgg', pnet_rand=True).eval().double(), seeded weights loaded over it; "
                    "model(x, y, retPerLayer=True, normalize=True); d.sum().backward(); computed in float64, "
                    "stored in float32 (a float32 backward routes near-tied max-pool windows by rounding)",
            "weights": "not stored: tools/golden/seeded.py seeded_weights(keys, seed); lins.K are linK's tensors; "
                       "scaling_layer buffers are lpips' constants",
            "inputs": {f"{n}.{v}": f"({s[0]}, 3, {s[1]}, {s[2]}) float32 in [0, 1]" for n, s in SIZES.items()
                       for v in "xy"},
            "outputs": {**{f"{n}.distance": f"({s[0]},) LPIPS(x, y)" for n, s in SIZES.items()},
                        **{f"{n}.layer.K": "(N,) the stage-K share of the distance (K = 0..4)" for n in SIZES},
                        **{f"{n}.grad_x": "d sum(LPIPS(x, y)) / dx, like x" for n in SIZES}},
            "tolerance": TOL}
    inputs = _inputs()
    outputs, shapes = run(case, inputs)
    case["keys"] = shapes
    out = REPO / "tests" / "golden" / "lpips" / args.case
    out.mkdir(parents=True, exist_ok=True)
    (out / "case.json").write_text(json.dumps(case, indent=1) + "\n")
    save_file(inputs, out / "inputs.safetensors")
    save_file(outputs, out / "outputs.safetensors")
    print(f"wrote {out}: distances {outputs['pair.distance']} {outputs['odd.distance']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
