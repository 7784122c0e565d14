"""No-reference image quality: BRISQUE (Mittal et al. 2012) with the SVM the ``brisque`` package ships.

This is the scorer Anti-DreamBooth's evaluation calls (``BRISQUE(url=False).score(image)``; lower is better).
The package's own ``score`` fails under numpy 2 (its fitted parameters are 1-element arrays that
``float()`` refuses), so the feature vector is flattened here before the package scales it and runs its SVM:
the numbers are the package's. Needs ``brisque`` and OpenCV (``pip install 'anti_i2v_jax[eval]'``).
"""

from __future__ import annotations

import functools

import numpy as np

from anti_i2v_jax.eval.base import MetricUnavailable


@functools.cache
def _scorer():
    try:
        import cv2
        from brisque import BRISQUE
        from skimage.color import rgb2gray
    except ImportError as e:
        raise MetricUnavailable(f"BRISQUE needs the brisque and opencv packages ({e.name} is not installed): "
                                "pip install 'anti_i2v_jax[eval]'") from None
    return BRISQUE(url=False), cv2, rgb2gray


def features(image: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features (18 at full and 18 at half resolution) of a uint8 (H, W, 3) image."""
    model, cv2, rgb2gray = _scorer()
    gray = rgb2gray(np.asarray(image)[..., :3])
    half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    parts = [model.calculate_brisque_features(g, kernel_size=7, sigma=7 / 6) for g in (gray, half)]
    return np.array([float(np.ravel(np.asarray(f, dtype=np.float64))[0]) for p in parts for f in p])


def brisque(image: np.ndarray) -> float:
    """BRISQUE score of a uint8 (H, W, 3) image: about 0 (pristine) to 100 (heavily distorted)."""
    model, _, _ = _scorer()
    return float(model.calculate_image_quality_score(features(image)))


def brisque_video(frames: np.ndarray) -> float:
    """Mean BRISQUE over the frames of a uint8 (T, H, W, 3) video."""
    return float(np.mean([brisque(f) for f in frames]))
