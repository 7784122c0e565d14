"""Resumable runs: orbax saves of the loop state guarded by a run fingerprint, and saves that Ctrl-C
cannot cut in half."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from anti_i2v_jax.attack.config import AttackConfig
from anti_i2v_jax.backbones.base import Backbone
from anti_i2v_jax.errors import UserError


@contextlib.contextmanager
def _interrupt_after():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: for work that must not be cut in
    half. Only the main thread can install signal handlers; elsewhere the block runs unguarded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


class _Checkpointer:
    """Orbax save/restore of the batched loop state and history, guarded by a run fingerprint.

    The folder is created by the first save, so a run that fails before it leaves nothing behind.
    """

    def __init__(self, directory: Path, fingerprint: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = directory.absolute()
        self.fingerprint = fingerprint
        self._manager = None

    def _open(self):
        if self._manager is None:
            ocp = self._ocp
            # cleanup_tmp_directories: a save cut short by a crash leaves a *.orbax-checkpoint-tmp folder; drop it
            # Each process checkpoints its own images: a save involves this process alone (by default orbax
            # synchronises every process of a multi-process run at each save, and processes whose shards differ
            # in size would wait for one another forever).
            extra = {}
            if jax.process_count() > 1:
                me = jax.process_index()
                extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"anti_i2v_p{me}")
            self.directory.mkdir(parents=True, exist_ok=True)  # orbax will not create it for one process alone
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=False, cleanup_tmp_directories=True,
                                                     **extra),
            )
        return self._manager

    def restore(self) -> tuple[dict, np.ndarray] | None:
        if not self.directory.is_dir():
            return None
        manager = self._open()
        step = manager.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
        if restored["meta"].get("fingerprint") != self.fingerprint:
            raise UserError(
                f"checkpoint {self.directory} belongs to a different run (other image, backbone or "
                f"settings); delete it or choose another --out folder"
            )
        state = jax.tree.map(np.asarray, dict(restored["state"]["state"]))
        return state, np.asarray(restored["state"]["history"])

    def save(self, step: int, state: dict, history: np.ndarray) -> None:
        """Save and wait; Ctrl-C during the save takes effect once it is complete (never a half-written one)."""
        ocp = self._ocp
        manager = self._open()
        with _interrupt_after():
            manager.save(
                step,
                args=ocp.args.Composite(
                    # host numpy: orbax refuses device arrays that are not global in a multi-process run
                    state=ocp.args.StandardSave({"state": jax.tree.map(np.asarray, state), "history": history}),
                    meta=ocp.args.JsonSave({"fingerprint": self.fingerprint, "step": step}),
                ),
            )
            manager.wait_until_finished()

    def remove(self) -> None:
        if self._manager is not None:
            self._manager.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _fingerprint(backbone: Backbone, config: AttackConfig, *arrays: np.ndarray, prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    geometry = getattr(backbone, "geometry", None)  # another geometry or precision is another run
    run = [backbone.name, config.to_dict(), list(prompts), None if geometry is None else dataclasses.asdict(geometry),
           getattr(backbone, "precision", None)]
    lpips = getattr(backbone, "lpips", None)
    if lpips is not None:  # other LPIPS weights are another run (runs without LPIPS keep their old fingerprint)
        run.append(["lpips", lpips.source])
    clip = getattr(backbone, "clip", None)
    if clip is not None:  # likewise an attached CLIP image encoder
        run.append(["clip", clip.source])
    h.update(json.dumps(run, sort_keys=True).encode())
    reference = getattr(backbone, "reference_latents", None)  # another reference video is another run
    for a in (*arrays, *([] if reference is None else [np.asarray(reference)])):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
