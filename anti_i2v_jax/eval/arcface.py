"""ISM with an ArcFace network: insightface's ``arcface_torch`` iResNet (a local ``backbone.pth``, e.g.
``ms1mv3_arcface_r100_fp16``), on faces found and aligned offline by dlib.

Protocol (Anti-DreamBooth's ISM, carried to videos): the reference is the mean embedding over the clean photos
(not normalised per photo); each frame's top face is aligned to the ArcFace template (RGB, ``(x/255 - 0.5)/0.5``)
and embedded; ISM is the cosine to the reference averaged over frames with a face. The paper used DeepFace's
ArcFace on RetinaFace detections: the embedding network family is the same, the weights and the detector are
not, so the numbers are close in kind but not identical (docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from anti_i2v_jax.eval import align, iresnet
from anti_i2v_jax.eval.identity import DlibFaces


class ArcFace:
    """A loaded ArcFace iResNet and the face finder that feeds it."""

    def __init__(self, path: str | Path, arch: str | iresnet.IResNetConfig = "iresnet100", *, faces: DlibFaces):
        self.config, self.params = iresnet.load(path, arch)
        self.faces = faces
        model = iresnet.IResNet(self.config)
        self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def embed(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """The embedding of each frame's top face (512-d), None where no face is found."""
        crops, where = align.aligned_faces(self.faces, frames, self.config.input_size)
        out: list[np.ndarray | None] = [None] * len(frames)
        if crops:
            emb = np.asarray(self._apply(self.params, iresnet.preprocess(np.stack(crops), "rgb")), np.float64)
            for i, e in zip(where, emb):
                out[i] = e
        return out

    def ism(self, clean_photos: Sequence[np.ndarray], frames: Sequence[np.ndarray]) -> dict:
        return ism(self.embed, clean_photos, frames)


def ism(embed, clean_photos: Sequence[np.ndarray], frames: Sequence[np.ndarray]) -> dict:
    """``ism`` (mean cosine to the clean photos' mean embedding over frames with a face; None without one) and
    ``fdfr_arcface`` (share of frames without a face, by the same detector); ``embed(images)`` gives each image's
    top-face embedding or None."""
    refs = [e for e in embed(clean_photos) if e is not None]
    found = [e for e in embed(frames) if e is not None]
    out = {"ism": None, "fdfr_arcface": 1.0 - len(found) / max(len(frames), 1)}
    if refs and found:
        ref = np.mean(refs, axis=0)
        f = np.stack(found)
        out["ism"] = float(np.mean(f @ ref / (np.linalg.norm(f, axis=-1) * np.linalg.norm(ref))))
    return out
