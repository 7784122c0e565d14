"""Colour space, DCT, projection and quantisation against references and by their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.color import rgb2lab

from anti_i2v_jax import dsp

sizes = st.sampled_from([(1, 1), (7, 5), (16, 16), (33, 40)])  # few shapes: each new one recompiles


def _random_image(seed, h, w):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), sizes)
def test_rgb_to_lab_matches_skimage(seed, size):
    x = _random_image(seed, *size)
    # The reference runs in float64: scikit-image's own float32 path is itself ~1e-4 off the exact value.
    np.testing.assert_allclose(dsp.rgb_to_lab(x), rgb2lab(x.astype(np.float64)), atol=1e-4, rtol=0)


def test_rgb_to_lab_matches_skimage_on_dark_and_extreme_colours():
    # Values around the sRGB and CIE-f thresholds, and the corners of the gamut.
    v = np.array([0.0, 0.002, 0.01, 0.04045, 0.0405, 0.05, 0.08, 0.5, 0.999, 1.0], np.float32)
    x = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 1, 3)
    np.testing.assert_allclose(dsp.rgb_to_lab(x), rgb2lab(x.astype(np.float64)), atol=1e-4, rtol=0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), sizes)
def test_lab_round_trip_is_exact(seed, size):
    x = _random_image(seed, *size)
    np.testing.assert_allclose(dsp.lab_to_rgb(dsp.rgb_to_lab(x)), x, atol=2e-5, rtol=0)


def test_lab_round_trip_in_float64():
    with jax.enable_x64(True):
        x = np.random.default_rng(0).random((17, 23, 3))
        np.testing.assert_allclose(dsp.lab_to_rgb(dsp.rgb_to_lab(x)), x, atol=1e-12, rtol=0)
        np.testing.assert_allclose(dsp.rgb_to_lab(x), rgb2lab(x), atol=1e-9, rtol=0)


def test_colour_gradients_are_finite_at_black_and_out_of_gamut():
    black = jnp.zeros((2, 2, 3))
    assert np.isfinite(jax.grad(lambda v: dsp.rgb_to_lab(v).sum())(black)).all()
    lab = jnp.asarray([[[0.0, 80.0, -90.0], [100.0, -120.0, 120.0]]])  # out of the sRGB gamut
    assert np.isfinite(jax.grad(lambda v: dsp.lab_to_rgb(v).sum())(lab)).all()


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), sizes)
def test_global_dct_matches_scipy_and_inverts(seed, size):
    x = _random_image(seed, *size)
    c = dsp.dct2(x)
    np.testing.assert_allclose(c, scipy.fft.dctn(x, type=2, axes=(0, 1), norm="ortho"), atol=2e-5, rtol=0)
    np.testing.assert_allclose(dsp.idct2(c), x, atol=2e-6, rtol=0)


@pytest.mark.parametrize("block", [4, 8])
def test_block_dct_matches_scipy_per_tile_and_inverts(block):
    x = _random_image(3, 21, 30)  # not a multiple of the block: zero-padded
    c = np.asarray(dsp.dct2(x, block))
    assert c.shape == (-(-21 // block) * block, -(-30 // block) * block, 3)
    padded = np.pad(x, ((0, c.shape[0] - 21), (0, c.shape[1] - 30), (0, 0)))
    for i in range(0, c.shape[0], block):
        for j in range(0, c.shape[1], block):
            ref = scipy.fft.dctn(padded[i : i + block, j : j + block], type=2, axes=(0, 1), norm="ortho")
            np.testing.assert_allclose(c[i : i + block, j : j + block], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(dsp.idct2(c, block, (21, 30)), x, atol=2e-6, rtol=0)


def test_low_frequency_mask_counts():
    m = dsp.low_frequency_mask((64, 48), 0.25)
    assert m.shape == (64, 48, 1) and m.sum() == 16 * 12 and m[:16, :12].all()
    mb = dsp.low_frequency_mask((20, 16), 0.5, block=8)
    assert mb.shape == (24, 16, 1) and mb.sum() == 3 * 2 * 16 and mb[:4, :4].all() and not mb[4, 0]
    assert dsp.dct_step_scale((64, 64), 0.25) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="fraction"):
        dsp.low_frequency_mask((8, 8), 0.0)


def test_dct_step_scale_gives_the_requested_rms_change():
    size = (48, 40)
    mask = dsp.low_frequency_mask(size, 0.25)
    signs = np.where(mask, np.random.default_rng(0).choice([-1.0, 1.0], (48, 40, 3)), 0.0)
    change = dsp.idct2(signs * dsp.dct_step_scale(size, 0.25))
    assert float(jnp.sqrt(jnp.mean(change**2))) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("space", ["rgb", "lab", "dct"])
def test_space_gradient_is_the_gradient_in_that_space(space):
    """The pull-back equals autodiff through the space's own parameterisation at zero offset."""
    x = jnp.asarray(_random_image(0, 12, 10) * 0.8 + 0.1)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    loss = lambda img: jnp.sum(jnp.sin(3 * img) * w)  # noqa: E731
    grad_rgb = jax.grad(loss)(x)
    got = dsp.space_gradient(space, x, grad_rgb, dct_fraction=0.5, dct_block=None)
    if space == "rgb":
        expected = grad_rgb
    elif space == "lab":
        lab = dsp.rgb_to_lab(x)
        expected = jax.grad(lambda ab: loss(dsp.lab_to_rgb(jnp.concatenate([lab[..., :1], ab], -1))))(
            lab[..., 1:]
        )
    else:
        mask = dsp.low_frequency_mask((12, 10), 0.5)
        full = jax.grad(lambda d: loss(dsp.idct2(dsp.dct2(x) + mask * d)))(jnp.zeros_like(x))
        expected = np.asarray(full)[:6, :5][None, :, None]  # the band, as (tiles_h, k_h, tiles_w, k_w, C)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block", [None, 4])
def test_dct_band_is_the_masked_dct_and_its_inverse_is_the_band_limited_image(block):
    x = jnp.asarray(_random_image(5, 13, 18))
    band = np.asarray(dsp.dct_band(x, 0.5, block))
    full = np.asarray(dsp.dct2(x, block))
    b_h, b_w = (13, 18) if block is None else (block, block)
    k_h, k_w = -(-b_h // 2), -(-b_w // 2)
    tiles = full.reshape(full.shape[0] // b_h, b_h, full.shape[1] // b_w, b_w, 3)
    np.testing.assert_allclose(band, tiles[:, :k_h, :, :k_w], atol=2e-5)
    mask = dsp.low_frequency_mask((13, 18), 0.5, block)
    limited = dsp.idct2(np.where(mask, full, 0.0), block, (13, 18))
    np.testing.assert_allclose(dsp.dct_band_inverse(band, (13, 18), 0.5, block), limited, atol=2e-5)


def test_space_step_is_gradient_then_apply():
    x = jnp.asarray(_random_image(4, 9, 11) * 0.8 + 0.1)
    g = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
    direction = lambda v: -0.3 * jnp.sign(v)  # noqa: E731
    for space in dsp.SPACES:
        kw = dict(dct_fraction=0.25, dct_block=None)
        two = dsp.space_apply(space, x, direction(dsp.space_gradient(space, x, g, **kw)), **kw)
        np.testing.assert_allclose(dsp.space_step(space, x, g, direction, **kw), two, atol=1e-6)


def test_lab_step_leaves_lightness_and_dct_step_leaves_high_frequencies():
    x = jnp.asarray(_random_image(2, 16, 16) * 0.6 + 0.2)
    upd_ab = 0.5 * jnp.sign(jnp.asarray(np.random.default_rng(0).standard_normal((16, 16, 2)), jnp.float32))
    moved = dsp.space_apply("lab", x, upd_ab, dct_fraction=0.25, dct_block=None)
    np.testing.assert_allclose(dsp.rgb_to_lab(moved)[..., 0], dsp.rgb_to_lab(x)[..., 0], atol=1e-3)
    assert float(jnp.abs(moved - x).max()) > 1e-3
    mask = dsp.low_frequency_mask((16, 16), 0.25)
    moved = dsp.space_apply("dct", x, jnp.full((1, 4, 1, 4, 3), 0.1), dct_fraction=0.25, dct_block=None)
    delta_c = dsp.dct2(moved) - dsp.dct2(x)
    np.testing.assert_allclose(jnp.where(mask, 0.0, delta_c), 0.0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.floats(1e-3, 0.5))
def test_projection_respects_budget_and_range(seed, eps):
    rng = np.random.default_rng(seed)
    x = rng.random((6, 7, 3)).astype(np.float32)
    x_adv = x + rng.normal(0, 0.5, x.shape).astype(np.float32)
    p = np.asarray(dsp.project(x_adv, x, eps))
    assert np.abs(p - x).max() <= eps + 1e-6 and p.min() >= 0 and p.max() <= 1
    inside = np.asarray(dsp.project(p, x, eps))
    np.testing.assert_array_equal(inside, p)  # idempotent


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.5 / 255, 40 / 255))
def test_budget_holds_after_quantisation(seed, eps):
    rng = np.random.default_rng(seed)
    x_u8 = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    x = x_u8 / 255.0
    # Worst case for rounding: sit just inside the float budget, on both sides.
    x_adv = np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape) * rng.uniform(0.9, 1.0, x.shape), 0, 1)
    q = dsp.quantize(x_adv, x_u8, eps)
    assert q.dtype == np.uint8
    assert np.abs(q.astype(int) - x_u8.astype(int)).max() <= eps * 255 + 1e-9
    assert np.abs(q / 255.0 - x_adv).max() <= 1.0 / 255 + 1e-9  # never further than a level from the optimum


def test_schedules():
    assert dsp.schedule_spaces("alternate") == ("lab", "dct")
    assert dsp.schedule_spaces("rgb") == ("rgb",)
    assert dsp.schedule_spaces("lab, dct,dct") == ("lab", "dct", "dct")
    with pytest.raises(ValueError, match="unknown schedule"):
        dsp.schedule_spaces("hsv")
