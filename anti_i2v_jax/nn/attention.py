"""One attention function for every backbone: ``softmax(q k^T * scale + bias, keys masked) v``.

Layout ``(B, L, H, D)`` ("BTNH", as ``jax.nn.dot_product_attention``). The kernel is picked per call:

* ``"xla"``: the plain formula. It materialises the ``(B, H, Lq, Lk)`` scores, so it is used for tiny
  shapes (tests, text encoders, temporal attention over a few frames) and whenever an additive ``bias``
  is given (T5's relative positions, CLIP's causal mask: short sequences only).
* ``"blockwise"``: flash attention in pure JAX. Queries go in blocks (``lax.map``); inside each, an online
  softmax runs over key blocks (``lax.scan``). A ``jax.custom_vjp`` keeps only ``(q, k, v, out, logsumexp)``
  and recomputes each block's scores in the backward pass, so memory is O((Lq + Lk) * D) per head, never
  O(Lq * Lk). Works on every backend and in every dtype.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention) for
  bf16/fp16 inputs without a key mask (masked calls fall back to blockwise). Opt-in only: set
  ``GPU_AUTO_CUDNN = True`` or use :func:`attention_implementation`. On the one H200 this was tried on
  (JAX 0.11.2), ``tests/test_attention.py::test_cudnn_equals_formula_on_gpu`` failed, so "auto" does not
  pick it until that test passes on the GPU in question.

Softmax statistics (max, sum, logsumexp) and the accumulators are float32 whatever the input dtype;
the output has the dtype of ``q``. A query row whose keys are all masked returns zeros (never NaN).

``implementation=None`` ("auto") chooses by backend, dtype and size; :func:`attention_implementation`
overrides the choice (and the block sizes) for everything traced inside it, e.g. to test a backbone
through the blockwise kernel. The override is read when a function is traced: re-jit after changing it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

# Whether "auto" picks cuDNN on a GPU for bf16/fp16 (see the module docstring: unverified, so off).
GPU_AUTO_CUDNN = False

Implementation = Literal["xla", "blockwise", "cudnn"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "blockwise", "cudnn")

# Auto mode uses the plain formula while B * H * Lq * Lk stays under this many scores (32 MiB in float32).
PLAIN_MAX_SCORES = 1 << 23


@dataclasses.dataclass(frozen=True)
class _Choice:
    implementation: str | None = None  # None: auto
    block_q: int = 512
    block_k: int = 512


_CHOICE: contextvars.ContextVar[_Choice] = contextvars.ContextVar("attention_choice", default=_Choice())


@contextlib.contextmanager
def attention_implementation(implementation: str | None = None, *, block_q: int = 512, block_k: int = 512):
    """Force the kernel (``"xla"``, ``"blockwise"``, ``"cudnn"``, or None for auto) and the blockwise block
    sizes for every :func:`attention` traced inside the ``with`` block."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; known: {IMPLEMENTATIONS}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    token = _CHOICE.set(_Choice(implementation, block_q, block_k))
    try:
        yield
    finally:
        _CHOICE.reset(token)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    key_mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Multi-head attention: q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D).

    ``scale`` defaults to 1/sqrt(D); ``key_mask`` (B, Lk) bool keeps the True keys (per-sample text
    lengths); ``bias`` is an additive float term broadcastable to (B, H, Lq, Lk) (plain kernel only).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants (B, L, H, D) arrays, got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shapes do not agree: q{q.shape} k{k.shape} v{v.shape}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if key_mask is not None and key_mask.shape != (b, lk):
        raise ValueError(f"key_mask must be (B, Lk) = {(b, lk)}, got {key_mask.shape}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    choice = _CHOICE.get()
    impl = implementation or choice.implementation or _auto(q, key_mask, bias, lk)
    if bias is not None and impl != "xla":
        impl = "xla"  # additive biases only occur in short text encoders
    if impl == "xla":
        return _plain(q, k, v, scale, key_mask, bias)
    if impl == "cudnn":
        if key_mask is not None:
            return _blockwise(q, k, v, key_mask, scale, choice.block_q, choice.block_k)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if impl == "blockwise":
        if key_mask is None:
            key_mask = jnp.ones((b, lk), bool)
        return _blockwise(q, k, v, key_mask, scale, choice.block_q, choice.block_k)
    raise ValueError(f"unknown attention implementation {impl!r}; known: {IMPLEMENTATIONS}")


def _auto(q, key_mask, bias, lk) -> str:
    b, lq, h, d = q.shape
    if bias is not None or b * h * lq * lk <= PLAIN_MAX_SCORES:
        return "xla"
    on_gpu = jax.default_backend() == "gpu"
    if GPU_AUTO_CUDNN and on_gpu and key_mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128:
        return "cudnn"
    return "blockwise"


# ----------------------------------------------------------------------------------- plain formula


def _plain(q, k, v, scale, key_mask, bias):
    # (B, Lq, H, D) x (B, Lk, H, D) -> (B, H, Lq, Lk), float32 scores
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1)  # (B, H, Lq)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.where(denom > 0, denom, 1.0).transpose(0, 2, 1)[..., None]
    return out.astype(q.dtype)


# ------------------------------------------------------------------------------- blockwise (flash)


def _blocks(x, n, size, axis=1):
    """Pad ``axis`` to ``n * size`` and move the block index to the front: (..., L, ...) -> (n, ..., size, ...)."""
    pad = n * size - x.shape[axis]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    x = x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblocks(x, length, axis=1):
    """Inverse of :func:`_blocks`: (n, ..., size, ...) -> (..., length, ...)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _blockwise(q, k, v, key_mask, scale, block_q, block_k):
    bq, bk = min(block_q, q.shape[1]), min(block_k, k.shape[1])
    return _flash(q, k, v, key_mask, scale, bq, bk)


def _tied(buffer, anchor):
    """``buffer`` (a loop's initial accumulator, e.g. zeros) made to depend on ``anchor`` (the loop's input).

    A loop needs its own copy of a constant initial value; left free, XLA's scheduler may make those copies for
    every attention of a network at once, long before their loops run (DynamiCrafter-1024: ~14 GiB of zero
    buffers alive together). Tied to the loop's input, a copy cannot be made before that input exists.
    """
    return jax.lax.optimization_barrier((buffer, anchor))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, key_mask, scale, bq, bk):
    return _flash_forward(q, k, v, key_mask, scale, bq, bk)[0]


def _flash_forward(q, k, v, key_mask, scale, bq, bk):
    lq, lk = q.shape[1], k.shape[1]
    nq, nk = -(-lq // bq), -(-lk // bk)
    q_blocks = _blocks(q, nq, bq)  # (nq, B, bq, H, D)
    k_blocks, v_blocks = _blocks(k, nk, bk), _blocks(v, nk, bk)  # (nk, B, bk, H, D)
    m_blocks = _blocks(key_mask, nk, bk)  # (nk, B, bk); padded keys are False
    _, b, _, h, d = q_blocks.shape

    def one_query_block(qi):
        def key_step(carry, kv):
            m, l, acc = carry  # (B, H, bq), (B, H, bq), (B, bq, H, D)
            kj, vj, mj = kv
            s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mj[:, None, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            acc = acc * correction.transpose(0, 2, 1)[..., None] + pv
            return (m_new, l, acc), None

        init = (
            jnp.full((b, h, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, bq, h, d), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(key_step, init, (k_blocks, v_blocks, m_blocks))
        out = acc / jnp.where(l > 0, l, 1.0).transpose(0, 2, 1)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # (B, H, bq)
        return out.astype(q.dtype), lse

    def query_block(i, carry):
        out_blocks, lse_blocks = carry
        out, lse = one_query_block(q_blocks[i])
        return out_blocks.at[i].set(out), lse_blocks.at[i].set(lse)

    # the outputs are loop carries written block by block, their zeros tied to the input (see _tied)
    init = _tied((jnp.zeros(q_blocks.shape, q.dtype), jnp.zeros((nq, b, h, bq), jnp.float32)), q_blocks)
    out_blocks, lse_blocks = jax.lax.fori_loop(0, nq, query_block, init)
    out = _unblocks(out_blocks, lq)  # (B, Lq, H, D)
    lse = _unblocks(lse_blocks, lq, axis=2)  # (nq, B, H, bq) -> (B, H, Lq)
    return out, lse


def _flash_fwd(q, k, v, key_mask, scale, bq, bk):
    out, lse = _flash_forward(q, k, v, key_mask, scale, bq, bk)
    return out, (q, k, v, key_mask, out, lse)


def _flash_bwd(scale, bq, bk, residuals, g):
    q, k, v, key_mask, out, lse = residuals
    lq, lk = q.shape[1], k.shape[1]
    nq, nk = -(-lq // bq), -(-lk // bk)
    # D_i = sum_d dO * O, the row term of the softmax Jacobian: (B, Lq, H) -> (B, H, Lq)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    # rows whose keys are all masked have lse -inf and p = 0 everywhere
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    q_blocks, g_blocks = _blocks(q, nq, bq), _blocks(g, nq, bq)  # (nq, B, bq, H, D)
    lse_blocks, delta_blocks = _blocks(lse, nq, bq, axis=2), _blocks(delta, nq, bq, axis=2)  # (nq, B, H, bq)
    k_blocks, v_blocks = _blocks(k, nk, bk), _blocks(v, nk, bk)
    m_blocks = _blocks(key_mask, nk, bk)

    def key_block(j, carry):
        dq, dk_blocks, dv_blocks = carry
        kj, vj, mj = k_blocks[j], v_blocks[j], m_blocks[j]

        def query_block(i, inner):
            dq, dk, dv = inner
            qi, gi, lse_i, delta_i = q_blocks[i], g_blocks[i], lse_blocks[i], delta_blocks[i]
            s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
            p = jnp.where(mj[:, None, None, :], jnp.exp(s - lse_i[..., None]), 0.0)  # (B, H, bq, bk)
            dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p.astype(gi.dtype), gi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqhd,bkhd->bhqk", gi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = jnp.einsum("bhqk,bkhd->bqhd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
            return dq.at[i].add(dq_i), dk, dv

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, nq, query_block, (dq, zeros, zeros))
        return dq, dk_blocks.at[j].set(dk), dv_blocks.at[j].set(dv)

    # the gradients are loop carries, their zeros tied to the incoming cotangent (see _tied)
    init = _tied((jnp.zeros(q_blocks.shape, jnp.float32), jnp.zeros(k_blocks.shape, jnp.float32),
                  jnp.zeros(k_blocks.shape, jnp.float32)), g_blocks)
    dq, dk, dv = jax.lax.fori_loop(0, nk, key_block, init)
    dq = _unblocks(dq, lq).astype(q.dtype)
    dk, dv = _unblocks(dk, lk).astype(k.dtype), _unblocks(dv, lk).astype(v.dtype)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
