"""The default IRA target image: a seeded, high-contrast procedural texture.

IRA pulls the protected image's features onto those of an unrelated target image psi. The paper's
choice of psi is unknown (docs/method.md), so the default is a
texture made from nothing but a seed: a few square-wave gratings at random orientations and
frequencies, each painted in a random saturated colour, thresholded into hard edges. It has strong
edges at many scales and orientations and no faces or objects, which is what an "unrelated" anchor
needs. ``--target IMAGE`` replaces it.
"""

from __future__ import annotations

import numpy as np


def procedural_texture(height: int, width: int, seed: int = 0, *, gratings: int = 6) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 high-contrast texture, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    # Frequencies in cycles per image side, so the pattern looks the same at any resolution.
    side = float(max(height, width))
    image = np.zeros((height, width, 3))
    for _ in range(gratings):
        angle = rng.uniform(0.0, np.pi)
        cycles = rng.uniform(3.0, 24.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        colour = rng.uniform(-1.0, 1.0, size=3)
        wave = np.sign(np.sin(2 * np.pi * cycles / side * (xx * np.cos(angle) + yy * np.sin(angle)) + phase))
        image += wave[..., None] * colour
    # Two levels per channel: eight saturated colours with hard edges between them.
    return np.where(image > 0, 255, 0).astype(np.uint8)
