"""Execution switches of every tiny backbone: the blockwise attention kernel, rematerialisation and bf16
precision change how a step runs, not what it computes (exactly, or within a stated bf16 bound)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anti_i2v_jax import losses
from anti_i2v_jax.backbones.registry import load
from anti_i2v_jax.errors import UserError
from anti_i2v_jax.nn.attention import attention_implementation
from anti_i2v_jax.profiling import jaxpr_flops

TINY = ["cogvideox-tiny", "opensora-tiny", "dynamicrafter-tiny"]


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return load(request.param)


def _image(seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(64, 64, 3)), jnp.float32)


def _objective(bb):
    """(diffusion loss, IRC) of one draw as a function of the image, through condition + denoise."""
    params, layers = bb.attack_params, bb.layers
    text = bb.encode_text(bb.params, "a person")

    def f(x):
        cond, _ = bb.condition(params, x, None, vae_layers=layers.vae_layers)
        noisy = bb.add_noise(params, cond, jax.random.PRNGKey(3))
        pred, taps = bb.denoise(params, noisy, cond, text, taps=(layers.irc_early, *layers.irc_deep))
        return jnp.stack([bb.diffusion_loss(pred, noisy), losses.irc_loss(taps, layers.irc_early, layers.irc_deep)])

    return f


def _values_and_gradient(bb, x):
    f = _objective(bb)
    # the gradient of one mix of both terms (one backward pass, one compile); the values of each term
    values, grad = jax.jit(lambda x: (f(x), jax.grad(lambda y: jnp.dot(f(y), jnp.array([1.0, 0.5])))(x)))(x)
    return np.asarray(values), np.asarray(grad)


@pytest.mark.heavy
def test_blockwise_attention_equals_plain_through_the_backbone(tiny):
    x = _image()
    with attention_implementation("xla"):
        v_plain, g_plain = _values_and_gradient(tiny, x)
    with attention_implementation("blockwise", block_q=8, block_k=8):  # several blocks at tiny sizes
        v_block, g_block = _values_and_gradient(tiny, x)
    np.testing.assert_allclose(v_block, v_plain, rtol=1e-5, atol=1e-6)
    # float32 summation order differs between the kernels: 1e-5 of the gradient scale (single near-zero pixels)
    np.testing.assert_allclose(g_block, g_plain, rtol=1e-4, atol=1e-5 * np.abs(g_plain).max())


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["cogvideox-tiny", "opensora-tiny"])  # DynamiCrafter: test_unet_remat_equals_plain
def test_remat_changes_nothing(name):
    tiny = load(name)
    x = _image(1)
    v0, g0 = _values_and_gradient(tiny.configured(remat=False), x)
    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):  # keep nothing / keep weight matmuls
        v1, g1 = _values_and_gradient(tiny.configured(remat=True, remat_policy=policy), x)
        np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6 * np.abs(g0).max())


@pytest.mark.heavy
def test_bf16_agrees_with_fp32(tiny):
    """Bounds: each loss within 3% (the terms measured within 1.2%), gradient signs equal on > 95% of pixels."""
    x = _image(2)
    v32, g32 = _values_and_gradient(tiny.configured(precision="fp32"), x)
    v16, g16 = _values_and_gradient(tiny.configured(precision="bf16"), x)
    np.testing.assert_allclose(v16, v32, rtol=3e-2)
    agree = np.mean(np.sign(g16) == np.sign(g32))
    assert agree > 0.95, agree
    assert not np.array_equal(v16, v32)  # bf16 really ran


@pytest.mark.slow
def test_bf16_runs_the_networks_in_bf16(tiny):
    """No weight matmul or convolution stays in float32: only the image preprocessing (resize matrices
    applied to the float32 perturbed image) may."""
    bb = tiny.configured(precision="bf16")
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(bb.attack_params) if jnp.issubdtype(a.dtype, jnp.floating))
    f = _objective(bb)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: f(x)[0]))(_image())
    split = collections.Counter()
    jaxpr_flops(jaxpr.jaxpr, split)
    low = split["bfloat16"] + split["mixed"]  # mixed: bf16 q/k/v against float32 softmax statistics
    assert split["bfloat16"] > 0.5 * low
    assert split["float32"] < 0.01 * low, split


def test_fp32_is_the_default_and_bad_settings_are_clear(tiny):
    assert tiny.precision == "fp32"
    with pytest.raises(UserError, match="precision"):
        tiny.configured(precision="fp8")
    with pytest.raises(UserError, match="remat policy"):
        tiny.configured(remat=True, remat_policy="some")
