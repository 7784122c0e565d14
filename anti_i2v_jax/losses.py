"""Anti-I2V objectives as pure functions of model outputs and taps.

Taps are plain ``{layer: array}`` dicts as a backbone returns them; nothing here touches a module.
See ``docs/method.md``: IRC, IRA, the auxiliary term, the total objective and
the baselines (README: Methods). Every function returns a float32 scalar; "mean" means the mean over all
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


# Stable Diffusion's latent (4 x 64 x 64) is the size MIST's and Diff-Protect's summed losses were balanced at.
SD_LATENT_ELEMENTS = 4 * 64 * 64


def texture_sum(z: jax.Array, z_target: jax.Array) -> jax.Array:
    """MIST's textural loss, ``MSELoss(reduction="sum")`` between latents, rescaled to SD's latent size.

    ``sum((z - z_target)^2) * SD_LATENT_ELEMENTS / z.size``: exactly MIST's value on a 64x64x4 latent, and on
    larger latents the same per-element weight against a mean-reduced diffusion loss, so MIST's fusion
    rate (1e4) keeps the balance it was chosen for.
    """
    d = z.astype(jnp.float32) - z_target.astype(jnp.float32)
    return jnp.sum(jnp.square(d)) * (SD_LATENT_ELEMENTS / d.size)


def sds_surrogate(residual: jax.Array, latents: jax.Array) -> jax.Array:
    """Score-distillation surrogate: its gradient w.r.t. ``latents`` is the constant ``residual`` (eps_hat - eps).

    No gradient flows through the denoiser (Xue et al., ICLR 2024, ``pgd_sds``: ``z.backward(gradient=eps_hat -
    eps)``). The sum over each frame is rescaled to SD's latent size and averaged over frames, so with one
    64x64x4 frame it is Diff-Protect's surrogate exactly, and ``sdst``'s target rate keeps its meaning.
    """
    r = jax.lax.stop_gradient(residual.astype(jnp.float32))
    per_frame = r[0].size if r.ndim > 3 else r.size
    frames = r.shape[0] if r.ndim > 3 else 1
    return jnp.sum(r * latents.astype(jnp.float32)) * (SD_LATENT_ELEMENTS / per_frame) / frames


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """``1 - cos(a, b)`` over all elements (float32): VGMShield's feature distance.

    Computed as ``|a/|a| - b/|b||^2 / 2``, equal to ``1 - cos`` but exact near 0, where ``1 - dot`` would lose
    every digit to rounding (two nearly parallel embeddings are the common case at the start of a run).
    """
    a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v), 1e-12)  # noqa: E731
    return 0.5 * jnp.sum(jnp.square(unit(a) - unit(b)))


def weighted_total(
    terms: Mapping[str, jax.Array], weights: Mapping[str, float], scales: Mapping[str, jax.Array]
) -> jax.Array:
    """``sum_k w_k * L_k / s_k``; the sign of each weight says whether a term is minimised (+) or maximised (-)."""
    return sum(weights[k] * terms[k] / scales[k] for k in weights)
