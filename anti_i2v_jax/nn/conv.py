"""Convolutions whose input gradient stays fast on XLA's CPU backend.

The gradient of a convolution with respect to its input is a convolution of the output gradient with the
kernel flipped in space and with its input and output channels swapped. JAX writes the swap as dimension
numbers (``...oi``), not as data. Compiled on its own, XLA's CPU backend then copies the kernel into the
layout its fast convolution wants; inside a loop (the protection steps run in ``lax.scan``) it keeps the
swapped layout instead and falls back to a generic convolution several times slower: measured on this
project's CPU benchmarks, a step in a scan took 1.45x (Open-Sora) and 2.3x (DynamiCrafter) the time of the same
step compiled alone, nearly all of the difference in those convolutions. :func:`conv_general_dilated` computes
the input gradient from a kernel it flips and transposes itself, behind an optimisation barrier so that the copy
is real: the fast convolution in or out of a loop.

On small maps (no more output positions than channels: the deep, wide levels of a VAE at benchmark sizes) even
that copy dominates: the kernel is the largest operand and copying it costs more than the arithmetic. There the
input gradient is one matrix product with the kernel read in place, and its products are added back at the
input positions each tap reached (:func:`_input_grad_by_taps`). Measured on Open-Sora's CPU benchmark step in a
scan (its temporal VAE's 3x3x3x512x512 kernels on 8x8 maps): 1.70 s -> 0.84 s per step and peak RSS 2.18 ->
1.59 GB.

That holds on CPU only. Elsewhere (GPU: cuDNN runs the input gradient from the kernel as it is) the gradient is
JAX's own. The kernel's gradient, where anything asks for it, is JAX's own everywhere; a protection step never
asks (the weights are constants), and then the forward pass keeps nothing for it.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """``lax.conv_general_dilated`` (same arguments) with the CPU-friendly input gradient, for channel-last
    inputs with ``...IO`` kernels (Flax's ``nn.Conv`` layout), no dilation and no groups; other layouts go to
    ``lax.conv_general_dilated`` unchanged."""
    nd = lhs.ndim - 2
    plain = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
    )
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if dilated or feature_group_count != 1 or batch_group_count != 1 or not _channels_last(dimension_numbers, nd):
        return plain(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    # the input's shape and dtype are static: the input gradient needs them where the input is not kept
    return _conv(lhs, rhs, (strides, pads, precision, preferred_element_type, lhs.shape, jnp.dtype(lhs.dtype)))


class Conv(nn.Conv):
    """``flax.linen.Conv`` computing with :func:`conv_general_dilated` (same parameters, same names)."""

    conv_general_dilated: object = conv_general_dilated


def _spec(nd: int) -> tuple[str, str, str]:
    space = "DHW"[-nd:] if nd <= 3 else "".join(chr(ord("a") + i) for i in range(nd))
    return f"N{space}C", f"{space}IO", f"N{space}C"


def _channels_last(dimension_numbers, nd: int) -> bool:
    if dimension_numbers is None:  # lax's default is channel-first
        return False
    if not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        dimension_numbers = lax.conv_dimension_numbers((1,) * (nd + 2), (1,) * (nd + 2), dimension_numbers)
    wanted = lax.conv_dimension_numbers((1,) * (nd + 2), (1,) * (nd + 2), _spec(nd))
    return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, wanted))


def _forward(x, w, strides, pads, precision, preferred):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_spec(x.ndim - 2), precision=precision,
                                    preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, static):
    strides, pads, precision, preferred, _, _ = static
    return _forward(x, w, strides, pads, precision, preferred)


def _conv_fwd(x, w, static):
    strides, pads, precision, preferred, _, _ = static
    kept = x.value if w.perturbed else None  # the input only where the kernel's gradient is wanted
    return _forward(x.value, w.value, strides, pads, precision, preferred), (kept, w.value)


def _conv_bwd(static, residuals, g):
    strides, pads, precision, preferred, x_shape, x_dtype = static
    x, w = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None

    def native(g, w):  # JAX's own rule: the channel swap as dimension numbers
        transpose = jax.linear_transpose(lambda a: _forward(a, w, strides, pads, precision, preferred),
                                         jax.ShapeDtypeStruct(x_shape, x_dtype))
        return transpose(g)[0].astype(x_dtype)

    def materialised(g, w):
        nd = len(strides)
        # Made from the kernel once the output gradient exists, so that the copy lives only for this
        # convolution (not from the start of the program, as all of them would otherwise).
        w, _ = lax.optimization_barrier((w, g))
        flipped = jnp.swapaxes(jnp.flip(w, axis=tuple(range(nd))), -1, -2)
        flipped = lax.optimization_barrier(flipped)  # a real copy in the fast layout, never folded back
        out, k = g.shape[1:-1], w.shape[:nd]
        grad_pads = [(k[i] - 1 - lo, x_shape[1 + i] - 1 - (out[i] - 1) * strides[i] + lo)
                     for i, (lo, _) in enumerate(pads)]
        return lax.conv_general_dilated(g, flipped, (1,) * nd, grad_pads, lhs_dilation=strides,
                                        dimension_numbers=_spec(nd), precision=precision,
                                        preferred_element_type=preferred).astype(x_dtype)

    def by_taps(g, w):
        return _input_grad_by_taps(g, w, strides, pads, x_shape, precision).astype(x_dtype)

    cpu = by_taps if _small_map(g.shape, w.shape) else materialised
    dx = lax.platform_dependent(g, w, cpu=cpu, default=native)  # each in the input's dtype
    dw = None
    if x is not None:
        _, vjp_w = jax.vjp(lambda b: _forward(x, b, strides, pads, precision, preferred), w)
        dw = vjp_w(g)[0]
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def _small_map(g_shape, w_shape) -> bool:
    """Whether a CPU input gradient goes through :func:`_input_grad_by_taps`: the output (all batch entries)
    has no more positions than channels."""
    return math.prod(g_shape[:-1]) <= w_shape[-1]


def _input_grad_by_taps(g, w, strides, pads, x_shape, precision):
    """The input gradient of a convolution on a small map, with no copy of the kernel.

    The kernel as stored, ``(taps * I, O)``, times the output gradient, ``(O, positions)``: the gradient of
    every kernel tap at every output position, in one matrix product whose large operand, the kernel, is read in
    place (XLA's CPU backend copies a transposed right operand; here only the small gradient is transposed).
    Each tap's products are then added at the input positions that tap reached (``lax.pad`` with the stride as
    interior padding, cropped by the forward padding). Used where the output has no more positions than
    channels, where the products take no more memory than a flipped copy of the kernel would and the kernel,
    the largest operand, is read once instead of copied and read again.
    """
    nd = len(strides)
    taps, (n_in, n_out) = w.shape[:nd], w.shape[-2:]
    n, out = g.shape[0], g.shape[1:-1]
    accumulate = jnp.promote_types(g.dtype, jnp.float32)  # the sum over taps in float32 (bf16 runs too)
    # (*taps, I, O) -> (taps*I, O) and (n, *out, O) -> (n*positions, O): contract O -> (taps*I, n*positions)
    products = lax.dot_general(w.reshape(-1, n_out), g.reshape(-1, n_out), (((1,), (1,)), ((), ())),
                               precision=precision, preferred_element_type=accumulate)
    products = products.reshape(*taps, n_in, n, *out)  # (taps*I, n*positions) -> (*taps, I, n, *out)
    zero = jnp.zeros((), accumulate)
    dx = jnp.zeros((n_in, *x_shape[:-1]), accumulate)  # (I, n, *input space): channels first until the end
    for tap in itertools.product(*map(range, taps)):
        # tap t of output position p read input position p * stride + t - pad_lo
        config = [(0, 0, 0), (0, 0, 0)]
        for i in range(nd):
            lo = tap[i] - pads[i][0]
            config.append((lo, x_shape[1 + i] - lo - (out[i] - 1) * strides[i] - 1, strides[i] - 1))
        dx = dx + lax.pad(products[tap], zero, config)  # (I, n, *out) -> (I, n, *input space)
    return jnp.moveaxis(dx, 0, -1)  # (I, n, *input space) -> (n, *input space, I)
