"""The shared attention: every kernel equals the plain softmax formula (values and gradients), and the
blockwise kernel's memory does not grow with Lq * Lk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anti_i2v_jax.nn.attention import attention, attention_implementation


def reference(q, k, v, scale, key_mask=None, bias=None):
    """The textbook formula in float64 numpy terms (via jnp on float32 inputs upcast)."""
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _inputs(b, lq, lk, h, d, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


SHAPES = [  # (B, Lq, Lk, H, D): odd lengths, lengths below/above/at the block size, cross-attention
    (1, 1, 1, 1, 4),
    (2, 37, 53, 3, 8),
    (1, 64, 64, 2, 16),
    (3, 17, 5, 2, 8),
    (2, 100, 77, 4, 12),
]


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_equal_the_formula(impl, shape, masked):
    b, lq, lk, h, d = shape
    q, k, v = _inputs(*shape)
    scale = 0.37
    mask = None
    if masked:  # per-sample valid lengths, at least one key each
        lengths = np.maximum(1, (np.arange(b) * 7 + lk // 2) % (lk + 1))
        mask = jnp.asarray(np.arange(lk)[None] < lengths[:, None])
    cot = jnp.asarray(np.random.default_rng(1).normal(size=(b, lq, h, d)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    with attention_implementation(impl, block_q=8, block_k=16):
        ours = jax.jit(lambda q, k, v: attention(q, k, v, scale=scale, key_mask=mask))
        grads = jax.jit(jax.grad(loss(lambda q, k, v: attention(q, k, v, scale=scale, key_mask=mask)), (0, 1, 2)))
        out, g = ours(q, k, v), grads(q, k, v)
    want = reference(q, k, v, scale, mask)
    g_want = jax.grad(loss(lambda q, k, v: reference(q, k, v, scale, mask)), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    for a, w in zip(g, g_want):
        np.testing.assert_allclose(a, w, atol=1e-5, rtol=1e-5)


def test_blockwise_is_blocked_for_real():
    """With blocks smaller than the sequence the blockwise kernel runs several key and query blocks, and
    its results differ from the plain kernel only by float rounding (not bit-identical: a real loop)."""
    q, k, v = _inputs(1, 40, 40, 2, 8)
    with attention_implementation("blockwise", block_q=8, block_k=8):
        jaxpr = str(jax.make_jaxpr(lambda q: attention(q, k, v))(q))
    assert "scan" in jaxpr and "length=5" in jaxpr


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _inputs(2, 6, 9, 2, 4)
    mask = jnp.asarray(np.array([[False] * 9, [True] * 4 + [False] * 5]))
    for impl in ("xla", "blockwise"):
        with attention_implementation(impl, block_q=4, block_k=4):
            out = attention(q, k, v, key_mask=mask)
            g = jax.grad(lambda q: jnp.sum(attention(q, k, v, key_mask=mask)))(q)
        assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(g)), impl
        np.testing.assert_allclose(out[1], reference(q, k, v, 0.5, mask)[1], atol=1e-5)


def test_additive_bias_takes_the_plain_formula():
    q, k, v = _inputs(2, 7, 7, 2, 4)
    causal = jnp.where(jnp.tril(jnp.ones((7, 7), bool)), 0.0, -jnp.inf)
    with attention_implementation("blockwise"):
        out = attention(q, k, v, scale=0.5, bias=causal)
    np.testing.assert_allclose(out, reference(q, k, v, 0.5, bias=causal), atol=1e-5)


def test_bfloat16_keeps_float32_statistics():
    q, k, v = _inputs(2, 33, 41, 2, 16)
    want = reference(q, k, v, 0.25)
    for impl in ("xla", "blockwise"):
        with attention_implementation(impl, block_q=8, block_k=8):
            out = attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), scale=0.25)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=3e-2)


def test_vmap_and_jit_compose():
    q, k, v = _inputs(2, 20, 20, 2, 8)
    with attention_implementation("blockwise", block_q=8, block_k=8):
        batched = jax.jit(jax.vmap(lambda q, k, v: attention(q[None], k[None], v[None])[0]))(q, k, v)
    np.testing.assert_allclose(batched, reference(q, k, v, 8**-0.5), atol=1e-5)


def test_blockwise_memory_is_linear_in_length():
    """XLA's own estimate for the gradient at L = 8192: the plain kernel needs the (L, L) scores (256 MiB
    in float32), the blockwise one a few blocks."""
    n, d = 8192, 64
    spec = jax.ShapeDtypeStruct((1, n, 1, d), jnp.float32)

    def temp_bytes(impl):
        with attention_implementation(impl, block_q=512, block_k=512):
            step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)), (0, 1, 2)))
            return step.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

    plain, blockwise = temp_bytes("xla"), temp_bytes("blockwise")
    assert plain >= n * n * 4
    assert blockwise < 32 * 2**20, blockwise


def test_bad_shapes_are_clear_errors():
    q, k, v = _inputs(1, 4, 5, 2, 4)
    with pytest.raises(ValueError, match="B, L, H, D"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="key_mask"):
        attention(q, k, v, key_mask=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        with attention_implementation("flash"):
            pass


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel exists on NVIDIA GPUs only")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_equals_formula_on_gpu(dtype):
    """On a GPU, the cuDNN flash kernel (what bf16 runs choose) equals the formula to half-precision
    accuracy, values and gradients (until it does, "auto" never picks it: GPU_AUTO_CUDNN).
    Run with JAX_PLATFORMS=cuda (the suite's conftest defaults to the CPU)."""
    q, k, v = (a.astype(dtype) for a in _inputs(2, 200, 333, 4, 64, seed=3))
    scale = 64**-0.5
    cot = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

    def loss(q, k, v, impl):
        with attention_implementation(impl):
            return jnp.sum(attention(q, k, v, scale=scale).astype(jnp.float32) * cot)

    want = reference(q, k, v, scale)
    with attention_implementation("cudnn"):
        got = attention(q, k, v, scale=scale)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
    ref_grads = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, scale) * cot), argnums=(0, 1, 2))(q, k, v)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "cudnn")
    for g, r in zip(grads, ref_grads):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.abs(g - r).max() <= 3e-2 * np.abs(r).max()
