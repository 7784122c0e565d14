"""Golden case for the paper's ISM pipeline in its Keras form (``anti_i2v_jax/eval/deepface.py``): DeepFace's
ArcFace on RetinaFace detections, as Anti-DreamBooth's evaluation runs them (its patched deepface 0.0.79,
``evaluations/deepface``, with retina-face 0.0.17, whose ``alignment_procedure`` returns the angle and direction
that patched wrapper unpacks).

Two tiny random models are built by the reference code itself (``ArcFace.loadModel`` and ``RetinaFace.build_model``)
with every convolution's filters divided by ``--shrink`` (the class, box and landmark heads keep theirs), their
BatchNorm statistics randomised, and saved with Keras 2's ``save_weights`` as ``arcface_weights.h5`` and
``retinaface.h5`` (the layout of the released files). The detector's class bias and head scales are set so that a
few hundred anchors pass the 0.9 threshold. Then ``DeepFace.represent(model_name="ArcFace",
detector_backend="retinaface", align=True)`` and ``RetinaFace.detect_faces`` run on the bundled portraits and on
three derived images (a small non-square crop, a long strip that hits the detector's 1980-pixel cap, a flat grey
image with no face), and Anti-DreamBooth's choice (the largest face) is recorded. Format: tests/golden/README.md.

Runs in a Python environment with tensorflow(-cpu) 2.21, tf_keras, retina-face==0.0.17 (installed --no-deps),
opencv-python-headless, pillow, pandas, gdown and h5py (not the project venv), on a checkout of Anti-DreamBooth's
``evaluations/deepface`` folder (github.com/VinAIResearch/Anti-DreamBooth):

    TF_USE_LEGACY_KERAS=1 python tools/golden/deepface_keras.py --deepface-src DIR --case tiny
    TF_USE_LEGACY_KERAS=1 python tools/golden/deepface_keras.py --deepface-src DIR --check tests/golden/deepface/tiny

Nothing of deepface or retina-face is copied: their modules are imported and called. Two import-level shims: the
ArcFace module's ``training.Model`` (TensorFlow's internal Keras, which cannot build tf_keras layers) is pointed at
``tf_keras.Model``, and the weight downloads are replaced by the random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHRINK = 8
EMBED = 64


def images() -> dict[str, np.ndarray]:
    """BGR uint8 images, as cv2.imread gives them to deepface."""
    from PIL import Image

    rgb = {p.stem: np.asarray(Image.open(REPO / "examples" / p.name).convert("RGB"))
           for p in (Path("astronaut.png"), Path("grace_hopper.png"))}
    out = {k: v[..., ::-1].copy() for k, v in rgb.items()}
    out["crop"] = out["grace_hopper"][40:340, 60:280].copy()  # 300x220: non-square, upscaled by 1024/220
    out["strip"] = out["astronaut"][100:190, :].copy()  # 90x512: 1024/90 would pass 1980 on the long side
    out["grey"] = np.full((200, 260, 3), 128, np.uint8)
    return out


def _shrunk(layer, shrink: int, keep_below: int = 64):
    def make(*args, **kw):
        if "filters" in kw:
            filters = kw.pop("filters")
        else:
            filters, args = args[0], args[1:]
        if filters >= keep_below:
            filters //= shrink
        return layer(filters, *args, **kw)

    return make


def _randomise_bn(model, rng) -> None:
    import tf_keras

    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            values = []
            for w in layer.weights:
                n, shape = w.name.split("/")[-1], tuple(w.shape)
                if n.startswith("gamma"):
                    values.append(rng.uniform(0.6, 1.4, shape))
                elif n.startswith("beta"):
                    values.append(rng.normal(0, 0.1, shape))
                elif n.startswith("moving_mean"):
                    values.append(rng.normal(0, 0.1, shape))
                else:
                    values.append(rng.uniform(0.6, 1.4, shape))
            layer.set_weights([v.astype(np.float32) for v in values])


def build(deepface_src: Path, shrink: int, seed: int):
    """The reference modules and the two tiny models: (DeepFace, FaceDetector, RetinaFace module, arcface, det)."""
    import tensorflow as tf
    import tf_keras

    sys.path.insert(0, str(deepface_src))
    tf.random.set_seed(seed)
    tf_keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    from deepface import DeepFace
    from deepface.basemodels import ArcFace
    from deepface.detectors import FaceDetector
    from retinaface import RetinaFace
    from retinaface.model import retinaface_model

    # ---- RetinaFace: the reference graph, narrower.
    retinaface_model.Conv2D = _shrunk(tf_keras.layers.Conv2D, shrink)
    retinaface_model.load_weights = lambda model: model
    det = retinaface_model.build_model()
    _randomise_bn(det, rng)
    bn = det.get_layer("bn_data")
    bn.set_weights([np.ones(3, np.float32), np.zeros(3, np.float32), np.array([123.7, 116.3, 103.5], np.float32),
                    np.array([58.4, 57.1, 57.4], np.float32) ** 2])
    for stride in (8, 16, 32):
        for head, scale in (("bbox_pred", 0.05), ("landmark_pred", 0.05)):
            layer = det.get_layer(f"face_rpn_{head}_stride{stride}")
            k, b = layer.get_weights()
            layer.set_weights([k * scale, b * 0])
    probe = {k: v for k, v in images().items() if k in ("astronaut", "grace_hopper")}
    for stride in (8, 16, 32):  # fg - bg logit so that ~0.3% of anchors pass 0.9
        layer = det.get_layer(f"face_rpn_cls_score_stride{stride}")
        k, b = layer.get_weights()
        k = k * 0.5
        layer.set_weights([k, np.zeros_like(b)])
    diffs = []
    from retinaface.commons import preprocess
    for bgr in probe.values():
        x, _, _ = preprocess.preprocess_image(bgr, True)
        outs = det(x)
        for i in range(3):
            p = outs[3 * i].numpy()[..., 2:]
            diffs.append(np.log(p / (1 - p + 1e-12) + 1e-12).ravel())
    diff = np.concatenate(diffs)
    shift = float(np.log(9.0) - np.quantile(diff, 0.997))
    for stride in (8, 16, 32):
        layer = det.get_layer(f"face_rpn_cls_score_stride{stride}")
        k, b = layer.get_weights()
        layer.set_weights([k, np.array([0, 0, shift, shift], np.float32)])

    # ---- ArcFace: the reference graph, narrower; its embedding EMBED-wide.
    ArcFace.training = types.SimpleNamespace(Model=tf_keras.Model)
    ArcFace.Conv2D = _shrunk(tf_keras.layers.Conv2D, shrink)
    ArcFace.Dense = lambda units, **kw: tf_keras.layers.Dense(EMBED, **kw)
    home = Path(os.environ["DEEPFACE_HOME"])
    (home / ".deepface" / "weights").mkdir(parents=True, exist_ok=True)
    (home / ".deepface" / "weights" / "arcface_weights.h5").write_bytes(b"")  # so loadModel skips the download
    load = tf_keras.Model.load_weights
    tf_keras.Model.load_weights = lambda self, *a, **k: None
    try:
        arcface = ArcFace.loadModel()
    finally:
        tf_keras.Model.load_weights = load
    _randomise_bn(arcface, rng)
    for layer in arcface.layers:  # PReLU slopes off their 0 init
        if isinstance(layer, tf_keras.layers.PReLU):
            layer.set_weights([rng.uniform(0.05, 0.4, tuple(layer.weights[0].shape)).astype(np.float32)])

    DeepFace.model_obj = {"ArcFace": arcface}
    FaceDetector.face_detector_obj = {"retinaface": det}
    return DeepFace, RetinaFace, arcface, det


def compute(deepface_src: Path, folder: Path, shrink: int, seed: int, write: bool) -> tuple[dict, dict]:
    import tf_keras

    DeepFace, RetinaFace, arcface, det = build(deepface_src, shrink, seed)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        arcface.save_weights(str(folder / "arcface_weights.h5"))
        det.save_weights(str(folder / "retinaface.h5"))
    else:  # --check: the stored weights, loaded by the reference code's own call
        arcface.load_weights(str(folder / "arcface_weights.h5"))
        det.load_weights(str(folder / "retinaface.h5"))
    del tf_keras
    out, faces = {}, {}
    for name, bgr in images().items():
        found = RetinaFace.detect_faces(bgr, threshold=0.9, model=det)
        faces[name] = len(found)
        if found:
            out[f"{name}.score"] = np.array([f["score"] for f in found.values()], np.float32)
            out[f"{name}.area"] = np.array([f["facial_area"] for f in found.values()], np.float32)
            out[f"{name}.landmarks"] = np.array(
                [[f["landmarks"][k] for k in ("right_eye", "left_eye", "nose", "mouth_right", "mouth_left")]
                 for f in found.values()], np.float32)
        try:
            resps = DeepFace.represent(img_path=bgr, model_name="ArcFace", enforce_detection=True,
                                       detector_backend="retinaface", align=True)
        except ValueError:
            continue
        out[f"{name}.embeddings"] = np.array([r["embedding"] for r in resps], np.float32)
        out[f"{name}.regions"] = np.array([[r["facial_area"][k] for k in "xywh"] for r in resps], np.float32)
        # Anti-DreamBooth's compute_face_embedding: the largest face (a stable sort by h * w, descending)
        resps = sorted(resps, key=lambda r: r["facial_area"]["h"] * r["facial_area"]["w"], reverse=True)
        out[f"{name}.embedding"] = np.array(resps[0]["embedding"], np.float32)
    # the first faces' crops, as extract_faces hands them to the network (BGR, /255, 112x112)
    from deepface.commons import functions

    for name in ("astronaut", "crop"):
        objs = functions.extract_faces(images()[name], target_size=(112, 112), detector_backend="retinaface",
                                       enforce_detection=True, align=True)
        out[f"{name}.crops"] = np.concatenate([o[0] for o in objs[:4]]).astype(np.float32)
    return out, faces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deepface-src", required=True, type=Path,
                    help="Anti-DreamBooth's evaluations/deepface folder (holds the deepface package)")
    ap.add_argument("--case", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=int, default=SHRINK)
    ap.add_argument("--check", type=Path, help="recompute this case folder and compare with its outputs")
    args = ap.parse_args()
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        sys.exit("set TF_USE_LEGACY_KERAS=1 (the reference code is Keras 2: tf_keras)")
    import tempfile

    from safetensors.numpy import load_file, save_file

    os.environ.setdefault("DEEPFACE_HOME", tempfile.mkdtemp())
    if args.check:
        meta = json.loads((args.check / "case.json").read_text())
        expected = load_file(args.check / "outputs.safetensors")
        got, _ = compute(args.deepface_src, args.check, meta["shrink"], meta["seed"], write=False)
        assert set(got) == set(expected), sorted(set(got) ^ set(expected))
        print(json.dumps({k: float(np.max(np.abs(got[k] - expected[k]))) for k in sorted(got)}, indent=1))
        return
    folder = REPO / "tests" / "golden" / "deepface" / args.case
    out, faces = compute(args.deepface_src, folder, args.shrink, args.seed, write=True)
    save_file(out, folder / "outputs.safetensors")
    import retinaface
    import tensorflow as tf

    meta = {
        "backbone": "deepface",
        "component": "RetinaFace detection (threshold 0.9, NMS 0.4) + eye-angle alignment + deepface's 112x112 "
                     "resize-and-pad + ArcFace (ResNet34), Anti-DreamBooth's ISM pipeline",
        "upstream": f"Anti-DreamBooth evaluations/deepface (deepface 0.0.79, patched RetinaFaceWrapper), retina-face "
                    f"{getattr(retinaface, '__version__', '0.0.17')}, tensorflow {tf.__version__} with tf_keras",
        "call": "RetinaFace.detect_faces(bgr, threshold=0.9, model=det); DeepFace.represent(bgr, model_name='ArcFace', "
                "detector_backend='retinaface', enforce_detection=True, align=True) (ValueError: no face); the "
                "largest facial_area as Anti-DreamBooth's compute_face_embedding; functions.extract_faces for the "
                "crops. Images are handed over in BGR, as cv2.imread reads them.",
        "inputs": {
            "images": "examples/astronaut.png, examples/grace_hopper.png; 'crop' = grace_hopper[40:340, 60:280]; "
                      "'strip' = astronaut[100:190, :]; 'grey' = a flat 200x260 image of 128",
            "models": "arcface_weights.h5 and retinaface.h5 in this folder (Keras 2 save_weights; tiny: filters "
                      f"of 64 and more divided by {args.shrink}, a {EMBED}-d embedding; seeded random weights)",
        },
        "outputs": {
            "<image>.score": "(N,) detect_faces scores, in its order (NMS order, best first)",
            "<image>.area": "(N, 4) facial_area x1, y1, x2, y2 (ints)",
            "<image>.landmarks": "(N, 5, 2) right_eye, left_eye, nose, mouth_right, mouth_left",
            "<image>.embeddings": "(N, E) represent's embedding of every face, in detection order",
            "<image>.regions": "(N, 4) represent's facial_area x, y, w, h",
            "<image>.embedding": "(E,) the largest face's embedding (Anti-DreamBooth's choice)",
            "<image>.crops": "(<=4, 112, 112, 3) extract_faces' network inputs (BGR / 255) of the first faces",
        },
        "faces_found": faces,
        "seed": args.seed,
        "shrink": args.shrink,
        "tolerance": {"atol": 1e-4, "rtol": 1e-4},
        # float32 noise through 36 random-BatchNorm layers: on the astronaut's faces, TensorFlow's float32 run is
        # 4.2e-4 from the same network in float64 (JAX), JAX's float32 run 2.6e-4; embeddings reach |225|.
        "tolerance_embeddings": {"atol": 1e-3, "rtol": 1e-4},
        "generator": f"tools/golden/deepface_keras.py --case {args.case} --seed {args.seed} --shrink {args.shrink}",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({"faces": faces, "sizes": {f.name: f.stat().st_size for f in folder.iterdir()}}, indent=1))


if __name__ == "__main__":
    main()
