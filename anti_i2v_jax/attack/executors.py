"""How the per-image chunk runs over several images: one by one, dispatched to each device, or one
N-device program (``jax.shard_map`` on a mesh, ``jax.pmap``); and several images per device (``per_device``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from anti_i2v_jax.errors import UserError

Mode = Literal["sequential", "dispatch", "shard_map", "pmap"]
MODES: tuple[str, ...] = ("sequential", "dispatch", "shard_map", "pmap")
Batching = Literal["map", "vmap"]
BATCHINGS: tuple[str, ...] = ("map", "vmap")


def _on_one_device(chunk: Callable, batching: Batching) -> Callable:
    """``chunk`` over a leading axis of several images inside one device program.

    ``map`` (``lax.map``) runs the one-image computation once per image: an image's bytes equal its run alone,
    and the device is no busier than with one image (one dispatch per chunk instead of K). ``vmap`` batches the
    images into one computation, which fills a large device, but XLA then orders some reductions differently:
    on DynamiCrafter's anti-i2v objective a few gradient signs flip and the bytes differ from a run alone
    (equal on the other tiny backbones and on AdvDM, measured).
    """
    if batching == "vmap":
        return jax.vmap(chunk, in_axes=(None, 0, None, 0, 0))
    if batching != "map":
        raise UserError(f"unknown batching {batching!r}; use one of {', '.join(BATCHINGS)}")

    def mapped(params, x0, target, text, state):
        return jax.lax.map(lambda a: chunk(params, a[0], target, a[1], a[2]), (x0, text, state))

    return mapped


def _executor(chunk: Callable, mode: Mode, n_devices: int, per_device: int = 1, batching: Batching = "map") -> Callable:
    """Map the per-image ``chunk`` over a leading image axis of ``(x0, text, state)``; with ``per_device`` K > 1,
    consecutive groups of K images share a device (``dispatch``: device i takes images iK..iK+K-1;
    ``sequential``: one device, K at a time), batched by ``batching`` (see :func:`_on_one_device`).

    ``dispatch`` runs the one-image program (the very program of a run alone) on each device, asynchronously,
    so an image's bytes never depend on the device count. ``shard_map`` and ``pmap`` build one N-device program;
    XLA optimises it differently from the one-device program (measured on opensora-tiny: gradients differ by
    ~1e-8, enough to flip a few signs), so their bytes may differ from a run alone by a few levels.
    """
    if per_device > 1:
        return _grouped(_on_one_device(chunk, batching), mode, n_devices, per_device)
    if mode == "dispatch":
        one = jax.jit(chunk)
        devices = jax.local_devices()[:n_devices]  # this process's own (all of them when it runs alone)
        placed: dict[str, Any] = {}

        def run(params, x0, target, text, state):
            if placed.get("of") is not params:  # the weights go to each device once, not at every chunk
                placed.update(of=params, copies=[jax.device_put(params, d) for d in devices])
            outs = [  # dispatch is asynchronous: the devices run concurrently
                one(placed["copies"][i], *jax.device_put((x0[i], target, _index(text, i), _index(state, i)), devices[i]))
                for i in range(x0.shape[0])
            ]
            return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(outs))

        return run
    if mode == "sequential":
        one = jax.jit(chunk)

        def run(params, x0, target, text, state):
            outs = [
                one(params, x0[i], target, _index(text, i), _index(state, i)) for i in range(x0.shape[0])
            ]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        return run
    if mode in ("pmap", "shard_map") and jax.process_count() > 1:
        raise UserError(f"mode {mode!r} builds one program over this process's devices; with "
                        f"{jax.process_count()} processes use 'dispatch'")
    if mode == "pmap":
        return jax.pmap(chunk, in_axes=(None, 0, None, 0, 0), devices=jax.devices()[:n_devices])
    if mode == "shard_map":
        # Auto axes: jit places host arrays by the in_specs (Explicit axes would demand pre-sharded inputs).
        mesh = jax.make_mesh(
            (n_devices,), ("image",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n_devices]
        )

        def per_device(params, x0, target, text, state):
            # Each device holds a local batch of exactly one image: drop that axis and put it back.
            out = chunk(params, x0[0], target, _index(text, 0), _index(state, 0))
            return jax.tree.map(lambda a: a[None], out)

        return jax.jit(
            jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(P(), P("image"), P(), P("image"), P("image")),
                out_specs=P("image"),
                check_vma=False,
            )
        )
    raise UserError(f"unknown device mode {mode!r}; use one of {', '.join(MODES)}")


def _grouped(group_chunk: Callable, mode: Mode, n_devices: int, k: int) -> Callable:
    """Run ``group_chunk`` (a chunk over K images) on consecutive groups of K images: one group per device
    (``dispatch``) or all groups on the default device (``sequential``)."""
    if mode not in ("dispatch", "sequential"):
        raise UserError(f"several images per device run with mode 'dispatch' or 'sequential', not {mode!r}")
    one = jax.jit(group_chunk)
    devices = jax.local_devices()[:n_devices] if mode == "dispatch" else [jax.local_devices()[0]]
    placed: dict[str, Any] = {}

    def run(params, x0, target, text, state):
        if placed.get("of") is not params:
            placed.update(of=params, copies=[jax.device_put(params, d) for d in devices])
        outs = []
        for g, start in enumerate(range(0, x0.shape[0], k)):
            part = slice(start, start + k)
            d = g % len(devices)
            args = jax.device_put((x0[part], target, _slice(text, part), _slice(state, part)), devices[d])
            outs.append(one(placed["copies"][d], *args))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *jax.device_get(outs))

    return run


def _index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _slice(tree, part: slice):
    return jax.tree.map(lambda a: a[part], tree)
