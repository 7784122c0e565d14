"""The convolution every backbone uses: lax's values and gradients, and the fast input gradient in a loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

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


@pytest.mark.parametrize("x_shape, w_shape, strides, padding", CASES)
def test_values_and_gradients_equal_lax(x_shape, w_shape, strides, padding):
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


def test_module_has_flax_conv_parameters():
    x = jnp.ones((1, 6, 6, 3))
    params = Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="conv").init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (3, 3, 3, 4), "bias": (4,)}}
