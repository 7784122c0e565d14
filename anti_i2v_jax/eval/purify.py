"""Purifications an adversary (or a platform) applies to a photo before generating from it, and how much of
a perturbation survives them, measured without any model.

Each purification maps a uint8 (H, W, 3) photo to one of the same size: JPEG re-encoding (Pillow, 4:2:0
chroma subsampling, as most encoders), a 5x5 Gaussian blur with sigma 1 (reflected borders), and a resize
to half size and back (bicubic).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` and decode."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def gaussian_blur(image: np.ndarray, sigma: float = 1.0, size: int = 5) -> np.ndarray:
    """Separable ``size`` x ``size`` Gaussian blur with reflected borders, rounded to uint8."""
    r = size // 2
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    x = sum(t * x[i : i + h] for i, t in enumerate(taps))
    x = sum(t * x[:, i : i + w] for i, t in enumerate(taps))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize_down_up(image: np.ndarray, factor: float = 0.5) -> np.ndarray:
    """Resize by ``factor`` and back to the original size (bicubic both ways)."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


PURIFICATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "jpeg90": lambda x: jpeg(x, 90),
    "jpeg75": lambda x: jpeg(x, 75),
    "jpeg50": lambda x: jpeg(x, 50),
    "blur": gaussian_blur,
    "resize0.5": resize_down_up,
}


def survival(clean: np.ndarray, protected: np.ndarray, purify: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """How much of ``delta = protected - clean`` is still there after purifying both photos:

    ``kept``: the component of the purified difference along delta, as a fraction of delta (1: untouched,
    0: gone); ``energy``: the purified difference's norm over delta's (purification can also add error)."""
    delta = protected.astype(np.float64) - clean.astype(np.float64)
    after = purify(protected).astype(np.float64) - purify(clean).astype(np.float64)
    norm2 = float(np.sum(delta * delta))
    if norm2 == 0.0:
        raise ValueError("the protected photo equals the clean one: there is no perturbation to measure")
    return {"kept": float(np.sum(after * delta) / norm2), "energy": float(np.sqrt(np.sum(after * after) / norm2))}


def directional_perturbation(image: np.ndarray, schedule: str, *, steps: int = 200, eps: float = 16 / 255,
                             seed: int = 0, config=None) -> np.ndarray:
    """A perturbation made by the protection engine's own space steps, without a model: projected sign ascent
    on ``<g, x>`` for a fixed white-noise field ``g``, in the spaces of ``schedule`` ("rgb", "lab", "dct",
    "alternate", ...) with the step sizes, DCT band and budget of ``config`` (an AttackConfig; its defaults
    when None). Returns the protected uint8 photo; what survives purification then depends on the space only."""
    import jax
    import jax.numpy as jnp

    from anti_i2v_jax import dsp
    from anti_i2v_jax.attack.config import AttackConfig

    config = config or AttackConfig()
    x0 = jnp.asarray(image, jnp.float32) / 255.0
    g = jax.random.normal(jax.random.key(seed), x0.shape)
    size = tuple(image.shape[:2])
    step = {"rgb": config.step_rgb, "lab": config.step_lab,
            "dct": config.step_dct * dsp.dct_step_scale(size, config.dct_fraction, config.dct_block)}

    def make(space):
        def fn(x):
            moved = dsp.space_step(space, x, g, lambda v: step[space] * jnp.sign(v),
                                   dct_fraction=config.dct_fraction, dct_block=config.dct_block)
            return dsp.project(moved, x0, eps)
        return jax.jit(fn)

    spaces = dsp.schedule_spaces(schedule)
    fns = {s: make(s) for s in set(spaces)}
    x = x0
    for i in range(steps):
        x = fns[spaces[i % len(spaces)]](x)
    return dsp.quantize(np.asarray(x), image, eps)
