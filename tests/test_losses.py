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
    rng = np.random.default_rng(0)
    residual = jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)  # (F, h, w, C)
    latents = jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)
    g_lat = jax.grad(lambda z: losses.sds_surrogate(residual, z))(latents)
    # Per-frame sums rescaled to SD's 64x64x4 latent, averaged over the 3 frames.
    np.testing.assert_allclose(g_lat, residual * (64 * 64 * 4 / (8 * 8 * 4)) / 3, rtol=1e-6)
    g_res = jax.grad(lambda r: losses.sds_surrogate(r, latents))(residual)
    np.testing.assert_array_equal(g_res, 0.0)  # no gradient through the denoiser
    # At SD's own size it is Diff-Protect's z.backward(gradient=residual): the plain sum.
    one = jnp.asarray(rng.normal(size=(1, 64, 64, 4)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(1, 64, 64, 4)), jnp.float32)
    np.testing.assert_allclose(losses.sds_surrogate(one, z), jnp.sum(one * z), rtol=1e-5)


def test_texture_sum_is_mists_sum_at_sd_size_and_rescaled_beyond():
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(rng.normal(size=(64, 64, 4)), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(losses.texture_sum(a, b), jnp.sum((a - b) ** 2), rtol=1e-5)
    big_a, big_b = jnp.tile(a, (2, 1, 1)), jnp.tile(b, (2, 1, 1))  # twice the elements, same per-element error
    np.testing.assert_allclose(losses.texture_sum(big_a, big_b), losses.texture_sum(a, b), rtol=1e-5)


def test_cosine_distance():
    a = jnp.asarray([1.0, 0.0, 0.0])
    assert float(losses.cosine_distance(a, 3 * a)) == pytest.approx(0.0, abs=1e-7)
    assert float(losses.cosine_distance(a, jnp.asarray([0.0, 2.0, 0.0]))) == pytest.approx(1.0)
    assert float(losses.cosine_distance(a, -a)) == pytest.approx(2.0)
    tilted = jnp.asarray([1.0, 1e-4, 0.0])  # 1 - cos = 5e-9: below float32's resolution of 1 - dot
    assert float(losses.cosine_distance(a, tilted)) == pytest.approx(5e-9, rel=1e-3)


def test_weighted_total_signs_and_scales():
    terms = {"irc": jnp.asarray(2.0), "dm": jnp.asarray(3.0)}
    total = losses.weighted_total(terms, {"irc": 1.0, "dm": -1.0}, {"irc": 2.0, "dm": 1.5})
    assert float(total) == pytest.approx(1.0 - 2.0)
