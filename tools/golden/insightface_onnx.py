"""Golden case for the insightface ONNX face pipeline (``anti_i2v_jax/eval/insightface.py``): two tiny random
ONNX models with the interfaces of insightface's model packs (an SCRFD detector with three strides, two anchors
per location and five keypoints, as ``det_10g.onnx``; an ArcFace recogniser on 112x112 crops, as
``w600k_r50.onnx``), and what insightface 0.7.3's own ``SCRFD.detect`` and ``ArcFaceONNX.get`` (``norm_crop``
alignment) give on the bundled portraits and on a flat grey image. Format: tests/golden/README.md.

Runs in a Python environment with insightface 0.7.3, onnx, onnxruntime and OpenCV (not the project venv):

    python tools/golden/insightface_onnx.py --case tiny           # writes tests/golden/insightface/tiny/
    python tools/golden/insightface_onnx.py --check tests/golden/insightface/tiny

The models are built here with ``onnx.helper`` from seeded numpy weights (a few KB); nothing of insightface is
copied: its classes are imported and called.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STRIDES = (8, 16, 32)
ANCHORS = 2
DET_SIZE = 640
IMAGES = ("astronaut.png", "grace_hopper.png")


def detector(seed: int):
    """SCRFD-shaped: per stride, average-pool the input by the stride, then 1x1 convolutions give the scores
    (sigmoid, (N*2, 1)), the box distances (|.|, (N*2, 4)) and the keypoint offsets ((N*2, 10)), anchors of a
    location consecutive; outputs ordered scores, boxes, keypoints, each by stride (insightface's layout)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], {"score": [], "bbox": [], "kps": []}

    def init(name, value):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT if value.dtype == np.float32 else TensorProto.INT64,
                                        value.shape, value.flatten().tolist()))

    for s in STRIDES:
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        for kind, ch, bias in (("score", ANCHORS, -1.5), ("bbox", 4 * ANCHORS, 1.0), ("kps", 10 * ANCHORS, 0.0)):
            w = rng.normal(0, 1.5 if kind == "score" else 0.7, (ch, 3, 1, 1)).astype(np.float32)
            b = (bias + 0.3 * rng.standard_normal(ch)).astype(np.float32)
            init(f"{kind}{s}.w", w)
            init(f"{kind}{s}.b", b)
            nodes.append(helper.make_node("Conv", [f"pool{s}", f"{kind}{s}.w", f"{kind}{s}.b"], [f"{kind}{s}.c"]))
            last = f"{kind}{s}.c"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [f"{kind}{s}.a"]))
                last = f"{kind}{s}.a"
            elif kind == "bbox":
                nodes.append(helper.make_node("Abs", [last], [f"{kind}{s}.a"]))
                last = f"{kind}{s}.a"
            nodes.append(helper.make_node("Transpose", [last], [f"{kind}{s}.t"], perm=[0, 2, 3, 1]))
            width = ch // ANCHORS
            init(f"{kind}{s}.shape", np.array([-1, width], np.int64))
            nodes.append(helper.make_node("Reshape", [f"{kind}{s}.t", f"{kind}{s}.shape"], [f"{kind}_{s}"]))
            outs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [None, width]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
        outs["score"] + outs["bbox"] + outs["kps"], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def recogniser(seed: int, dim: int = 16):
    """ArcFace-shaped: (1, 3, 112, 112) -> conv 3x3 stride 2 -> ReLU -> global mean -> linear -> (1, dim)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed + 1)
    w = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b = (0.1 * rng.standard_normal(8)).astype(np.float32)
    g = rng.normal(0, 0.5, (dim, 8)).astype(np.float32)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, v.shape, v.flatten().tolist())
             for n, v in (("conv.w", w), ("conv.b", b), ("fc.w", g))]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv.w", "conv.b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv_0"),
        helper.make_node("Relu", ["c"], ["r"], name="relu_0"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool_0"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten_0"),
        helper.make_node("Gemm", ["f", "fc.w"], ["683"], transB=1, name="fc_0"),
    ]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [None, 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, [None, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def images() -> dict[str, np.ndarray]:
    from PIL import Image

    out = {Path(n).stem: np.asarray(Image.open(REPO / "examples" / n).convert("RGB")) for n in IMAGES}
    out["grey"] = np.full((320, 320, 3), 128, np.uint8)  # square: no letterbox padding, no score above 0.5
    return out


def compute(folder: Path) -> dict[str, np.ndarray]:
    """insightface's detector and recogniser on every image (BGR, as insightface reads images with OpenCV)."""
    from insightface.app.common import Face
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD
    from insightface.utils import face_align

    det = SCRFD(str(folder / "det.onnx"))
    det.prepare(-1, input_size=(DET_SIZE, DET_SIZE))
    rec = ArcFaceONNX(str(folder / "rec.onnx"))
    rec.prepare(-1)
    out = {}
    for name, rgb in images().items():
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        boxes, kps = det.detect(bgr)
        out[f"{name}.det"] = boxes.astype(np.float32)
        out[f"{name}.kps"] = (np.zeros((0, 5, 2)) if kps is None else kps).astype(np.float32)
        if len(boxes):  # the top face (highest score, first after NMS)
            face = Face(bbox=boxes[0, :4], kps=kps[0], det_score=boxes[0, 4])
            out[f"{name}.crop"] = face_align.norm_crop(bgr, landmark=face.kps, image_size=112)[..., ::-1].copy()
            out[f"{name}.embedding"] = rec.get(bgr, face).astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="case name: writes tests/golden/insightface/<case>/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", help="recompute this case folder and compare with its outputs.safetensors")
    args = ap.parse_args()
    import insightface
    import onnx
    import onnxruntime
    from safetensors.numpy import load_file, save_file

    if args.check:
        folder = Path(args.check)
        expected, got = load_file(folder / "outputs.safetensors"), compute(folder)
        assert set(expected) == set(got), set(expected) ^ set(got)
        worst = max(float(np.max(np.abs(expected[k].astype(np.float64) - got[k]), initial=0)) for k in got)
        print(f"max |diff| {worst:.3e} over {len(got)} outputs")
        sys.exit(0 if worst == 0 else 1)
    folder = REPO / "tests" / "golden" / "insightface" / args.case
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(detector(args.seed), folder / "det.onnx")
    onnx.save(recogniser(args.seed), folder / "rec.onnx")
    out = compute(folder)
    save_file(out, folder / "outputs.safetensors")
    faces = {k[:-4]: int(v.shape[0]) for k, v in out.items() if k.endswith(".det")}
    meta = {
        "backbone": "insightface",
        "component": "SCRFD detection (resize into 640x640, decode, NMS 0.4, threshold 0.5) + norm_crop + ArcFaceONNX",
        "upstream": f"insightface {insightface.__version__} (pip), onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}",
        "call": ("SCRFD('det.onnx').prepare(-1, input_size=(640, 640)); det, kps = detect(bgr); the top face (det[0]) "
                 "-> face_align.norm_crop(bgr, kps[0], 112) and ArcFaceONNX('rec.onnx').get(bgr, Face(...)). Images "
                 "are given to insightface in BGR (as cv2.imread reads them); crops are stored RGB."),
        "inputs": {"images": f"examples/{IMAGES[0]}, examples/{IMAGES[1]} (RGB) and a flat grey 320x320 image",
                   "models": "det.onnx and rec.onnx in this folder (seeded random weights, see the generator)"},
        "outputs": {"<image>.det": "(N, 5) boxes x1, y1, x2, y2 and score, in the image's pixels, after NMS",
                    "<image>.kps": "(N, 5, 2) keypoints of those boxes",
                    "<image>.crop": "(112, 112, 3) uint8 RGB: the top face aligned by norm_crop",
                    "<image>.embedding": "(16,) the recogniser's output for the top face"},
        "faces_found": faces,
        "tolerance": {"atol": 1e-4, "rtol": 1e-5},
        "generator": f"tools/golden/insightface_onnx.py --case {args.case} --seed {args.seed}",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in folder.iterdir():
        f.chmod(0o644)
    print(json.dumps({"faces": faces, "sizes": {f.name: f.stat().st_size for f in folder.iterdir()}}, indent=1))


if __name__ == "__main__":
    main()
