"""Every metric of the evaluation for one (clean photo, protected photo, clean video, protected video).

Columns come in two groups that are never mixed in one table:

* :data:`PAPER_METRICS`, the paper's table (ISM, C-FIQA, Q-A(F), Q-A(V), DINO; lower is better under
  protection). Each is a value only when its real model is available: DINO from a local ViT folder,
  Q-Align from the scores ``experiments/qalign_score.py`` wrote; otherwise :class:`Missing` with the reason.
* :data:`OFFLINE_METRICS`, what runs with shipped weights: dlib identity (``*_dlib``), BRISQUE, and the
  imperceptibility of the protected photo (PSNR, SSIM, CIEDE2000, L-inf).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from anti_i2v_jax.eval import image as image_metrics
from anti_i2v_jax.eval.base import MetricUnavailable, Missing
from anti_i2v_jax.eval.identity import (
    DlibFaces,
    DlibSettings,
    identity_scores,
    reference_embedding,
)

# name -> (table heading, one-line definition)
PAPER_METRICS: dict[str, tuple[str, str]] = {
    "ism": ("ISM", "ArcFace cosine of each frame's face to the clean photo's, mean over frames with a face "
            "(--arcface: a folder of DeepFace's arcface_weights.h5 + retinaface.h5, the paper's pipeline; an "
            "insightface ONNX model pack, SCRFD faces and ArcFace; or an arcface_torch iResNet on faces found "
            "and aligned by dlib)"),
    "cfiqa": ("C-FIQA", "CR-FIQA quality score of the frames' aligned faces, mean over frames with a face"),
    "qalign_frame": ("Q-A(F)", "Q-Align image quality, mean over frames, in [0, 1]"),
    "qalign_video": ("Q-A(V)", "Q-Align video quality at 1 fps, in [0, 1]"),
    "dino": ("DINO", "DINO ViT-S/16 CLS cosine to the clean reference, mean over frames"),
}
OFFLINE_METRICS: dict[str, tuple[str, str]] = {
    "ism_dlib": ("ISM-dlib", "dlib descriptor cosine of each frame's face to the clean photo's (different people ~0.8)"),
    "l2_dlib": ("L2-dlib", "dlib descriptor L2 distance to the clean photo's, mean over frames with a face"),
    "match_dlib": ("match-dlib", "share of frames with a face under dlib's same-person distance 0.6"),
    "fdfr_dlib": ("FDFR-dlib", "share of frames where dlib's HOG detector finds no face"),
    "brisque_video": ("BRISQUE(V)", "BRISQUE of the generated frames, mean (lower: cleaner)"),
    "psnr_db": ("PSNR", "protected photo vs clean photo, dB"),
    "ssim": ("SSIM", "protected photo vs clean photo"),
    "ciede2000_mean": ("dE00", "CIEDE2000 colour difference of the photos, mean over pixels"),
    "ciede2000_p95": ("dE00 p95", "CIEDE2000 colour difference of the photos, 95th percentile"),
    "linf": ("L-inf", "largest change of the photo, 8-bit levels"),
    "brisque_photo": ("BRISQUE(P)", "BRISQUE of the protected photo"),
    "id_photo_dlib": ("ID-photo-dlib", "dlib cosine between the protected and the clean photo's faces"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Where the learned metrics' weights are, and the protocol's choices (docs/evaluation.md)."""

    dino: str | Path | None = None  # a local Hugging Face ViT folder (facebook/dino-vits16)
    # "clean-video": frame i of the protected video against frame i of the clean one (same seed and prompt);
    # "clean-photo": every frame against the clean photo.
    dino_reference: Literal["clean-video", "clean-photo"] = "clean-video"
    dlib: DlibSettings = DlibSettings()
    arcface: str | Path | None = None  # an insightface arcface_torch backbone.pth, or an ONNX pack folder (buffalo_l)
    arcface_arch: str = "iresnet100"
    cfiqa: str | Path | None = None  # a CR-FIQA backbone.pth
    cfiqa_arch: str = "iresnet50"  # iresnet50: CR-FIQA (S); iresnet100: CR-FIQA (L)
    qalign: Mapping[str, Mapping[str, float]] | None = None  # video file name -> {"qalign_frame", "qalign_video"}


class Evaluator:
    """Scores photos and videos; a metric that cannot run gives :class:`Missing` with its reason, never a guess."""

    def __init__(self, settings: EvalSettings = EvalSettings()):
        self.settings = settings
        self._faces: DlibFaces | Missing | None = None
        self._dino: Any = None
        self._cfiqa: Any = None
        self._arcface: Any = None

    @property
    def faces(self) -> DlibFaces | Missing:
        if self._faces is None:
            try:
                self._faces = DlibFaces(self.settings.dlib)
            except MetricUnavailable as e:
                self._faces = Missing(str(e))
        return self._faces

    @property
    def dino(self):
        if self._dino is None:
            if self.settings.dino is None:
                self._dino = Missing("give a local DINO ViT-S/16 folder (a download of facebook/dino-vits16) "
                                     "with --dino")
            else:
                from anti_i2v_jax.eval.dino import Dino

                self._dino = Dino(self.settings.dino)
        return self._dino

    def _face_model(self, path, what: str, absent: str, build):
        """A face network on dlib-aligned faces: ``build(faces)``, or Missing when ``path`` or dlib is absent."""
        if path is None:
            return Missing(absent)
        faces = self.faces
        if isinstance(faces, Missing):
            return Missing(f"{what} aligns faces with dlib: {faces.reason}")
        return build(faces)

    @property
    def arcface(self):
        if self._arcface is None:
            s = self.settings
            if s.arcface is not None and Path(s.arcface).is_dir():
                from anti_i2v_jax.eval import deepface

                if any((Path(s.arcface) / n).is_file() for n in (deepface.ARCFACE_FILE, deepface.RETINAFACE_FILE)):
                    self._arcface = deepface.DeepFace(s.arcface)  # the paper's own: DeepFace's Keras weights
                    return self._arcface
                from anti_i2v_jax.eval.insightface import InsightFace

                self._arcface = InsightFace(s.arcface)  # an insightface ONNX pack: its own detector
                return self._arcface

            def build(faces):
                from anti_i2v_jax.eval.arcface import ArcFace

                return ArcFace(s.arcface, s.arcface_arch, faces=faces)

            self._arcface = self._face_model(
                s.arcface, "ArcFace ISM", "give a local ArcFace backbone.pth (insightface arcface_torch, e.g. "
                "ms1mv3_arcface_r100) with --arcface; ism_dlib is an offline proxy", build)
        return self._arcface

    @property
    def cfiqa(self):
        if self._cfiqa is None:
            s = self.settings

            def build(faces):
                from anti_i2v_jax.eval.face_quality import CrFiqa

                return CrFiqa(s.cfiqa, s.cfiqa_arch, faces=faces)

            self._cfiqa = self._face_model(
                s.cfiqa, "C-FIQA", "give a local CR-FIQA backbone.pth with --cfiqa (and --cfiqa-arch iresnet100 "
                "for CR-FIQA (L))", build)
        return self._cfiqa

    def photo(self, clean: np.ndarray, protected: np.ndarray) -> dict[str, Any]:
        """Imperceptibility of the protected photo, its BRISQUE and its dlib identity to the clean photo."""
        out: dict[str, Any] = image_metrics.imperceptibility(clean, protected)
        if out["psnr_db"] is None:
            out["psnr_db"] = Missing("the photos are identical (PSNR is infinite)")
        out["brisque_photo"] = _try(lambda: _brisque(protected))
        faces = self.faces
        if isinstance(faces, Missing):
            out["id_photo_dlib"] = faces
        else:
            a, b = faces.embed(clean), faces.embed(protected)
            out["id_photo_dlib"] = (Missing("no face found in the clean or the protected photo") if a is None or b is None
                                    else float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        return out

    def video(self, clean_photo: np.ndarray, clean_video: np.ndarray, video: np.ndarray,
              video_name: str | None = None) -> dict[str, Any]:
        """Every video metric of ``video`` (generated from the protected photo, or from the clean one for the
        clean row) against the clean photo and the clean photo's video."""
        out: dict[str, Any] = {}
        arcface = self.arcface
        if isinstance(arcface, Missing):
            out["ism"] = arcface
        else:
            ism = arcface.ism([clean_photo], video)["ism"]
            out["ism"] = Missing("no face in the clean photo or in any frame") if ism is None else ism
        cfiqa = self.cfiqa
        if isinstance(cfiqa, Missing):
            out["cfiqa"] = cfiqa
        else:
            value = cfiqa.score(video)
            out["cfiqa"] = Missing("no face in any frame") if value is None else value
        qalign = (self.settings.qalign or {}).get(video_name or "")
        for key in ("qalign_frame", "qalign_video"):
            out[key] = (qalign[key] if qalign and key in qalign else
                        Missing("run experiments/qalign_score.py on the generated videos (a local Q-Align model "
                                "and a GPU) and pass its CSV with --qalign-csv"))
        dino = self.dino
        if isinstance(dino, Missing):
            out["dino"] = dino
        else:
            reference = clean_video if self.settings.dino_reference == "clean-video" else clean_photo
            out["dino"] = dino.similarity(video, reference)
        faces = self.faces
        if isinstance(faces, Missing):
            out.update({k: faces for k in ("ism_dlib", "l2_dlib", "match_dlib", "fdfr_dlib")})
        else:
            reference = reference_embedding(faces, [clean_photo])
            scores = identity_scores(faces, reference, video)
            why = Missing("no face in the clean photo" if reference is None else "no face in any frame")
            out.update({k: why if v is None else v for k, v in scores.items()})
        out["brisque_video"] = _try(lambda: float(np.mean([_brisque(f) for f in video])))
        return out


def _brisque(image: np.ndarray) -> float:
    from anti_i2v_jax.eval.quality import brisque

    return brisque(image)


def _try(fn):
    try:
        return fn()
    except MetricUnavailable as e:
        return Missing(str(e))
