"""Imperceptibility of a protected photo against its clean original: L-inf, PSNR, SSIM and CIEDE2000.

PSNR and SSIM follow scikit-image (``peak_signal_noise_ratio``, ``structural_similarity`` with a Gaussian
window); CIEDE2000 is Sharma, Wu and Dalal (2005) on sRGB (D65) -> CIE L*a*b*, as
``skimage.color.deltaE_ciede2000(rgb2lab(a), rgb2lab(b))``. Everything in float64 numpy: these are reported
numbers, not part of any gradient. Perturbing a* and b* (the dual-space method) shows up here, not in PSNR.
"""

from __future__ import annotations

import numpy as np

from anti_i2v_jax.dsp import (
    _D65_WHITE,
    _LAB_EPSILON,
    _LAB_KAPPA,
    _SRGB_THRESHOLD,
    _XYZ_FROM_RGB,
)
from anti_i2v_jax.metrics import linf, psnr, ssim

__all__ = ["ciede2000", "imperceptibility", "linf", "psnr", "rgb_to_lab", "ssim"]


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 or [0, 1] float sRGB (..., 3) -> CIE L*a*b* (D65, 2-degree observer), float64."""
    x = np.asarray(rgb)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    lin = np.where(x > _SRGB_THRESHOLD, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = lin @ (_XYZ_FROM_RGB / _D65_WHITE[:, None]).T  # (..., 3), relative to the white point
    f = np.where(xyz > _LAB_EPSILON, np.cbrt(xyz), _LAB_KAPPA * xyz + 16.0 / 116.0)
    fx, fy, fz = np.moveaxis(f, -1, 0)
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """Per-pixel CIEDE2000 colour difference of two L*a*b* arrays (..., 3), with kL = kC = kH = 1."""
    l1, a1, b1 = np.moveaxis(np.asarray(lab1, np.float64), -1, 0)
    l2, a2, b2 = np.moveaxis(np.asarray(lab2, np.float64), -1, 0)
    # a* is stretched so that near-neutral colours get hue differences of the right size.
    c_mean = 0.5 * (np.hypot(a1, b1) + np.hypot(a2, b2))
    g = 0.5 * (1.0 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1, a2 = a1 * (1.0 + g), a2 * (1.0 + g)
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.arctan2(b1, a1) % (2 * np.pi), np.arctan2(b2, a2) % (2 * np.pi)

    chroma_product = c1 * c2
    dh = h2 - h1
    dh = np.where(dh > np.pi, dh - 2 * np.pi, np.where(dh < -np.pi, dh + 2 * np.pi, dh))
    dh = np.where(chroma_product == 0, 0.0, dh)
    d_hue = 2.0 * np.sqrt(chroma_product) * np.sin(dh / 2.0)
    # Mean hue, taking the short way round the circle; a colourless side leaves the other's hue.
    h_sum = h1 + h2
    wrap = (chroma_product != 0) & (np.abs(h2 - h1) > np.pi)
    h_mean = np.where(wrap, np.where(h_sum < 2 * np.pi, h_sum + 2 * np.pi, h_sum - 2 * np.pi), h_sum)
    h_mean = np.where(chroma_product == 0, 2.0 * h_mean, h_mean) / 2.0

    l_mean, c_mean = 0.5 * (l1 + l2), 0.5 * (c1 + c2)
    t = (1.0 - 0.17 * np.cos(h_mean - np.deg2rad(30)) + 0.24 * np.cos(2 * h_mean)
         + 0.32 * np.cos(3 * h_mean + np.deg2rad(6)) - 0.20 * np.cos(4 * h_mean - np.deg2rad(63)))
    s_l = 1.0 + 0.015 * (l_mean - 50.0) ** 2 / np.sqrt(20.0 + (l_mean - 50.0) ** 2)
    s_c = 1.0 + 0.045 * c_mean
    s_h = 1.0 + 0.015 * c_mean * t
    rotation = np.deg2rad(30) * np.exp(-(((np.rad2deg(h_mean) - 275.0) / 25.0) ** 2))
    r_t = -np.sin(2.0 * rotation) * 2.0 * np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7))
    dl, dc, dhh = (l2 - l1) / s_l, (c2 - c1) / s_c, d_hue / s_h  # all second minus first: r_t pairs dc, dhh
    return np.sqrt(np.maximum(dl**2 + dc**2 + dhh**2 + r_t * dc * dhh, 0.0))


def imperceptibility(clean: np.ndarray, protected: np.ndarray) -> dict[str, float]:
    """The protected photo against the clean one (uint8, same shape): L-inf (8-bit levels), PSNR (dB; None when
    identical), SSIM, and the mean and 95th percentile of CIEDE2000."""
    if clean.shape != protected.shape:
        raise ValueError(f"images differ in shape: {clean.shape} vs {protected.shape}")
    de = ciede2000(rgb_to_lab(clean[..., :3]), rgb_to_lab(protected[..., :3]))
    p = psnr(clean, protected)
    return {
        "linf": float(linf(clean, protected)),
        "psnr_db": None if np.isinf(p) else p,
        "ssim": ssim(clean, protected),
        "ciede2000_mean": float(de.mean()),
        "ciede2000_p95": float(np.percentile(de, 95)),
    }
