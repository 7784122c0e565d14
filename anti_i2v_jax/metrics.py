"""Image-quality measures for reports: L-inf change, PSNR and SSIM (numpy; no SciPy needed)."""

from __future__ import annotations

import numpy as np


def linf(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute per-pixel change between two uint8 images, in 8-bit levels."""
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max(initial=0))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def _gaussian_blur(x: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian filter of (H, W) with half-sample symmetric borders (scipy.ndimage's 'reflect')."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.pad(x, radius, mode="symmetric")
    x = sum(w * x[i : i + x.shape[0] - 2 * radius, :] for i, w in enumerate(taps))
    return sum(w * x[:, i : i + x.shape[1] - 2 * radius] for i, w in enumerate(taps))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window sigma 1.5) over channels of (H, W, C) images.

    Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1)``, including its border crop.
    """
    radius = int(3.5 * sigma + 0.5)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _gaussian_blur(x, sigma, radius), _gaussian_blur(y, sigma, radius)
        vx = _gaussian_blur(x * x, sigma, radius) - mx * mx
        vy = _gaussian_blur(y * y, sigma, radius) - my * my
        cxy = _gaussian_blur(x * y, sigma, radius) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(s[radius:-radius, radius:-radius].mean())
    return float(np.mean(scores))
