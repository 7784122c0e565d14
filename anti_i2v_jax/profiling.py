"""Counting the work of a traced function: matmul and convolution FLOPs from its jaxpr.

XLA's ``cost_analysis()`` counts the body of a loop once, so a scanned block stack (and the blockwise
attention's loops) would be undercounted by its trip count. This walker multiplies a ``scan`` body by
its length, takes the costlier branch of a ``cond``, and descends into ``pjit``, ``remat``
(``checkpoint``) and custom-derivative calls, so a rematerialised block's recomputation is counted
where the backward pass runs it. Only ``dot_general`` and ``conv_general_dilated`` are counted
(2 FLOPs per multiply-add): everything else is a small share of a transformer or U-Net step.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import jax
from jax.extend import core as jcore


def _dot_flops(eqn) -> float:
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    contracted = math.prod(lhs[i] for i in lc)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0]
    kernel_elems = math.prod(rhs) / rhs[out_feature_dim]  # in_channels/groups x kernel window
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * kernel_elems


def _subjaxprs(value):
    for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jcore.ClosedJaxpr):
            yield sub.jaxpr
        elif isinstance(sub, jcore.Jaxpr):
            yield sub


def jaxpr_flops(jaxpr, by_dtype: collections.Counter | None = None, scale: float = 1.0) -> float:
    """Matmul + convolution FLOPs of ``jaxpr`` (loops multiplied out); ``by_dtype`` collects them by the
    operand dtypes (``"float32"``, ``"bfloat16"``, or ``"mixed"``)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            flops = scale * (_dot_flops(eqn) if name == "dot_general" else _conv_flops(eqn))
            total += flops
            if by_dtype is not None:
                a, b = (str(v.aval.dtype) for v in eqn.invars[:2])
                by_dtype[a if a == b else "mixed"] += flops
            continue
        if name == "scan":
            total += jaxpr_flops(eqn.params["jaxpr"].jaxpr, by_dtype, scale * eqn.params["length"])
            continue
        if name == "cond":
            costs = [(jaxpr_flops(b.jaxpr, None, scale), b) for b in eqn.params["branches"]]
            cost, branch = max(costs, key=lambda c: c[0])
            total += jaxpr_flops(branch.jaxpr, by_dtype, scale)
            continue
        if name == "while":  # trip count unknown: counted once (none of the backbones' steps has one)
            total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr, by_dtype, scale)
            continue
        for key, value in eqn.params.items():
            if key in ("fwd_jaxpr_thunk", "bwd", "jvp_jaxpr_fun", "jvp_jaxpr_thunk"):
                continue
            for sub in _subjaxprs(value):
                total += jaxpr_flops(sub, by_dtype, scale)
    return total


def flops(fn: Callable, *args) -> float:
    """Matmul + convolution FLOPs of one call of ``fn(*args)`` (arrays or ShapeDtypeStructs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
