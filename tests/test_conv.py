"""The convolution every backbone uses: lax's values and gradients, and the fast input gradient in a loop."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from anti_i2v_jax.nn import conv
from anti_i2v_jax.nn.conv import Conv, conv_general_dilated

CASES = [  # (input shape, kernel shape, strides, padding)
    ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 11, 5), (3, 3, 5, 7), (2, 2), ((0, 1), (0, 1))),  # a VAE downsampler
    ((1, 10, 10, 4), (4, 4, 4, 6), (4, 4), "VALID"),  # a patch embedding
    ((1, 10, 13, 4), (3, 3, 4, 6), (2, 3), "SAME"),
    ((1, 5, 8, 8, 3), (3, 3, 3, 3, 4), (1, 1, 1), ((2, 0), (1, 1), (1, 1))),  # causal in time
    ((2, 7, 6, 6, 3), (3, 1, 1, 3, 4), (2, 1, 1), "VALID"),
    ((2, 7, 6, 6, 3), (3, 2, 2, 3, 4), (1, 1, 1), ((0, 3), (1, 0), (2, 2))),
]


def _dn(ndim):
    return ("NHWC", "HWIO", "NHWC") if ndim == 4 else ("NDHWC", "DHWIO", "NDHWC")


@pytest.mark.parametrize("small_map", [False, True], ids=["flipped-kernel", "by-taps"])
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", CASES)
def test_values_and_gradients_equal_lax(x_shape, w_shape, strides, padding, small_map, monkeypatch):
    # both CPU input gradients on every case, whatever the map's size would choose
    monkeypatch.setattr(conv, "_small_map", lambda g_shape, w_shape: small_map)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    dn = _dn(len(x_shape))
    ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)  # noqa: E731
    mine = lambda x, w: conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)  # noqa: E731
    out = ref(x, w)
    c = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)) * c)

    np.testing.assert_allclose(mine(x, w), out, atol=1e-5)
    want = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(loss(mine), argnums=(0, 1)))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    # the input gradient alone (the kernel's is never computed), batched under vmap
    got_x = jax.jit(jax.vmap(jax.grad(loss(mine)), in_axes=(0, None)))(jnp.stack([x, 2 * x]), w)
    np.testing.assert_allclose(got_x[0], want[0], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(got_x[1], jax.grad(loss(ref))(2 * x, w), atol=1e-4, rtol=1e-5)


def test_the_input_gradient_in_a_loop_uses_an_io_kernel():
    """Inside a loop XLA's CPU backend left lax's swapped kernel (``...oi``) in place and ran a generic
    convolution several times slower; the port's input gradient convolves with a kernel laid out ``...io``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)), jnp.float32)
    dn = _dn(4)

    def labels(conv):
        grad = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))))

        def run(x):
            return lax.scan(lambda x, _: (x - 1e-3 * jnp.sign(grad(x)), None), x, None, length=3)[0]

        return set(re.findall(r"dim_labels=\w+_(\w+)->", jax.jit(run).lower(x).compile().as_text()))

    assert labels(conv_general_dilated) == {"01io"}
    assert "01oi" in labels(lax.conv_general_dilated)  # what the test guards against, as XLA compiles it today


def test_a_small_map_gradient_reads_the_kernel_in_place():
    """On a map with fewer positions than channels the input gradient neither flips nor transposes the kernel
    (the largest array there): compiled in a loop, nothing of the kernel's size is made but the kernel itself;
    the values equal lax's, in float32 and, to bfloat16 rounding, in bfloat16."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 24, 40)), jnp.float32) / 25
    pads = ((2, 0), (1, 1), (1, 1))
    assert conv._small_map((1, 2, 4, 4, 40), w.shape)  # 32 positions, 40 channels

    def run(conv_fn, x, w):
        grad = jax.grad(lambda x: jnp.sum(jnp.tanh(conv_fn(x, w, (1, 1, 1), pads, dimension_numbers=_dn(5)))))
        return lax.scan(lambda x, _: (x - 1e-2 * grad(x), None), x, None, length=3)[0]

    def kernel_sized(conv_fn):  # the ops that make an array of the kernel's size
        hlo = jax.jit(functools.partial(run, conv_fn)).lower(x, w).compile().as_text()
        made = re.findall(r"= f32\[([\d,]+)\]\S* ([\w-]+)\(", hlo)
        return {op for dims, op in made if np.prod([int(d) for d in dims.split(",")]) == w.size} - {
            "parameter", "get-tuple-element", "bitcast", "tuple", "opt-barrier"}

    assert kernel_sized(conv_general_dilated) == set()
    assert kernel_sized(lax.conv_general_dilated)  # lax's rule does copy it: the test can tell
    np.testing.assert_allclose(jax.jit(functools.partial(run, conv_general_dilated))(x, w),
                               run(lax.conv_general_dilated, x, w), atol=1e-5)
    bf16 = jax.jit(functools.partial(run, conv_general_dilated))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(bf16, np.float32), run(lax.conv_general_dilated, x, w), atol=0.05)


def test_module_has_flax_conv_parameters():
    x = jnp.ones((1, 6, 6, 3))
    params = Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="conv").init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (3, 3, 3, 4), "bias": (4,)}}
