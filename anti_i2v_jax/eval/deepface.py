"""ISM exactly as the paper's reference computes it: DeepFace's ArcFace on RetinaFace detections.

The reference is Anti-DreamBooth's evaluation (``DeepFace.represent(model_name="ArcFace",
detector_backend="retinaface", align=True)`` of its patched deepface 0.0.79, with serengil's retina-face), on the
two Keras weight files that DeepFace downloads on first use and the user supplies here, in one folder:
``arcface_weights.h5`` (ArcFace: insightface's iResNet-34 in Keras, a 512-d embedding) and ``retinaface.h5``
(RetinaFace-R50: a pre-activation ResNet-50, a three-level FPN with SSH context modules, two anchors per location
at strides 32/16/8). Both are read with h5py (every weight mapped and shape-checked) and run in Flax. Nothing is
downloaded, and neither TensorFlow nor DeepFace is needed.

What runs, step by step, as the reference does it:

1. **Detection** (retina-face's ``detect_faces``, threshold 0.9): the BGR image is resized so that its short side
   is 1024 pixels unless the long side would pass 1980 (then the long side is 1980), bilinearly; the network sees
   it in RGB, raw 0-255 (its first BatchNorm normalises). Per stride, anchors ``(x, y) * stride + base``
   (RetinaFace's base anchors: 16-pixel cell, scales 32 and 16 at stride 32, 8 and 4 at 16, 2 and 1 at 8) decode
   the box deltas (centre and log-size, ``+1`` pixel widths) and the five landmark offsets; boxes are clipped to
   the resized image, kept when the face probability is at least the threshold, scaled back to the image, sorted
   by score and merged by greedy NMS (IoU 0.4, ``+1`` areas). A face's box is its integer ``facial_area``.
2. **Alignment** (the patched wrapper + ``alignment_procedure``): the face's box is cut out of the image and
   rotated about its centre (PIL, nearest neighbour) so that the eyes are level, by the angle the two eyes and the
   third corner of their right triangle give (float32, as the reference computes it).
3. **Input** (deepface's ``extract_faces``): resized keeping its aspect ratio to fit 112x112 (bilinear), centred
   on a black 112x112 canvas, ``/ 255``, still in BGR (the order OpenCV read the image in).
4. **Embedding**: ArcFace's output for each face; Anti-DreamBooth keeps the largest face (box ``w * h``, the first
   of equals); no face (the reference's ``enforce_detection`` error) counts toward FDFR.

ISM and FDFR then follow :func:`anti_i2v_jax.eval.arcface.ism`. Checked against the reference code itself (its
Keras models, tiny and random, saved in the released files' layout) on a golden case of our own
(``tests/golden/deepface``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.eval import iresnet
from anti_i2v_jax.eval.align import nms
from anti_i2v_jax.eval.iresnet import BatchNorm

EPS = float(np.float32(2e-5))  # Keras' BatchNormalization epsilon in both files (1.9999999494757503e-05)
STRIDES = (32, 16, 8)  # the network's output order
SCALES = {32: (32, 16), 16: (8, 4), 8: (2, 1)}  # anchor scales of a 16-pixel base cell, per stride
SHORT_SIDE, LONG_SIDE_MAX = 1024, 1980  # retina-face's detection resize
THRESHOLD, NMS_IOU = 0.9, 0.4  # the deepface wrapper's threshold; retina-face's NMS
FACE_SIZE = 112  # ArcFace's input
ARCFACE_FILE, RETINAFACE_FILE = "arcface_weights.h5", "retinaface.h5"


def base_anchors(stride: int) -> np.ndarray:
    """RetinaFace's anchors at one location, ``(A, 4)`` x1, y1, x2, y2: squares of ``16 * scale`` pixels centred
    on the 16-pixel cell's centre 7.5 (``[-248, -248, 263, 263]`` for scale 32)."""
    half = np.array([(16 * s - 1) / 2 for s in SCALES[stride]], np.float32)[:, None]
    return np.concatenate([7.5 - half, 7.5 - half, 7.5 + half, 7.5 + half], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- RetinaFace


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetinaFaceConfig:
    """RetinaFace-R50's widths (the released model's by default; a checkpoint's own are read from its shapes)."""

    stem: int = 64
    widths: tuple[int, ...] = (64, 128, 256, 512)
    units: tuple[int, ...] = (3, 4, 6, 3)
    expansion: int = 4
    fpn: int = 256
    ssh_det: int = 256
    ssh_context: int = 128
    anchors: int = 2


class RetinaFaceNet(nn.Module):
    """The detector; module names are the Keras layer names of ``retinaface.h5``."""

    config: RetinaFaceConfig

    @nn.compact
    def __call__(self, x):
        """``(B, H, W, 3)`` RGB in 0-255 -> per stride 32, 16, 8: ``(face probability (B, h, w, A), box deltas
        (B, h, w, 4A), landmark deltas (B, h, w, 10A))``."""
        cfg = self.config
        relu = jax.nn.relu

        def conv(name, features, k, stride=1, bias=False):
            p = k // 2
            return nn.Conv(features, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=bias, name=name)

        def bn(name):
            return BatchNorm(EPS, name=name)

        def conv_bn_relu(name, features, x, k=1):  # the FPN's convolutions, BatchNorm "<name>_bn"
            return relu(bn(f"{name}_bn")(conv(name, features, k, bias=True)(x)))

        x = bn("bn_data")(x)
        x = relu(bn("bn0")(nn.Conv(cfg.stem, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False, name="conv0")(x)))
        x = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (2, 2), "VALID")  # zeros: x >= 0
        taps = {}
        for s, (width, units) in enumerate(zip(cfg.widths, cfg.units), start=1):
            out = width * cfg.expansion
            for u in range(1, units + 1):  # pre-activation bottlenecks; the first of a stage projects
                p, stride = f"stage{s}_unit{u}", 2 if u == 1 and s > 1 else 1
                a = relu(bn(f"{p}_bn1")(x))
                h = relu(bn(f"{p}_bn2")(conv(f"{p}_conv1", width, 1)(a)))
                taps[p] = h
                h = relu(bn(f"{p}_bn3")(conv(f"{p}_conv2", width, 3, stride)(h)))
                x = conv(f"{p}_conv3", out, 1)(h) + (conv(f"{p}_sc", out, 1, stride)(a) if u == 1 else x)
        c5 = relu(bn("bn1")(x))
        m1 = conv_bn_relu("ssh_m1_red_conv", cfg.fpn, taps["stage3_unit1"])  # stride 8
        c2 = conv_bn_relu("ssh_c2_lateral", cfg.fpn, taps["stage4_unit1"])  # stride 16
        c3 = conv_bn_relu("ssh_c3_lateral", cfg.fpn, c5)  # stride 32
        c2 = conv_bn_relu("ssh_c2_aggr", cfg.fpn, c2 + _up_crop(c3, c2), 3)
        c1 = conv_bn_relu("ssh_c1_aggr", cfg.fpn, m1 + _up_crop(c2, m1), 3)

        def ssh(m, x):
            det = bn(f"{m}_det_conv1_bn")(conv(f"{m}_det_conv1", cfg.ssh_det, 3, bias=True)(x))
            ctx = conv_bn_relu(f"{m}_det_context_conv1", cfg.ssh_context, x, 3)
            ctx2 = bn(f"{m}_det_context_conv2_bn")(conv(f"{m}_det_context_conv2", cfg.ssh_context, 3, bias=True)(ctx))
            ctx3 = conv_bn_relu(f"{m}_det_context_conv3_1", cfg.ssh_context, ctx, 3)
            ctx3 = bn(f"{m}_det_context_conv3_2_bn")(
                conv(f"{m}_det_context_conv3_2", cfg.ssh_context, 3, bias=True)(ctx3))
            return relu(jnp.concatenate([det, ctx2, ctx3], axis=-1))

        outs, a = [], cfg.anchors
        for stride, m, feat in zip(STRIDES, ("ssh_m3", "ssh_m2", "ssh_m1"), (c3, c2, c1)):
            h = ssh(m, feat)
            score = conv(f"face_rpn_cls_score_stride{stride}", 2 * a, 1, bias=True)(h)  # [bg per anchor, fg per anchor]
            prob = jax.nn.softmax(jnp.stack([score[..., :a], score[..., a:]], axis=-1), axis=-1)[..., 1]
            outs.append((prob, conv(f"face_rpn_bbox_pred_stride{stride}", 4 * a, 1, bias=True)(h),
                         conv(f"face_rpn_landmark_pred_stride{stride}", 10 * a, 1, bias=True)(h)))
        return outs


def _up_crop(x, like):
    """Nearest-neighbour 2x upsampling, centre-cropped to ``like``'s height and width (the FPN's merge)."""
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    h, w = like.shape[1:3]
    top, left = (up.shape[1] - h) // 2, (up.shape[2] - w) // 2
    return up[:, top:top + h, left:left + w]


# ---------------------------------------------------------------------------------------------- loading


def _shape(source, key: str, path) -> tuple[int, ...]:
    if key not in source.keys():
        raise UserError(f"{path}: no weight {key}; not a DeepFace {Path(path).name} file")
    return source.shape(key)


def load_retinaface(path: str | Path) -> tuple[RetinaFaceConfig, dict]:
    """``retinaface.h5`` -> (config read from its shapes, Flax parameters); every weight mapped and checked."""
    from weights_convert.core import KerasH5Source, abstract_params, convert
    from weights_convert.deepface import RETINAFACE_RULES

    source = KerasH5Source(path)
    keys = set(source.keys())
    width = lambda key: _shape(source, f"{key}/kernel", path)[-1]  # noqa: E731
    units = tuple(sum(1 for u in range(1, 64) if f"stage{s}_unit{u}_conv1/kernel" in keys) for s in range(1, 5))
    widths = tuple(width(f"stage{s}_unit1_conv1") for s in range(1, 5))
    config = RetinaFaceConfig(stem=width("conv0"), widths=widths, units=units,
                              expansion=width("stage1_unit1_conv3") // widths[0], fpn=width("ssh_c3_lateral"),
                              ssh_det=width("ssh_m3_det_conv1"), ssh_context=width("ssh_m3_det_context_conv1"),
                              anchors=width("face_rpn_cls_score_stride32") // 2)
    abstract = abstract_params(lambda: RetinaFaceNet(config).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    params, _ = convert(source, RETINAFACE_RULES, abstract, dtype=np.float32, what=str(path))
    return config, params


def load_arcface(path: str | Path) -> tuple[iresnet.IResNetConfig, dict]:
    """``arcface_weights.h5`` -> (its iResNet config, Flax parameters); every weight mapped and checked."""
    from weights_convert.core import KerasH5Source, abstract_params, convert
    from weights_convert.deepface import arcface_rules

    source = KerasH5Source(path)
    keys = set(source.keys())
    layers = tuple(sum(1 for b in range(1, 64) if f"conv{s}_block{b}_1_conv/kernel" in keys) for s in range(2, 6))
    widths = tuple(_shape(source, f"conv{s}_block1_1_conv/kernel", path)[-1] for s in range(2, 6))
    dense = [k for k in keys if k.startswith("dense") and k.endswith("/kernel")]
    if len(dense) != 1:
        raise UserError(f"{path}: expected one Dense layer (the embedding's), found {len(dense)}; not a DeepFace "
                        f"{ARCFACE_FILE}")
    config = iresnet.IResNetConfig(layers=layers, widths=widths, num_features=source.shape(dense[0])[-1],
                                   quality_head=False, bn_eps=EPS, flatten="hwc")
    abstract = abstract_params(
        lambda: iresnet.IResNet(config).init(jax.random.key(0), jnp.zeros((1, FACE_SIZE, FACE_SIZE, 3))))
    params, _ = convert(source, arcface_rules(layers), abstract, dtype=np.float32, what=str(path))
    return config, params


# ---------------------------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class Face:
    """One detection: ``score``, ``area`` (x1, y1, x2, y2, integer pixels) and ``landmarks`` (5, 2): right eye,
    left eye, nose, right and left mouth corner (retina-face's names: the person's)."""

    score: float
    area: tuple[int, int, int, int]
    landmarks: np.ndarray


class DeepFace:
    """DeepFace's ArcFace + RetinaFace from a folder holding ``arcface_weights.h5`` and ``retinaface.h5``."""

    def __init__(self, folder: str | Path, *, threshold: float = THRESHOLD):
        folder = Path(folder)
        missing = [n for n in (ARCFACE_FILE, RETINAFACE_FILE) if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder}: no {' or '.join(missing)} (DeepFace's weight files: put "
                            f"{ARCFACE_FILE} and {RETINAFACE_FILE} in one folder)")
        self.det_config, self.det_params = load_retinaface(folder / RETINAFACE_FILE)
        self.config, self.params = load_arcface(folder / ARCFACE_FILE)
        self.threshold = threshold
        det, rec = RetinaFaceNet(self.det_config), iresnet.IResNet(self.config)
        self._detect = jax.jit(lambda p, x: det.apply({"params": p}, x))
        self._embed = jax.jit(lambda p, x: rec.apply({"params": p}, x)[0])

    # ------------------------------------------------------------------------------------------ detection

    def detect(self, image: np.ndarray) -> list[Face]:
        """The faces of ``image`` (uint8 (H, W, 3) RGB) as retina-face's ``detect_faces`` finds them, best first."""
        import cv2

        # The reference resizes the BGR image and hands the network RGB; the resize works per channel, so the RGB
        # image is resized directly.
        rgb = np.ascontiguousarray(np.asarray(image)[..., :3])
        h, w = rgb.shape[:2]
        scale = SHORT_SIDE / float(min(h, w))
        if np.round(scale * max(h, w)) > LONG_SIDE_MAX:
            scale = LONG_SIDE_MAX / float(max(h, w))
        resized = rgb if scale == 1.0 else cv2.resize(rgb, None, None, fx=scale, fy=scale,
                                                      interpolation=cv2.INTER_LINEAR)
        outs = self._detect(self.det_params, resized[None].astype(np.float32))
        boxes, scores, points = [], [], []
        for stride, (prob, box, lmk) in zip(STRIDES, outs):
            prob, box, lmk = (np.asarray(o)[0] for o in (prob, box, lmk))
            anchors = _anchor_grid(box.shape[0], box.shape[1], stride)
            score = prob.reshape(-1, 1)
            keep = np.where(score.ravel() >= self.threshold)[0]
            b = _clip(_decode_boxes(anchors, box.reshape(-1, 4)), resized.shape[:2])[keep]
            b[:, :4] /= scale
            lm = _decode_landmarks(anchors, lmk.reshape(-1, 5, 2))[keep]
            lm /= np.float32(scale)
            boxes.append(b)
            scores.append(score[keep])
            points.append(lm)
        boxes_all = np.vstack(boxes)
        if not len(boxes_all):
            return []
        score = np.vstack(scores)
        order = score.ravel().argsort()[::-1]
        dets = np.hstack([boxes_all[order, :4], score[order]]).astype(np.float32)
        points_all = np.vstack(points)[order].astype(np.float32)
        keep = nms(dets, NMS_IOU, drop_equal=True)
        return [Face(float(dets[i, 4]), tuple(int(v) for v in dets[i, :4].astype(int)), points_all[i]) for i in keep]

    # ------------------------------------------------------------------------------------------ recognition

    def face_input(self, image: np.ndarray, face: Face) -> np.ndarray | None:
        """The network input for ``face`` (float32 (112, 112, 3) BGR in [0, 1]), None for an empty box."""
        x1, y1, x2, y2 = face.area
        crop = np.ascontiguousarray(np.asarray(image)[y1:y2, x1:x2, :3][..., ::-1])  # BGR, as OpenCV read it
        if not (crop.shape[0] > 0 and crop.shape[1] > 0):
            return None
        return _fit(_level_eyes(crop, face.landmarks[0], face.landmarks[1]))

    def represent(self, image: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
        """Every face's embedding and its region (x, y, w, h), in detection order, as ``DeepFace.represent``."""
        out = []
        for face in self.detect(image):
            x = self.face_input(image, face)
            if x is not None:
                x1, y1, x2, y2 = face.area
                out.append((np.asarray(self._embed(self.params, x[None]))[0], (x1, y1, x2 - x1, y2 - y1)))
        return out

    def embed(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """Each frame's embedding of its largest face (Anti-DreamBooth's choice), None where none is found."""
        out: list[np.ndarray | None] = []
        for frame in frames:
            faces = [(f, f.area[2] - f.area[0], f.area[3] - f.area[1]) for f in self.detect(frame)]
            faces = [(f, w * h) for f, w, h in faces if w > 0 and h > 0]
            if not faces:
                out.append(None)
                continue
            best = max(range(len(faces)), key=lambda i: faces[i][1])  # the first of equals, as a stable sort
            x = self.face_input(frame, faces[best][0])
            out.append(np.asarray(self._embed(self.params, x[None]))[0].astype(np.float64))
        return out

    def ism(self, clean_photos: Sequence[np.ndarray], frames: Sequence[np.ndarray]) -> dict:
        """As :func:`anti_i2v_jax.eval.arcface.ism`, faces found and aligned as DeepFace does."""
        from anti_i2v_jax.eval.arcface import ism

        return ism(self.embed, clean_photos, frames)


def _anchor_grid(height: int, width: int, stride: int) -> np.ndarray:
    """``(height * width * A, 4)`` anchors, ordered by row, column, anchor."""
    gy, gx = np.mgrid[:height, :width]
    shift = np.stack([gx, gy, gx, gy], axis=-1)[:, :, None, :] * stride
    return (shift + base_anchors(stride)[None, None]).reshape(-1, 4)


def _centres(anchors: np.ndarray):
    a = anchors.astype(np.float64)
    w, h = a[:, 2] - a[:, 0] + 1.0, a[:, 3] - a[:, 1] + 1.0
    return w, h, a[:, 0] + 0.5 * (w - 1.0), a[:, 1] + 0.5 * (h - 1.0)


def _decode_boxes(anchors: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Centre offsets and log sizes -> x1, y1, x2, y2 (float64, ``+1`` pixel widths)."""
    w, h, cx, cy = _centres(anchors)
    px, py = deltas[:, 0] * w + cx, deltas[:, 1] * h + cy
    pw, ph = np.exp(deltas[:, 2]) * w, np.exp(deltas[:, 3]) * h
    return np.stack([px - 0.5 * (pw - 1.0), py - 0.5 * (ph - 1.0), px + 0.5 * (pw - 1.0), py + 0.5 * (ph - 1.0)], -1)


def _decode_landmarks(anchors: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """``(N, 5, 2)`` offsets in anchor widths -> points (float32, as the reference stores them)."""
    w, h, cx, cy = _centres(anchors)
    out = np.empty_like(deltas)
    out[..., 0] = deltas[..., 0] * w[:, None] + cx[:, None]
    out[..., 1] = deltas[..., 1] * h[:, None] + cy[:, None]
    return out


def _clip(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w - 1)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h - 1)
    return boxes


def _level_eyes(crop: np.ndarray, first_eye: np.ndarray, second_eye: np.ndarray) -> np.ndarray:
    """Rotate the face crop about its centre so that the eyes are level. ``first_eye`` is retina-face's
    ``right_eye`` (the person's right: the image's left), ``second_eye`` its ``left_eye``; the angle is computed
    in float32 from the right triangle the eyes span, as the reference does."""
    from PIL import Image

    (lx, ly), (rx, ry) = np.asarray(first_eye, np.float32), np.asarray(second_eye, np.float32)
    if ly > ry:
        third, direction = np.array([rx, ly], np.float32), -1
    else:
        third, direction = np.array([lx, ry], np.float32), 1
    left, right = np.array([lx, ly], np.float32), np.array([rx, ry], np.float32)
    dist = lambda p, q: np.sqrt(np.sum((p - q) * (p - q)))  # noqa: E731
    a, b, c = dist(left, third), dist(right, third), dist(right, left)
    if b == 0 or c == 0:
        return crop
    cos_a = np.clip((b * b + c * c - a * a) / (2 * b * c), np.float32(-1.0), np.float32(1.0))
    angle = (np.arccos(cos_a) * 180) / np.float32(math.pi)
    if direction == -1:
        angle = 90 - angle
    return np.array(Image.fromarray(crop).rotate(float(direction * angle)))


def _fit(face: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """deepface's input: resize keeping the aspect ratio to fit ``size`` (bilinear), centre on black, / 255."""
    import cv2

    factor = min(size / face.shape[0], size / face.shape[1])
    face = cv2.resize(face, (int(face.shape[1] * factor), int(face.shape[0] * factor)))
    dh, dw = size - face.shape[0], size - face.shape[1]
    face = np.pad(face, ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
    if face.shape[:2] != (size, size):
        face = cv2.resize(face, (size, size))
    return face.astype(np.float32) / np.float32(255)
