"""Rematerialisation of block stacks: ``nn.remat`` with a named checkpoint policy.

A rematerialised block keeps only its inputs for the backward pass and recomputes its forward there,
so a stack's activation memory is one block's plus the block inputs. The policy names what a block
may keep besides its inputs (the names of ``jax.checkpoint_policies``):

* ``nothing_saveable`` (default): keep nothing, recompute the whole block (least memory, one extra
  forward per block);
* ``dots_with_no_batch_dims_saveable``: keep the outputs of weight matmuls (projections, MLPs), recompute
  the rest (more memory, less recompute);
* ``everything_saveable``: keep everything (remat off in effect; for comparisons).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def check_policy(policy: str) -> str:
    """``policy`` if it is a known name; a clear error otherwise."""
    if policy not in POLICIES:
        from anti_i2v_jax.errors import UserError

        raise UserError(f"unknown remat policy {policy!r}; known: {sorted(POLICIES)}")
    return policy


def maybe_remat(module_cls, enabled: bool, policy: str = "nothing_saveable", **kwargs):
    """``module_cls`` rematerialised under ``policy`` when ``enabled`` (``kwargs`` go to ``nn.remat``)."""
    if not enabled:
        return module_cls
    return nn.remat(module_cls, policy=POLICIES[check_policy(policy)], **kwargs)


def stack_layers(params: dict, prefix: str, n: int) -> tuple[dict, Any]:
    """Split looped layer parameters off for a scan: ``(params without prefix_0..prefix_{n-1}, those n trees stacked
    on a new leading layer axis)``. Converted checkpoints are stored looped; abstract trees (ShapeDtypeStructs)
    stack to abstract leaves."""
    import jax.numpy as jnp

    def stack(*xs):
        if isinstance(xs[0], jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
        return jnp.stack(xs)

    rest = dict(params)
    layers = [rest.pop(f"{prefix}_{i}") for i in range(n)]
    return rest, jax.tree.map(stack, *layers)

