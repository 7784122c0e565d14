"""The mixed-precision policy: which dtype the backbones compute in.

``fp32`` (the default, used by tests and parity checks) runs everything in float32. ``bf16`` (for real
runs) holds the weights in bfloat16 and runs matmuls and convolutions in bfloat16, while what decides
the result stays in float32: normalisation statistics (Flax norms reduce in float32), softmax statistics
(``nn/attention.py``), timestep and RoPE tables (computed in float32, cast at use), every loss, the
perturbation, its colour/DCT transforms and its projection (the attack never leaves float32). Adapters
cast their inputs to the compute dtype at the model boundary and their outputs back to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anti_i2v_jax.errors import UserError

PRECISIONS: dict[str, jnp.dtype] = {"fp32": jnp.dtype(jnp.float32), "bf16": jnp.dtype(jnp.bfloat16)}


def compute_dtype(precision: str) -> jnp.dtype:
    """The dtype of weights and matmuls for ``precision`` (``"fp32"`` or ``"bf16"``)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


def cast_floating(tree, dtype):
    """``tree`` with every floating-point leaf cast to ``dtype`` (integer and bool leaves untouched)."""

    def cast(a):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
            if isinstance(a, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
            return jnp.asarray(a).astype(dtype)
        return a

    return jax.tree.map(cast, tree)
