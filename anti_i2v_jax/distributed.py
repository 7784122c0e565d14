"""Several processes (hosts), each protecting its own share of the images with its own devices.

Protection is independent per image, so a multi-process run needs no cross-process program: every process
takes every P-th image (:func:`shard`), runs it on its local devices exactly as a single-process run would (so
the bytes are the same), and checkpoints and writes its own outputs. JAX's multi-process runtime is started
from the usual environment variables, as ``jax.distributed.initialize`` takes them:

    JAX_COORDINATOR_ADDRESS=host:port  JAX_NUM_PROCESSES=P  JAX_PROCESS_ID=p

(or, with none set and ``required``, JAX's own cluster detection: SLURM, Open MPI, TPU pods, ...).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

from anti_i2v_jax.errors import UserError

T = TypeVar("T")
ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# A process that finishes its share early waits this long at shutdown for the others (JAX's default, 5 minutes,
# would abort a process whose share takes longer).
SHUTDOWN_TIMEOUT_S = 7 * 24 * 3600


def initialize(required: bool = False) -> tuple[int, int]:
    """Start JAX's multi-process runtime when the environment asks for it (or ``required``); returns
    (process index, process count): (0, 1) for a plain single-process run. Call before any JAX computation."""
    import jax

    given = {k: os.environ.get(k) for k in ENV}
    if not any(given.values()) and not required:
        return 0, 1
    kwargs = {}
    if any(given.values()):
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise UserError(f"a multi-process run needs {', '.join(ENV)}; {', '.join(missing)} not set")
        try:
            kwargs = dict(coordinator_address=given["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(given["JAX_NUM_PROCESSES"]), process_id=int(given["JAX_PROCESS_ID"]))
        except ValueError:
            raise UserError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
            raise UserError(f"JAX_PROCESS_ID {kwargs['process_id']} is not in [0, {kwargs['num_processes']})")
    jax.distributed.initialize(**kwargs, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    return jax.process_index(), jax.process_count()


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """This process's share of ``items``: every ``count``-th one, from ``index`` (sort ``items`` first, so every
    process agrees on the split)."""
    return list(items[index::count])
