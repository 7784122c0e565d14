"""Seeded random parameters from an abstract tree, without running a model (for tiny demo models)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np


def seeded_params(abstract, seed: int, special: Mapping[str, Callable[[tuple], np.ndarray]] | None = None):
    """Fill ``abstract`` (ShapeDtypeStructs): kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales 1,
    everything else 0; ``special`` maps a leaf name to its own initialiser. The same seed gives the same tree."""
    rng = np.random.default_rng(seed)
    special = dict(special or {})

    def leaf(path, spec):
        name = path[-1].key
        if name in special:
            return np.asarray(special[name](spec.shape), np.float32)
        if name == "kernel":
            return (rng.standard_normal(spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))).astype(np.float32)
        if name == "embedding":
            return rng.standard_normal(spec.shape).astype(np.float32)
        if name == "scale":
            return np.ones(spec.shape, np.float32)
        return np.zeros(spec.shape, np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(leaf, abstract))
