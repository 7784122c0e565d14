"""Faces aligned to the ArcFace 5-point template (112x112), the input of ArcFace-family networks (CR-FIQA).

The five points are the eye centres, the nose tip and the mouth corners. A least-squares similarity transform
(rotation, uniform scale, translation; Umeyama's, as scikit-image's ``SimilarityTransform`` and insightface's
``norm_crop``) maps them onto the template; the face is warped bilinearly with black borders. Offline, the
points come from dlib's 68-point landmarks of the detected face (the reference pipelines use RetinaFace or
MTCNN points; the template is the same).
"""

from __future__ import annotations

import numpy as np

# insightface's arcface_dst for 112x112 crops (CR-FIQA's arcface_eval_ref_points).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """(68, 2) dlib/iBUG landmarks -> (5, 2): left eye centre, right eye centre (image left to right), nose tip,
    left and right mouth corners."""
    p = np.asarray(landmarks68, np.float64)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform taking ``src`` points onto ``dst`` in the least-squares sense."""
    from skimage.transform import SimilarityTransform

    t = SimilarityTransform.from_estimate(src, dst) if hasattr(SimilarityTransform, "from_estimate") else None
    if t is None:
        t = SimilarityTransform()
        t.estimate(src, dst)
    return t.params[:2]


def aligned_faces(faces, frames, size: int = 112) -> tuple[list[np.ndarray], list[int]]:
    """The template-aligned top face of each frame that has one (``faces``: a
    :class:`~anti_i2v_jax.eval.identity.DlibFaces`), and the indices of those frames."""
    crops, where = [], []
    for i, frame in enumerate(frames):
        landmarks = faces.landmarks(frame)
        if landmarks is not None:
            crops.append(align(frame, five_points(landmarks), size))
            where.append(i)
    return crops, where


def align(image: np.ndarray, points: np.ndarray, size: int = 112) -> np.ndarray:
    """The face of ``image`` (uint8 (H, W, 3)) with landmarks ``points`` (5, 2), warped onto the template."""
    import cv2

    m = similarity(np.asarray(points, np.float64), ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(np.ascontiguousarray(image[..., :3]), m, (size, size), flags=cv2.INTER_LINEAR,
                          borderValue=0.0)


def nms(dets: np.ndarray, thresh: float, *, drop_equal: bool = False) -> list[int]:
    """Greedy NMS of ``(N, 5)`` boxes (x1, y1, x2, y2, score), best first, ``+1`` pixel areas (the face
    detectors' convention): a box overlapping a kept one by IoU above ``thresh`` is dropped, and at exactly
    ``thresh`` too when ``drop_equal`` (retina-face's rule; insightface keeps it). Returns the kept indices."""
    x1, y1, x2, y2 = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = dets[:, 4].argsort()[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou < thresh] if drop_equal else rest[iou <= thresh]
    return keep

