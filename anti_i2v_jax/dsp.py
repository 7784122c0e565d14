"""Dual-space perturbation (DSP): colour and frequency transforms, sign steps and the RGB budget.

Anti-I2V perturbs an image in two spaces that alternate by iteration: the chroma channels (a*, b*)
of CIE L*a*b* and the low-frequency coefficients of an orthonormal 2-D DCT-II. After every step the
image is mapped back to RGB and projected onto ``||x_adv - x||_inf <= eps`` and [0, 1]; see
``docs/method.md`` (sections 2 and 3).

Images here are ``(..., H, W, 3)`` float arrays in [0, 1] (channels last). Everything is pure and
differentiable; the gradient step in a space is the pull-back of the RGB gradient through that
space's inverse transform, so one backward pass through the model serves every space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

# sRGB (IEC 61966-2-1) with the D65 white point, the convention of kornia and scikit-image.
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_SRGB_THRESHOLD = 0.04045  # on the encoded value
_SRGB_LINEAR_THRESHOLD = 0.04045 / 12.92  # the same point on the linear value, so the inverse is exact
# CIE f(t) switches from a cube root to a line near t = (6/29)^3. The rounded constants below are the
# ones scikit-image and kornia use (CIE's exact 1/(3 (6/29)^2) = 7.78704 differs by up to 1.5e-4 in L*a*b*).
_LAB_EPSILON = 0.008856
_LAB_KAPPA = 7.787
_LAB_F_EPSILON = _LAB_EPSILON ** (1.0 / 3.0)

Space = Literal["rgb", "lab", "dct"]
SPACES: tuple[Space, ...] = ("rgb", "lab", "dct")
SCHEDULES = {"alternate": ("lab", "dct"), "lab": ("lab",), "dct": ("dct",), "rgb": ("rgb",)}


def _safe_where(cond, fn_true, fn_false, x, safe_true, safe_false):
    """``where(cond, fn_true(x), fn_false(x))`` whose gradient stays finite on the unused branch."""
    return jnp.where(
        cond, fn_true(jnp.where(cond, x, safe_true)), fn_false(jnp.where(cond, safe_false, x))
    )


# Powers and the 3x3 colour matrices are written as exp/log and per-channel sums: XLA on CPU runs
# them several times faster than pow, cbrt and a dot with a 3-wide contraction (same values to ~1e-7).
def _pow(v, p):
    return jnp.exp(p * jnp.log(v))


def _mix(x, m):
    """``x @ m.T`` for a constant 3x3 ``m`` over the last axis, as elementwise sums."""
    c = jnp.moveaxis(x, -1, 0)
    return jnp.stack([m[i, 0] * c[0] + m[i, 1] * c[1] + m[i, 2] * c[2] for i in range(3)], axis=-1)


def _srgb_to_linear(c):
    return _safe_where(
        c > _SRGB_THRESHOLD, lambda v: _pow((v + 0.055) / 1.055, 2.4), lambda v: v / 12.92, c, 1.0, 0.0
    )


def _linear_to_srgb(c):
    return _safe_where(
        c > _SRGB_LINEAR_THRESHOLD,
        lambda v: 1.055 * _pow(v, 1.0 / 2.4) - 0.055,
        lambda v: 12.92 * v,
        c,
        1.0,
        0.0,
    )


def _lab_f(t):
    return _safe_where(
        t > _LAB_EPSILON,
        lambda v: _pow(v, 1.0 / 3.0),
        lambda v: _LAB_KAPPA * v + 16.0 / 116.0,
        t,
        1.0,
        0.0,
    )


def _lab_f_inv(f):
    return _safe_where(
        f > _LAB_F_EPSILON, lambda v: v**3, lambda v: (v - 16.0 / 116.0) / _LAB_KAPPA, f, 1.0, 0.0
    )


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
    """sRGB in [0, 1] (D65) -> CIE L*a*b* with L* in [0, 100]; matches ``skimage.color.rgb2lab``."""
    rgb = jnp.asarray(rgb)
    # The white point is folded into the matrix rows.
    xyz_white = _mix(_srgb_to_linear(rgb), _XYZ_FROM_RGB / _D65_WHITE[:, None])
    fx, fy, fz = jnp.moveaxis(_lab_f(xyz_white), -1, 0)
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: jax.Array) -> jax.Array:
    """Exact inverse of :func:`rgb_to_lab`; out-of-gamut colours are returned unclipped."""
    lab = jnp.asarray(lab)
    big_l, a, b = jnp.moveaxis(lab, -1, 0)
    fy = (big_l + 16.0) / 116.0
    f = jnp.stack([fy + a / 500.0, fy, fy - b / 200.0], axis=-1)
    return _linear_to_srgb(_mix(_lab_f_inv(f), _RGB_FROM_XYZ * _D65_WHITE[None, :]))


# --------------------------------------------------------------------------------------------- DCT


def _pad_to_blocks(x: jax.Array, block: int) -> jax.Array:
    h, w = x.shape[-3:-1]
    pad = [(0, 0)] * (x.ndim - 3) + [(0, -h % block), (0, -w % block), (0, 0)]
    return jnp.pad(x, pad)


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    *lead, h, w, c = x.shape
    # (..., H, W, C) -> (..., H/b, W/b, b, b, C)
    x = x.reshape(*lead, h // block, block, w // block, block, c)
    return jnp.swapaxes(x, -4, -3)


def _from_blocks(x: jax.Array) -> jax.Array:
    *lead, nh, nw, b, _, c = x.shape
    # (..., H/b, W/b, b, b, C) -> (..., H, W, C)
    return jnp.swapaxes(x, -4, -3).reshape(*lead, nh * b, nw * b, c)


def dct2(x: jax.Array, block: int | None = None) -> jax.Array:
    """Orthonormal 2-D DCT-II over H and W of ``(..., H, W, C)``, globally or per ``block`` x ``block`` tile.

    With a block size that does not divide H or W, the image is zero-padded on the bottom/right and the
    coefficient array covers the padded size.
    """
    if block is None:
        return jax.scipy.fft.dctn(x, type=2, axes=(-3, -2), norm="ortho")
    tiles = _to_blocks(_pad_to_blocks(x, block), block)
    return _from_blocks(jax.scipy.fft.dctn(tiles, type=2, axes=(-3, -2), norm="ortho"))


def idct2(c: jax.Array, block: int | None = None, size: tuple[int, int] | None = None) -> jax.Array:
    """Inverse of :func:`dct2`; ``size`` crops a block-padded result back to (H, W)."""
    if block is None:
        x = jax.scipy.fft.idctn(c, type=2, axes=(-3, -2), norm="ortho")
    else:
        x = _from_blocks(jax.scipy.fft.idctn(_to_blocks(c, block), type=2, axes=(-3, -2), norm="ortho"))
    if size is not None:
        x = x[..., : size[0], : size[1], :]
    return x


def low_frequency_mask(
    size: tuple[int, int], fraction: float, block: int | None = None
) -> np.ndarray:
    """Boolean ``(H', W', 1)`` mask of the low-frequency DCT coefficients, for :func:`dct2`'s layout.

    A coefficient (u, v) of a tile of n_h x n_w (the whole image, or one block) is kept when
    ``u < ceil(fraction * n_h)`` and ``v < ceil(fraction * n_w)``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"dct fraction must be in (0, 1], got {fraction}")
    h, w = size
    if block is None:
        keep_h, keep_w = math.ceil(fraction * h), math.ceil(fraction * w)
        return ((np.arange(h)[:, None] < keep_h) & (np.arange(w)[None, :] < keep_w))[..., None]
    nh, nw = -(-h // block), -(-w // block)
    keep = math.ceil(fraction * block)
    tile = (np.arange(block)[:, None] < keep) & (np.arange(block)[None, :] < keep)
    return np.tile(tile, (nh, nw))[..., None]


def dct_step_scale(size: tuple[int, int], fraction: float, block: int | None = None) -> float:
    """Coefficient step that gives an RGB change of RMS 1 when every masked coefficient moves by it.

    With an orthonormal transform, moving K of N coefficients by +-s changes the image by RMS
    ``s * sqrt(K / N)``; the config's ``step_dct`` is in RGB units and is multiplied by this scale.
    """
    mask = low_frequency_mask(size, fraction, block)
    return math.sqrt(mask.size / mask.sum())


# --------------------------------------------------------------------------- steps in each space


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n``: ``(k, n)``."""
    rows = np.cos(np.pi * (2 * np.arange(n) + 1) * np.arange(k)[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    rows[0] /= np.sqrt(2.0)
    return rows


def _band_matrices(size: tuple[int, int], fraction: float, block: int | None):
    """Per-axis matrices (k_h, b_h), (k_w, b_w) mapping a tile to its low-frequency band, and the tile size."""
    tile = size if block is None else (block, block)
    keep = [math.ceil(fraction * n) for n in tile]
    return [jnp.asarray(_dct_rows(n, k), jnp.float32) for n, k in zip(tile, keep)], tile


def dct_band(x: jax.Array, fraction: float, block: int | None = None) -> jax.Array:
    """The low-frequency band of :func:`dct2`, ``(n_h, k_h, n_w, k_w, C)`` for n_h x n_w tiles.

    Computed by two thin matrix products, O(H W k) instead of a full transform: the DCT step only ever
    touches these coefficients.
    """
    (ch, cw), (bh, bw) = _band_matrices(x.shape[-3:-1], fraction, block)
    tiles = x if block is None else _pad_to_blocks(x, block)
    nh, nw = tiles.shape[-3] // bh, tiles.shape[-2] // bw
    # (H, W, C) -> (n_h, b_h, n_w, b_w, C) -> (n_h, k_h, n_w, k_w, C)
    tiles = tiles.reshape(*tiles.shape[:-3], nh, bh, nw, bw, tiles.shape[-1])
    return jnp.einsum("ui,...nimjc,vj->...numvc", ch, tiles, cw)


def dct_band_inverse(band: jax.Array, size: tuple[int, int], fraction: float, block: int | None = None) -> jax.Array:
    """The image ``(H, W, C)`` whose DCT is ``band`` on the low frequencies and zero elsewhere."""
    (ch, cw), (bh, bw) = _band_matrices(size, fraction, block)
    tiles = jnp.einsum("ui,...numvc,vj->...nimjc", ch, band, cw)
    *lead, nh, _, nw, _, c = tiles.shape
    # (n_h, b_h, n_w, b_w, C) -> (H', W', C), cropped to (H, W)
    return tiles.reshape(*lead, nh * bh, nw * bw, c)[..., : size[0], : size[1], :]


def _chart(space: Space, x_adv: jax.Array, dct_fraction: float, dct_block: int | None):
    """Free variables of ``space`` at ``x_adv``, the map from them back to RGB, and its pull-back."""
    if space == "rgb":
        return x_adv, lambda v: v, lambda g: g
    if space == "lab":
        lab = rgb_to_lab(x_adv)
        to_rgb = lambda ab: lab_to_rgb(jnp.concatenate([lab[..., :1], ab], axis=-1))  # noqa: E731
        return lab[..., 1:], to_rgb, lambda g: _pixelwise_pullback(to_rgb, lab[..., 1:], g)
    if space == "dct":
        size = x_adv.shape[-3:-1]
        zero = jnp.zeros_like(dct_band(x_adv, dct_fraction, dct_block))  # offsets of the band coefficients
        to_rgb = lambda c: x_adv + dct_band_inverse(c, size, dct_fraction, dct_block)  # noqa: E731
        return zero, to_rgb, lambda g: jax.vjp(to_rgb, zero)[1](g)[0]
    raise ValueError(f"unknown space {space!r}; expected one of {SPACES}")


def _pixelwise_pullback(fn, coords: jax.Array, g: jax.Array) -> jax.Array:
    """``J^T g`` for a map that acts on each pixel alone: one JVP per input channel gives every pixel's
    Jacobian column at once (several times cheaper than reverse mode through the colour conversion)."""
    cols = []
    for ch in range(coords.shape[-1]):
        tangent = jnp.zeros_like(coords).at[..., ch].set(1.0)
        _, col = jax.jvp(fn, (coords,), (tangent,))
        cols.append(jnp.sum(g * col, axis=-1))
    return jnp.stack(cols, axis=-1)


def space_gradient(
    space: Space, x_adv: jax.Array, grad_rgb: jax.Array, *, dct_fraction: float, dct_block: int | None
) -> jax.Array:
    """Pull the RGB gradient back onto ``space``'s free variables (a*/b*, low DCT band, or RGB)."""
    _, _, pullback = _chart(space, x_adv, dct_fraction, dct_block)
    return pullback(grad_rgb)


def space_apply(
    space: Space, x_adv: jax.Array, update: jax.Array, *, dct_fraction: float, dct_block: int | None
) -> jax.Array:
    """Move ``space``'s free variables by ``update``; returns the new (unprojected) RGB image."""
    coords, to_rgb, _ = _chart(space, x_adv, dct_fraction, dct_block)
    return to_rgb(coords + update)


def space_step(
    space: Space,
    x_adv: jax.Array,
    grad_rgb: jax.Array,
    direction: Callable[[jax.Array], jax.Array],
    *,
    dct_fraction: float,
    dct_block: int | None,
) -> jax.Array:
    """One step in ``space``: pull back the gradient, turn it into an update, map back to RGB.

    The same as ``space_apply(space, x, direction(space_gradient(space, x, g)))`` with the chart
    (e.g. the L*a*b* conversion of ``x_adv``) computed once.
    """
    coords, to_rgb, pullback = _chart(space, x_adv, dct_fraction, dct_block)
    return to_rgb(coords + direction(pullback(grad_rgb)))


def project(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Project onto the RGB L-inf ball of radius ``eps`` around ``x``, intersected with [0, 1]."""
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def schedule_spaces(schedule: str) -> tuple[Space, ...]:
    """The cycle of spaces a schedule visits: a named one, or a comma-separated list like ``"lab,dct,dct"``."""
    spaces = SCHEDULES.get(schedule) or tuple(s.strip() for s in schedule.split(","))
    bad = [s for s in spaces if s not in SPACES]
    if bad or not spaces:
        raise ValueError(
            f"unknown schedule {schedule!r}: use one of {sorted(SCHEDULES)} or a comma-separated "
            f"list of {SPACES}"
        )
    return spaces  # type: ignore[return-value]


# ------------------------------------------------------------------------------- quantisation


def budget_levels(eps: float) -> int:
    """The largest whole number of 8-bit levels that fits in ``eps`` (``eps`` on the [0, 1] scale)."""
    return int(math.floor(eps * 255.0 + 1e-6))


def quantize(x_adv: np.ndarray, x_u8: np.ndarray, eps: float) -> np.ndarray:
    """Round the protected image to uint8 so that the L-inf budget still holds on the saved pixels.

    Project, round, re-project onto the integer budget, then re-check: rounding alone could add
    half a level beyond ``eps``.
    """
    x_u8 = np.asarray(x_u8)
    levels = budget_levels(eps)
    ref = x_u8.astype(np.int32)
    q = np.rint(np.clip(np.asarray(x_adv, np.float64), 0.0, 1.0) * 255.0).astype(np.int32)
    q = np.clip(np.clip(q, ref - levels, ref + levels), 0, 255)
    change = int(np.abs(q - ref).max(initial=0))
    if change > eps * 255.0 + 1e-6:  # cannot happen after the clip above; a guard against regressions
        raise AssertionError(f"quantised change {change}/255 exceeds the budget {eps * 255:.3f}/255")
    return q.astype(np.uint8)
