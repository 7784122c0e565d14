"""C-FIQA: CR-FIQA face-image quality (Boutros et al. 2023) of the faces in generated frames.

Each frame's top face (dlib's detector) is aligned to the ArcFace template from its 68-point landmarks, and the
CR-FIQA iResNet (a local ``backbone.pth``: iResNet-50 for CR-FIQA (S), iResNet-100 for (L)) gives its quality
score ``qs``, the network's raw output as CR-FIQA's ``getQualityScore.py`` writes it (higher: better quality).
The column is the mean over frames with a face.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.eval import align, iresnet
from anti_i2v_jax.eval.identity import DlibFaces


class CrFiqa:
    """A loaded CR-FIQA model and the face finder that feeds it."""

    def __init__(self, path: str | Path, arch: str | iresnet.IResNetConfig = "iresnet50", *, faces: DlibFaces):
        self.config, self.params = iresnet.load(path, arch)
        if not self.config.quality_head:
            raise UserError(f"{path} has no quality head (qs): it is a face-recognition iResNet, not CR-FIQA")
        self.faces = faces
        model = iresnet.IResNet(self.config)
        self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])

    def frame_scores(self, frames: np.ndarray) -> list[float | None]:
        """The quality of each frame's top face; None where no face is found."""
        crops, where = align.aligned_faces(self.faces, frames, self.config.input_size)
        out: list[float | None] = [None] * len(frames)
        if crops:
            scores = np.asarray(self._apply(self.params, iresnet.preprocess(np.stack(crops))))
            for i, s in zip(where, scores):
                out[i] = float(s)
        return out

    def score(self, frames: np.ndarray) -> float | None:
        """Mean quality over the frames with a face (None when there is none)."""
        found = [s for s in self.frame_scores(frames) if s is not None]
        return float(np.mean(found)) if found else None
