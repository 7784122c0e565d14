"""Face identity in generated videos: ISM (identity similarity) and FDFR (face detection failure rate).

The paper's ISM is ArcFace on RetinaFace detections (DeepFace), whose weights are never shipped with a
package; it is reported as missing unless they are given. What runs offline is dlib: the HOG face detector,
the 5-point landmark model and the 128-d ResNet face descriptor (``dlib-bin`` + ``face-recognition-models``,
which ship their weights). Its numbers are reported as ``*_dlib`` and are NOT comparable with the paper's:
dlib cosines are compressed (different people score about 0.8, the same person about 0.97), so the L2
distance and the share of frames under dlib's same-person threshold (0.6) are reported beside the cosine.

Protocol (Anti-DreamBooth's, carried to videos): the reference is the mean embedding of the clean photo(s);
every frame is searched for faces and the top-scoring one is embedded; ISM is the cosine to the reference
averaged over frames with a face, FDFR the share of frames without one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anti_i2v_jax.eval.base import MetricUnavailable

SAME_PERSON_L2 = 0.6  # dlib's documented threshold for its descriptor (LFW)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DlibSettings:
    """Detector settings: ``upsample`` doubles the image that many times before HOG (faces under ~80 px need 1);
    ``min_score`` drops weaker detections (HOG scores: a clear face ~1, a false positive ~0.1)."""

    upsample: int = 1
    min_score: float = 0.0
    chip_padding: float = 0.25  # dlib's default face chip (150 px, 25% margin)


def _models_dir() -> Path:
    # face_recognition_models imports pkg_resources (gone from recent setuptools), so find its folder instead.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable("dlib identity needs face-recognition-models: pip install 'anti_i2v_jax[eval]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibFaces:
    """dlib's face detector, 5-point aligner and 128-d descriptor, from the weights face-recognition-models ships."""

    def __init__(self, settings: DlibSettings = DlibSettings(), models_dir: str | Path | None = None):
        try:
            import dlib
        except ImportError:
            raise MetricUnavailable("dlib identity needs dlib: pip install 'anti_i2v_jax[eval]' (dlib-bin)") from None
        folder = Path(models_dir) if models_dir else _models_dir()
        files = {"shape": folder / "shape_predictor_5_face_landmarks.dat",
                 "descriptor": folder / "dlib_face_recognition_resnet_model_v1.dat"}
        for path in files.values():
            if not path.is_file():
                raise MetricUnavailable(f"dlib model file {path} is missing")
        self.settings = settings
        self._landmarks68_file = folder / "shape_predictor_68_face_landmarks.dat"
        self._landmarks68 = None
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(files["shape"]))
        self._descriptor = dlib.face_recognition_model_v1(str(files["descriptor"]))

    def detect(self, image: np.ndarray):
        """The top-scoring face box of a uint8 (H, W, 3) image and its score, or None."""
        img = np.ascontiguousarray(image[..., :3])
        boxes, scores, _ = self._detector.run(img, self.settings.upsample, self.settings.min_score)
        if not boxes:
            return None
        best = int(np.argmax(scores))
        return boxes[best], float(scores[best])

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """The 128-d descriptor of the image's top face, or None when no face is found."""
        found = self.detect(image)
        if found is None:
            return None
        img = np.ascontiguousarray(image[..., :3])
        shape = self._shape(img, found[0])
        return np.asarray(self._descriptor.compute_face_descriptor(img, shape, 0, self.settings.chip_padding))

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """The 68 iBUG landmarks (68, 2) of the image's top face, or None. The 68-point model ships with
        face-recognition-models under the iBUG 300-W terms (research use)."""
        found = self.detect(image)
        if found is None:
            return None
        if self._landmarks68 is None:
            if not self._landmarks68_file.is_file():
                raise MetricUnavailable(f"dlib model file {self._landmarks68_file} is missing")
            self._landmarks68 = self._dlib.shape_predictor(str(self._landmarks68_file))
        shape = self._landmarks68(np.ascontiguousarray(image[..., :3]), found[0])
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)


@functools.cache
def default_faces() -> DlibFaces:
    """One shared :class:`DlibFaces` with the default settings (loading takes about a second)."""
    return DlibFaces()


def reference_embedding(faces: DlibFaces, photos: Sequence[np.ndarray]) -> np.ndarray | None:
    """Mean descriptor over the clean photos that show a face (not normalised per photo, as the reference
    ISM does), or None when none does."""
    found = [e for e in (faces.embed(p) for p in photos) if e is not None]
    return np.mean(found, axis=0) if found else None


def identity_scores(faces: DlibFaces, reference: np.ndarray | None, frames: Sequence[np.ndarray]) -> dict:
    """ISM (cosine), mean L2, same-person rate (L2 < 0.6, over frames with a face) and FDFR of the frames
    against ``reference``; values without frames to average are None."""
    embeddings = [faces.embed(f) for f in frames]
    found = np.array([e for e in embeddings if e is not None])
    out = {"ism_dlib": None, "l2_dlib": None, "match_dlib": None, "fdfr_dlib": 1.0 - len(found) / max(len(frames), 1)}
    if reference is None or not len(found):
        return out
    cos = found @ reference / (np.linalg.norm(found, axis=-1) * np.linalg.norm(reference))
    l2 = np.linalg.norm(found - reference, axis=-1)
    out.update(ism_dlib=float(cos.mean()), l2_dlib=float(l2.mean()), match_dlib=float(np.mean(l2 < SAME_PERSON_L2)))
    return out
