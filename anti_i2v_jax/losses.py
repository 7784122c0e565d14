"""Anti-I2V objectives as pure functions of model outputs and taps.

Taps are plain ``{layer: array}`` dicts as a backbone returns them; nothing here touches a module.
See ``shared/docs/reference/method.md``: IRC (section 1.3), IRA (1.4), the total objective (1.5) and
the baselines (section 3). Every function returns a float32 scalar; "mean" means the mean over all
elements of a tap, so layers of different widths weigh the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

Taps = Mapping[int | str, jax.Array]


def mean_squared(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean of the squared difference, computed in float32."""
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def _require(taps: Taps, layers: Sequence[int | str], what: str) -> None:
    missing = [layer for layer in layers if layer not in taps]
    if missing:
        raise KeyError(f"{what}: layers {missing} were not tapped (have {sorted(taps, key=str)})")


def irc_loss(taps: Taps, early: int | str, deep: Sequence[int | str]) -> jax.Array:
    """Internal Representation Collapse: mean over deep layers j of ``mean((f_j - f_early)^2)``.

    Minimising it pulls the deep (semantic) features onto the early, nearly semantics-free layer.
    """
    _require(taps, [early, *deep], "irc_loss")
    if not deep:
        raise ValueError("irc_loss needs at least one deep layer")
    bad = [j for j in deep if taps[j].shape != taps[early].shape]
    if bad:
        raise ValueError(
            f"irc_loss: layers {bad} have shapes {[taps[j].shape for j in bad]}, the early layer {early} has "
            f"{taps[early].shape}; IRC compares layers of one shape: choose irc_early / irc_deep accordingly"
        )
    return jnp.mean(jnp.stack([mean_squared(taps[j], taps[early]) for j in deep]))


def ira_loss(taps: Taps, target_taps: Taps, layers: Sequence[int | str]) -> jax.Array:
    """Internal Representation Anchor: sum over layers of the per-layer mean squared distance.

    ``taps`` come from the protected-image branch and ``target_taps`` from the target-image branch
    (same noisy latent, timestep and text), or from the VAE encoder of the two images.
    """
    _require(taps, layers, "ira_loss (protected branch)")
    _require(target_taps, layers, "ira_loss (target branch)")
    if not layers:
        return jnp.zeros((), jnp.float32)
    return sum(mean_squared(taps[m], target_taps[m]) for m in layers)


def sds_surrogate(prediction: jax.Array, target: jax.Array, latents: jax.Array) -> jax.Array:
    """Score-distillation surrogate whose gradient w.r.t. ``latents`` is ``(prediction - target) / n``.

    The residual is a constant (no gradient flows through the denoiser), so the image gradient is the
    encoder's Jacobian applied to it, as in Xue et al. (ICLR 2024) ``pgd_sds``.
    """
    residual = jax.lax.stop_gradient(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(residual * latents.astype(jnp.float32))


def weighted_total(
    terms: Mapping[str, jax.Array], weights: Mapping[str, float], scales: Mapping[str, jax.Array]
) -> jax.Array:
    """``sum_k w_k * L_k / s_k``; the sign of each weight says whether a term is minimised (+) or maximised (-)."""
    return sum(weights[k] * terms[k] / scales[k] for k in weights)
