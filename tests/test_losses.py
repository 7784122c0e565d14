"""Properties of the IRC / IRA / SDS objectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anti_i2v_jax import losses

feats = arrays(np.float32, (3, 4), elements=st.floats(-10, 10, width=32))


@settings(max_examples=50, deadline=None)
@given(feats, feats, feats)
def test_irc_is_mean_over_deep_layers_of_mse_to_early(a, b, c):
    taps = {3: jnp.asarray(a), 7: jnp.asarray(b), 9: jnp.asarray(c)}
    got = float(losses.irc_loss(taps, 3, (7, 9)))
    expected = (np.mean((b - a) ** 2) + np.mean((c - a) ** 2)) / 2
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert got >= 0


@settings(max_examples=50, deadline=None)
@given(feats, feats)
def test_irc_vanishes_exactly_when_deep_equals_early(a, b):
    assert float(losses.irc_loss({0: jnp.asarray(a), 1: jnp.asarray(a)}, 0, (1,))) == 0.0
    if np.abs(a - b).max() > 1e-3:  # smaller differences may underflow when squared in float32
        assert float(losses.irc_loss({0: jnp.asarray(a), 1: jnp.asarray(b)}, 0, (1,))) > 0


@settings(max_examples=50, deadline=None)
@given(feats, feats, feats, feats)
def test_ira_is_symmetric_additive_and_zero_on_identical_taps(a, b, c, d):
    p = {0: jnp.asarray(a), "latent": jnp.asarray(b)}
    q = {0: jnp.asarray(c), "latent": jnp.asarray(d)}
    both = float(losses.ira_loss(p, q, (0, "latent")))
    assert both == pytest.approx(float(losses.ira_loss(q, p, (0, "latent"))), rel=1e-6)
    parts = float(losses.ira_loss(p, q, (0,))) + float(losses.ira_loss(p, q, ("latent",)))
    assert both == pytest.approx(parts, rel=1e-5, abs=1e-6)
    assert float(losses.ira_loss(p, p, (0, "latent"))) == 0.0


def test_ira_is_the_per_layer_mean_so_wide_layers_do_not_dominate():
    small = {0: jnp.zeros((2,)), 1: jnp.zeros((200,))}
    ones = {0: jnp.ones((2,)), 1: jnp.ones((200,))}
    assert float(losses.ira_loss(small, ones, (0, 1))) == pytest.approx(2.0)


def test_missing_layers_are_named():
    with pytest.raises(KeyError, match=r"\[5\]"):
        losses.irc_loss({0: jnp.zeros(3)}, 0, (5,))
    with pytest.raises(KeyError, match="target branch"):
        losses.ira_loss({1: jnp.zeros(3)}, {}, (1,))


def test_sds_surrogate_gradient_is_the_residual():
    pred = jnp.asarray([1.0, 2.0, 3.0, 5.0])
    target = jnp.asarray([0.5, 2.0, 1.0, 6.0])
    latents = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    g_lat = jax.grad(lambda z: losses.sds_surrogate(pred, target, z))(latents)
    np.testing.assert_allclose(g_lat, (pred - target) / 4, rtol=1e-6)
    g_pred = jax.grad(lambda p: losses.sds_surrogate(p, target, latents))(pred)
    np.testing.assert_array_equal(g_pred, 0.0)  # no gradient through the denoiser


def test_weighted_total_signs_and_scales():
    terms = {"irc": jnp.asarray(2.0), "dm": jnp.asarray(3.0)}
    total = losses.weighted_total(terms, {"irc": 1.0, "dm": -1.0}, {"irc": 2.0, "dm": 1.5})
    assert float(total) == pytest.approx(1.0 - 2.0)
