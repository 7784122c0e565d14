"""Evaluation of protection: the paper's metrics and the offline measures that stand in for none of them.

One module per family: :mod:`~anti_i2v_jax.eval.image` (imperceptibility of the protected photo),
:mod:`~anti_i2v_jax.eval.quality` (BRISQUE), :mod:`~anti_i2v_jax.eval.identity` (face identity: dlib offline,
ArcFace when its weights are given), :mod:`~anti_i2v_jax.eval.dino` (DINO ViT-S/16 similarity),
:mod:`~anti_i2v_jax.eval.qalign` (Q-Align scoring rules), and :mod:`~anti_i2v_jax.eval.suite`, which scores a
(photo, video) pair with every metric and reports each absent one as :class:`Missing` with its reason.
"""

from anti_i2v_jax.eval.base import MetricUnavailable, Missing, is_missing

__all__ = ["MetricUnavailable", "Missing", "is_missing"]
