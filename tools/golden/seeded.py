"""Seeded weights for golden cases whose checkpoint is too large to keep in the repository: a case records
the key names, shapes and seed, and the generator and the test both rebuild the same tensors from them."""

from __future__ import annotations

import numpy as np


def seeded_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """float32 tensors for ``shapes`` (in key order), drawn from one numpy generator; scales keep activations
    O(1): convolutions and linears 1/sqrt(fan-in), norm weights near 1, variances in [0.5, 1.5], PReLU near 0.25,
    LPIPS heads in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            out[key] = np.zeros(shape, np.int64)
            continue
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.startswith("lin") and key.endswith(".model.1.weight"):  # LPIPS heads: non-negative, as trained
            value = rng.uniform(0.0, 1.0, shape)
        elif key.endswith("prelu.weight"):
            value = 0.25 + 0.05 * rng.standard_normal(shape)
        elif len(shape) == 1 and key.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # biases and running means
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        out[key] = value.astype(np.float32)
    return out
