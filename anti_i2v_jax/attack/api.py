"""The host side: ``Protector`` (chunks, progress, finiteness checks, checkpoints), ``protect`` and
``protect_batch``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax import dsp
from anti_i2v_jax.attack.checkpoints import _Checkpointer, _fingerprint
from anti_i2v_jax.attack.config import (
    AttackConfig,
    ProtectResult,
    _Layers,
    resolve_terms,
)
from anti_i2v_jax.attack.executors import BATCHINGS, Batching, Mode, _executor, _index
from anti_i2v_jax.attack.step import (
    DRAW,
    IDLE,
    STEP,
    _initial_state,
    _make_chunk_fn,
    _prepare_target,
)
from anti_i2v_jax.backbones.base import Backbone
from anti_i2v_jax.errors import NonFiniteError, UserError


class Protector:
    """A compiled protection run for one backbone and config; reuse it across images of the same size."""

    def __init__(self, backbone: Backbone, config: AttackConfig):
        self.backbone = backbone
        # The terms this backbone can compute; ``term_notes`` says what was left out and why.
        self.config, self.term_notes = resolve_terms(backbone, config)
        config = self.config
        _Layers.resolve(backbone, config)  # fail early on bad layer choices
        # On the device once (host arrays would be copied in at every chunk), and only what a step needs
        # when the backbone says so (``attack_params``, e.g. no VAE decoder).
        self._params = jax.device_put(getattr(backbone, "attack_params", backbone.params))
        self._compiled: dict[tuple, tuple[Callable, Callable]] = {}
        self._ran: set[tuple] = set()  # (size, mode, devices) already run once: compiled
        self._texts: dict[str, Any] = {}

    def _fns(self, image_size: tuple[int, int], mode: Mode, n_devices: int, per_device: int = 1,
             batching: Batching = "map"):
        key = (image_size, mode, n_devices, per_device, batching)
        if key not in self._compiled:
            chunk, terms_at = _make_chunk_fn(self.backbone, self.config, image_size)
            self._compiled[key] = (_executor(chunk, mode, n_devices, per_device, batching), jax.jit(terms_at))
        return self._compiled[key]

    def _text(self, prompt: str):
        if prompt not in self._texts:
            # the full parameters: a step's own (attack_params) may leave the text encoder out
            self._texts[prompt] = self.backbone.encode_text(self.backbone.params, prompt)
        return self._texts[prompt]

    def protect(
        self,
        images: Sequence[np.ndarray],
        *,
        prompts: Sequence[str] | None = None,
        target: np.ndarray | None = None,
        mode: Mode = "sequential",
        devices: int | None = None,
        per_device: int = 1,
        batching: Batching = "map",
        checkpoint_dir: str | Path | None = None,
        progress: bool = False,
        callback: Callable[[int, Mapping[str, np.ndarray]], None] | None = None,
    ) -> list[ProtectResult]:
        """Protect same-size uint8 ``(H, W, 3)`` images, ``per_device`` per device slot, in rounds of
        ``devices * per_device``. Several images per device are batched by ``batching``: ``map`` keeps each
        image's bytes equal to its run alone; ``vmap`` fills a large device but may differ by a few levels.

        ``callback(step, history)`` runs on the host after every chunk (history of the round so far,
        each ``(images, steps)``); raising from it stops the run, and a later call with the same
        ``checkpoint_dir`` resumes from the last save.
        """
        images = [check_image(im, self.backbone) for im in images]
        if not images:
            return []
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise UserError(f"images in one batch must share a size, got {sorted(shapes)}")
        prompts = list(prompts) if prompts is not None else [self.config.prompt] * len(images)
        if len(prompts) != len(images):
            raise UserError(f"got {len(prompts)} prompts for {len(images)} images")
        n_dev = 1 if mode == "sequential" else (devices or jax.local_device_count())
        if n_dev > jax.local_device_count():
            raise UserError(f"asked for {n_dev} devices but this process has {jax.local_device_count()}")
        if per_device < 1:
            raise UserError(f"per_device must be at least 1, got {per_device}")
        if batching not in BATCHINGS:
            raise UserError(f"unknown batching {batching!r}; use one of {', '.join(BATCHINGS)}")
        if per_device > 1 and mode not in ("dispatch", "sequential"):
            raise UserError(f"several images per device run with mode 'dispatch' or 'sequential', not {mode!r}")
        slots = n_dev * per_device
        h, w = images[0].shape[:2]
        target_img = _prepare_target(target, (h, w), self.config.target_seed)

        results: list[ProtectResult] = []
        for start in range(0, len(images), slots):
            batch = images[start : start + slots]
            ckpt = None
            if checkpoint_dir is not None:
                suffix = "" if len(images) <= slots else f"-{start // slots}"
                ckpt = _Checkpointer(
                    Path(str(checkpoint_dir) + suffix),
                    _fingerprint(self.backbone, self.config, target_img, *batch, prompts=prompts[start : start + slots]),
                )
            k = min(per_device, len(batch))
            layout = (mode, -(-len(batch) // k), k, batching if k > 1 else "map")
            results += self._run_round(batch, prompts[start : start + slots], target_img, layout, ckpt, progress,
                                       callback)
        return results

    def _run_round(self, images, prompts, target_img, layout, ckpt, progress, callback):
        config, names = self.config, self.config.term_names
        t_start = time.perf_counter()
        run, terms_at = self._fns(images[0].shape[:2], *layout)
        x0 = np.stack([im.astype(np.float32) / 255.0 for im in images])
        target = target_img.astype(np.float32) / 255.0
        text = jax.tree.map(lambda *xs: jnp.stack(xs), *[self._text(p) for p in prompts])
        params = self._params

        restored = ckpt.restore() if ckpt else None
        if restored is not None:
            state, history = restored
            # Saves written before the normalisation draws ran in the loop lack the draws' fields; every save is
            # past its draws.
            state.setdefault("draw", np.full(len(images), config.draws, np.int32))
            state.setdefault("acc", np.zeros((len(images), len(names)), np.float32))
        else:
            state = jax.tree.map(lambda *xs: np.stack(xs), *[_initial_state(config, x) for x in x0])
            history = np.zeros((len(images), 0, len(names) + 1), np.float32)
        resumed_from = int(np.asarray(state["step"])[0])

        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.steps,
            initial=resumed_from,
            disable=not progress,
            desc=f"protect x{len(images)} [{self.backbone.name}]",
            unit="step",
        )
        if progress and resumed_from:
            bar.write(f"resuming from step {resumed_from}")
        if progress and (images[0].shape[:2], layout) not in self._ran:
            bar.set_postfix_str("compiling...", refresh=True)  # the first chunk includes XLA's compile
        self._ran.add((images[0].shape[:2], layout))
        try:
            step = resumed_from
            while step < config.steps:
                prev_state = state
                state, record = run(params, x0, target, text, state)  # the state stays on device
                record = jax.tree.map(np.asarray, record)
                self._check_finite(record, step, prev_state, x0, target, text, terms_at)
                is_step = record["kind"][0] == STEP  # the images of a round move in step (draws, steps, idle)
                rows = np.concatenate([record["values"][:, is_step], record["total"][:, is_step, None]], axis=-1)
                history = np.concatenate([history, rows], axis=1)
                n = int(is_step.sum())
                step += n
                bar.set_postfix({k: f"{v:.4g}" for k, v in zip(names, history[0, -1])}, refresh=False)
                bar.update(n)  # draws the values of the chunk just finished
                crossed = step // config.checkpoint_every > (step - n) // config.checkpoint_every
                if ckpt and (crossed or step == config.steps):
                    ckpt.save(step, state, history)
                if callback is not None:
                    callback(step, _history_dict(names, history))
        finally:
            bar.close()
        seconds = time.perf_counter() - t_start
        out = []
        for i, im in enumerate(images):
            protected = dsp.quantize(x0[i] + np.asarray(state["delta"][i]), im, config.eps)
            hist = {k: v[i] for k, v in _history_dict(names, history).items()}
            out.append(ProtectResult(protected, hist, config.steps, seconds, resumed_from))
        if ckpt:
            ckpt.remove()
        return out

    def _check_finite(self, record, first_step, prev_state, x0, target, text, terms_at):
        names = self.config.term_names
        kind, values, total, grad_ok = record["kind"], record["values"], record["total"], record["grad_finite"]
        # A draw's gradient is never used; its values set the scales.
        bad = (kind != IDLE) & ~np.isfinite(values).all(-1) | (kind == STEP) & (~np.isfinite(total) | ~grad_ok)
        if not bad.any():
            return
        image, index = (int(a[0]) for a in np.nonzero(bad))
        where = f"image {image}, " if len(x0) > 1 else ""
        offset = int((kind[image, :index] == STEP).sum())  # steps of this chunk before the bad one
        if kind[image, index] == DRAW:
            draw = int(np.asarray(prev_state["draw"])[image]) + int((kind[image, :index] == DRAW).sum())
            where += f"normalisation draw {draw + 1} of {self.config.normalize_draws} at "
        step = first_step + offset
        for k, v in zip(names, values[image, index]):
            if not np.isfinite(v):
                raise NonFiniteError(f"{where}step {step}: loss term '{k}' is {v}; nothing was written")
        if not np.isfinite(total[image, index]):
            raise NonFiniteError(f"{where}step {step}: the weighted total is {total[image, index]}; nothing was written")
        # The gradient went non-finite with finite values: replay to that step and test each term alone.
        culprits = self._diagnose(prev_state, image, offset, x0, target, text, terms_at)
        raise NonFiniteError(
            f"{where}step {step}: the gradient is not finite (from term(s) {culprits or 'unknown'}); "
            f"nothing was written"
        )

    def _diagnose(self, prev_state, image, offset, x0, target, text, terms_at):
        params = self._params
        state = _index(prev_state, image)
        single = Protector(self.backbone, dataclasses.replace(self.config, chunk_size=1, checkpoint_every=1))
        run1, _ = single._fns(x0.shape[1:3], "sequential", 1)
        img_text = _index(text, image)
        for _ in range(offset):  # one step per call (after any pending draws, which move neither delta nor key)
            batched = jax.tree.map(lambda a: np.asarray(a)[None], state)
            state, _ = run1(params, x0[image][None], target, jax.tree.map(lambda a: a[None], img_text), batched)
            state = _index(jax.tree.map(np.asarray, state), 0)
        per_term = terms_at(params, x0[image], target, img_text, state)
        return [k for k, (_, ok) in per_term.items() if not bool(ok)]


def _history_dict(names: Sequence[str], history: np.ndarray) -> dict[str, np.ndarray]:
    return {k: history[..., i] for i, k in enumerate((*names, "total"))}


def check_image(image: np.ndarray, backbone: Backbone) -> np.ndarray:
    """``image`` if it is a uint8 RGB array large enough for ``backbone``; a UserError otherwise."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UserError(
            f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}; "
            f"load files with anti_i2v_jax.io.load_image"
        )
    if min(image.shape[:2]) < backbone.min_input_side:
        raise UserError(
            f"image of {image.shape[1]}x{image.shape[0]} is too small for {backbone.name}: "
            f"the shorter side must be at least {backbone.min_input_side} pixels"
        )
    return image


def protect(
    backbone: Backbone,
    image: np.ndarray,
    config: AttackConfig | None = None,
    *,
    prompt: str | None = None,
    target: np.ndarray | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    callback: Callable[[int, Mapping[str, np.ndarray]], None] | None = None,
) -> ProtectResult:
    """Protect one uint8 ``(H, W, 3)`` image; returns the protected uint8 image and the loss history."""
    config = config or AttackConfig()
    (result,) = Protector(backbone, config).protect(
        [image],
        prompts=None if prompt is None else [prompt],
        target=target,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        callback=callback,
    )
    return result


def protect_batch(
    backbone: Backbone,
    images: Sequence[np.ndarray],
    config: AttackConfig | None = None,
    *,
    mode: Mode = "dispatch",
    devices: int | None = None,
    per_device: int = 1,
    batching: Batching = "map",
    prompts: Sequence[str] | None = None,
    target: np.ndarray | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> list[ProtectResult]:
    """Protect same-size images data-parallel: ``shard_map`` on a mesh or ``pmap`` (one N-device program), or
    ``dispatch`` (the one-image program on each device: bytes equal to each image's run alone); with
    ``per_device`` K > 1 (dispatch or sequential), K images share each device (``batching``: ``map`` keeps the
    bytes of a run alone, ``vmap`` fills a large device)."""
    return Protector(backbone, config or AttackConfig()).protect(
        images,
        prompts=prompts,
        target=target,
        mode=mode,
        devices=devices,
        per_device=per_device,
        batching=batching,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )

