"""ISM with insightface's ONNX face pipeline: an SCRFD detector (RetinaFace's successor, with five keypoints)
and an ArcFace recogniser, from a local model pack such as ``buffalo_l`` (``det_10g.onnx`` + ``w600k_r50.onnx``),
run by onnxruntime. Nothing is downloaded.

This is the closest offline path to the paper's protocol (DeepFace's ArcFace on RetinaFace detections, models
that insightface trained): a RetinaFace-family detector finds the face and its five points, the face is aligned to
the ArcFace template (``norm_crop``: least-squares similarity transform, bilinear warp, black borders), and an
ArcFace network embeds it. The steps follow insightface 0.7.3's ``SCRFD.detect`` and ``ArcFaceONNX.get``: the
image is resized into the detector's square input keeping its aspect ratio (top-left, zero padding), normalised
as ``(x - 127.5) / 128`` in RGB; each stride's scores, box distances and keypoint offsets are decoded around
the anchor centres, kept above ``det_thresh``, mapped back to the image and merged by NMS (IoU ``nms_thresh``);
the recogniser sees ``(x - 127.5) / 127.5`` in RGB (or raw pixels for a converted MXNet model, recognised as
insightface does by its leading Sub and Mul nodes). Checked against insightface itself on a golden case of our
own (``tests/golden/insightface``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.eval.align import ARCFACE_TEMPLATE, nms, similarity

# Output count -> (keypoints?, strides, anchors per location), as insightface's SCRFD reads its models.
_LAYOUTS = {6: (False, (8, 16, 32), 2), 9: (True, (8, 16, 32), 2), 10: (False, (8, 16, 32, 64, 128), 1),
            15: (True, (8, 16, 32, 64, 128), 1)}


def _session(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise UserError("the insightface ONNX models need onnxruntime: pip install onnxruntime") from None
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def find_models(folder: str | Path):
    """The detector and the recogniser among the ``.onnx`` files of a model-pack folder, each as ``(path,
    onnxruntime session)``: the detector by its 6/9/10/15 outputs, the recogniser by its one output and 112x112
    input. Other models of a pack (landmarks, gender/age) are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (give an insightface model pack, e.g. buffalo_l)")
    det = rec = None
    for path in sorted(folder.glob("*.onnx")):
        session = _session(path)
        outputs, shape = session.get_outputs(), session.get_inputs()[0].shape
        if len(outputs) in _LAYOUTS and det is None:
            det = (path, session)
        elif len(outputs) == 1 and list(shape[2:4]) == [112, 112] and rec is None:
            rec = (path, session)
    if det is None or rec is None:
        missing = " and ".join(n for n, p in (("a detector (SCRFD)", det), ("a recogniser (ArcFace, 112x112)", rec))
                               if p is None)
        raise UserError(f"{folder}: no {missing} among its .onnx files (expected a pack such as buffalo_l: "
                        "det_10g.onnx + w600k_r50.onnx)")
    return det, rec


class InsightFace:
    """A loaded detector + recogniser pair (``find_models`` of a folder, or the two files)."""

    def __init__(self, models: str | Path | tuple[str | Path, str | Path], *, det_size: int = 640,
                 det_thresh: float = 0.5, nms_thresh: float = 0.4):
        if isinstance(models, tuple):
            (det, self.det), (rec, self.rec) = ((Path(m), _session(Path(m))) for m in models)
        else:  # the pack's sessions, loaded once while finding them
            (det, self.det), (rec, self.rec) = find_models(models)
        n_out = len(self.det.get_outputs())
        if n_out not in _LAYOUTS:
            raise UserError(f"{det}: {n_out} outputs; an SCRFD detector has 6, 9, 10 or 15")
        self.use_kps, self.strides, self.anchors = _LAYOUTS[n_out]
        if not self.use_kps:
            raise UserError(f"{det}: a detector without keypoints cannot align faces for ArcFace")
        shape = self.det.get_inputs()[0].shape
        self.det_size = (det_size, det_size) if isinstance(shape[2], str) or shape[2] is None else (shape[3], shape[2])
        self.det_thresh, self.nms_thresh = det_thresh, nms_thresh
        self.rec_size = tuple(self.rec.get_inputs()[0].shape[2:4][::-1])
        import onnx

        first = [n.name for n in onnx.load(str(rec)).graph.node[:8]]
        mxnet = any(n.startswith(("Sub", "_minus")) for n in first) and any(n.startswith(("Mul", "_mul")) for n in first)
        self.rec_mean, self.rec_std = (0.0, 1.0) if mxnet else (127.5, 127.5)

    # ------------------------------------------------------------------------------------------ detection

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Faces of ``image`` (uint8 (H, W, 3) RGB): boxes ``(N, 5)`` (x1, y1, x2, y2, score) in its pixels, best
        first after NMS, and their keypoints ``(N, 5, 2)`` (eyes, nose, mouth corners)."""
        import cv2

        image = np.ascontiguousarray(np.asarray(image)[..., :3])
        w_in, h_in = self.det_size
        ratio = image.shape[0] / image.shape[1]
        if ratio > h_in / w_in:
            new_h, new_w = h_in, int(h_in / ratio)
        else:
            new_w, new_h = w_in, int(w_in * ratio)
        scale = new_h / image.shape[0]
        canvas = np.zeros((h_in, w_in, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        blob = ((canvas.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 128.0)).transpose(2, 0, 1)[None]
        outs = self.det.run(None, {self.det.get_inputs()[0].name: blob})
        batched = outs[0].ndim == 3
        fmc = len(self.strides)
        scores, boxes, points = [], [], []
        for i, stride in enumerate(self.strides):
            s, b, k = (outs[i + j * fmc][0] if batched else outs[i + j * fmc] for j in range(3))
            gy, gx = np.mgrid[: h_in // stride, : w_in // stride]
            centres = (np.stack([gx, gy], -1).astype(np.float32) * stride).reshape(-1, 2)
            centres = np.repeat(centres, self.anchors, axis=0)  # the anchors of a location are consecutive
            keep = np.where(s >= self.det_thresh)[0]
            b, k = b * stride, k * stride
            box = np.stack([centres[:, 0] - b[:, 0], centres[:, 1] - b[:, 1],
                            centres[:, 0] + b[:, 2], centres[:, 1] + b[:, 3]], -1)
            kps = (np.tile(centres, 5) + k).reshape(-1, 5, 2)
            scores.append(s[keep])
            boxes.append(box[keep])
            points.append(kps[keep])
        score = np.vstack(scores).ravel()
        order = score.argsort()[::-1]
        dets = np.hstack([np.vstack(boxes) / scale, np.vstack(scores)]).astype(np.float32)[order]
        kpss = (np.vstack(points) / scale)[order]
        keep = nms(dets, self.nms_thresh)  # insightface keeps an IoU equal to the threshold
        return dets[keep], kpss[keep].astype(np.float32)

    # ---------------------------------------------------------------------------------------- recognition

    def crop(self, image: np.ndarray, points: np.ndarray) -> np.ndarray:
        """The face with keypoints ``points`` aligned to the ArcFace template (uint8, RGB), as ``norm_crop``."""
        import cv2

        size = self.rec_size[0]
        template = ARCFACE_TEMPLATE.astype(np.float32) * np.float32(size / 112.0)  # insightface's float32 template
        m = similarity(np.asarray(points, np.float32).astype(np.float64), template.astype(np.float64))
        return cv2.warpAffine(np.ascontiguousarray(np.asarray(image)[..., :3]), m, (size, size), borderValue=0.0)

    def embedding(self, crop: np.ndarray) -> np.ndarray:
        blob = ((crop.astype(np.float32) - np.float32(self.rec_mean)) / np.float32(self.rec_std)).transpose(2, 0, 1)
        return self.rec.run(None, {self.rec.get_inputs()[0].name: blob[None]})[0][0].astype(np.float32)

    def embed(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """The embedding of each frame's best face (highest detection score), None where none is found."""
        out: list[np.ndarray | None] = []
        for frame in frames:
            dets, kps = self.detect(frame)
            out.append(self.embedding(self.crop(frame, kps[0])).astype(np.float64) if len(dets) else None)
        return out

    def ism(self, clean_photos: Sequence[np.ndarray], frames: Sequence[np.ndarray]) -> dict:
        """As :func:`anti_i2v_jax.eval.arcface.ism`, faces found by the SCRFD detector."""
        from anti_i2v_jax.eval.arcface import ism

        return ism(self.embed, clean_photos, frames)
