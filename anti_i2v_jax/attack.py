"""The protection loop: projected sign-gradient steps in the dual space, jitted, chunked, resumable.

One step (for one image):

1. draw the step's keys; the noisy latents, timestep and text are shared by every loss term;
2. ``jax.value_and_grad`` of the weighted objective w.r.t. the RGB perturbation ``delta`` only;
3. pull the RGB gradient back into this step's space (a*/b* of L*a*b*, low-frequency DCT, or RGB),
   take an optax sign step there and map the image back to RGB;
4. project onto ``||x_adv - x||_inf <= eps`` and [0, 1].

Steps run inside ``lax.scan`` chunks; between chunks the host reports progress, checks that every
loss term and the gradient stayed finite, and (with a checkpoint folder) saves the state with orbax.
Many images run data-parallel with one per-device function used through ``jax.shard_map`` or
``jax.pmap``; each image's run is exactly the run it would have alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from anti_i2v_jax import dsp, losses
from anti_i2v_jax.backbones.base import Backbone
from anti_i2v_jax.errors import AttackError, NonFiniteError, UserError
from anti_i2v_jax.target import procedural_texture

# Every loss term the engine knows, and what it measures. A term is computed only when weighted; a negative
# weight maximises it. Sums are rescaled to Stable Diffusion's 64x64x4 latent (losses.SD_LATENT_ELEMENTS).
TERMS: dict[str, str] = {
    "dm": "the backbone's diffusion loss at a sampled timestep (negative weight: maximised, as AdvDM)",
    "irc": "IRC: deep denoiser layers pulled onto the early layer",
    "ira": "IRA, denoiser: protected-branch taps vs target-image-branch taps (same z_t, t, text)",
    "ira_vae": "IRA, VAE encoder: taps of the protected image vs taps of the target image",
    "aux": "Anti-I2V auxiliary: 1 - cos of the CLIP image embeddings of the protected and the clean image "
    "(where the backbone has a CLIP image encoder)",
    "texture": "MIST texture loss: summed squared distance of the image latent to the target image's latent",
    "texture_mean": "the texture distance mean-reduced, as the authors' mist.py variant has it",
    "vgm_vae": "VGMShield: 1 - cos of the VAE latents of the protected and the reference image, each with fresh "
    "Gaussian noise (vgm_noise)",
    "vgm_clip": "VGMShield: 1 - cos of the CLIP image embeddings of the protected and the reference image",
    "sds": "SDS surrogate: the denoiser's eps-space residual pushed through the encoder only",
}

# Terms that need an optional part of the backbone, by the adapter attribute that provides it.
TERM_NEEDS: dict[str, str] = {"aux": "image_embedding", "vgm_clip": "image_embedding"}

# Objective presets. Anti-I2V: L_IRC + L_IRA + L_aux - L_DM with unit weights, each term normalised by its
# mean magnitude at the start. Every baseline keeps the paper's shared budget (16/255) and step count (200)
# and follows its original objective; METHOD_NOTES says what the original is and where this differs.
METHODS: dict[str, dict[str, Any]] = {
    "anti-i2v": dict(
        weights=(("irc", 1.0), ("ira", 1.0), ("ira_vae", 1.0), ("aux", -1.0), ("dm", -1.0)),
        schedule="alternate", normalize_terms=True, random_start=False,
    ),
    "advdm": dict(weights=(("dm", -1.0),), schedule="rgb", normalize_terms=False, random_start=True, vae_sample=True),
    "mist": dict(
        weights=(("texture", 1.0), ("dm", -1.0e4)),
        schedule="rgb", normalize_terms=False, random_start=True, vae_sample=True,
    ),
    "mist-vaijsc": dict(
        weights=(("texture_mean", 1.0), ("dm", -1.0e4)),
        schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True,
    ),
    "vgmshield": dict(
        weights=(("vgm_vae", -1.0), ("vgm_clip", -1.0)),
        schedule="rgb", normalize_terms=False, random_start=False, vgm_directed=False,
    ),
    "vgmshield-directed": dict(
        weights=(("vgm_vae", 1.0), ("vgm_clip", 1.0)),
        schedule="rgb", normalize_terms=False, random_start=False, vgm_directed=True,
    ),
    "sds": dict(weights=(("sds", 1.0),), schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True),
    "sds+": dict(weights=(("sds", -1.0),), schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True),
    "sdst": dict(
        weights=(("sds", 5.0), ("texture", 1.0)),
        schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True,
    ),
    "photoguard": dict(weights=(("texture", 1.0),), schedule="rgb", normalize_terms=False, random_start=True),
}

# One line per preset for --help and reports: the original and each deliberate deviation (README: "Methods").
METHOD_NOTES: dict[str, str] = {
    "anti-i2v": "IRC + IRA (denoiser and VAE) + auxiliary CLIP distance - diffusion loss, dual-space steps",
    "advdm": "AdvDM (Liang et al. 2023): sign ascent on the diffusion loss, random start, sampled VAE posterior",
    "mist": "MIST (psyker-team/mist): summed texture loss to the target minus 1e4 x the diffusion loss",
    "mist-vaijsc": "the Anti-I2V authors' MIST variant: mean texture loss, so it behaves like AdvDM",
    "vgmshield": "VGMShield undirected (MMVGM): ascend 1 - cos to the clean image's noisy VAE latent and CLIP "
    "embedding",
    "vgmshield-directed": "VGMShield directed (MMVGM): descend 1 - cos to the target image's VAE latent and CLIP "
    "embedding",
    "sds": "SDS(-) (Xue et al. 2024): descend along the encoder Jacobian of eps_hat - eps (the recommended variant)",
    "sds+": "SDS(+): ascend along the encoder Jacobian of eps_hat - eps",
    "sdst": "SDS(-) with a texture target (Diff-Protect using_target, rate 5)",
    "photoguard": "PhotoGuard encoder attack (Salman et al. 2023): pull the image latent onto the target's",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """Every setting of a protection run; the paper's unknowns are documented defaults (docs/method.md, section 3).

    Budgets and steps are on the [0, 1] image scale. Layer choices of ``None`` take the backbone's defaults.
    """

    method: str = "anti-i2v"
    eps: float = 16.0 / 255.0  # project page: 16/255, 200 iterations
    steps: int = 200
    schedule: str = "alternate"  # even steps L*a*b*, odd steps DCT; or "lab", "dct", "rgb", "lab,dct,dct"
    step_rgb: float = 1.0 / 255.0  # RGB sign step (baselines)
    step_lab: float = 0.5  # a*/b* sign step, in L*a*b* units
    step_dct: float = 1.0 / 255.0  # RMS RGB change of one DCT sign step (scaled per coefficient by dsp.dct_step_scale)
    dct_fraction: float = 0.25  # low band: u < H/4 and v < W/4
    dct_block: int | None = None  # None: one global DCT; e.g. 8 for JPEG-style tiles
    weights: tuple[tuple[str, float], ...] = METHODS["anti-i2v"]["weights"]
    normalize_terms: bool = True  # divide each term by its mean |value| over normalize_draws draws at the start
    normalize_draws: int = 4  # (t, eps, posterior) draws that set the normalisation; seeded by `seed`
    random_start: bool = False
    irc_early: int | None = None
    irc_deep: tuple[int, ...] | None = None
    ira_layers: tuple[int, ...] | None = None
    vae_layers: tuple[str, ...] | None = None
    vae_sample: bool = False  # sample the VAE posterior each step instead of using its mean (where the backbone supports it)
    vgm_noise: float = 0.02  # VGMShield's Gaussian noise std on both VAE branches, on the [-1, 1] scale (MMVGM)
    vgm_directed: bool = False  # VGMShield terms measured against the target image (directed) or the clean one
    target_seed: int = 0  # seed of the procedural IRA/MIST target texture (when no target image is given)
    prompt: str = "a video"  # used when no per-image prompt is given; a caption of the image is better
    seed: int = 0
    chunk_size: int = 10  # steps per jitted lax.scan chunk (progress, finiteness checks, checkpoints)
    checkpoint_every: int = 50  # a save at the first chunk end at or past each multiple of this (with a folder)

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.eps <= 1.0:
            problems.append(f"eps must be in (0, 1] on the [0, 1] scale, got {self.eps}")
        if self.steps < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        unknown = [name for name, _ in self.weights if name not in TERMS]
        if unknown:
            problems.append(f"unknown loss terms {unknown}; known: {sorted(TERMS)}")
        if not self.weights or all(w == 0 for _, w in self.weights):
            problems.append("weights: at least one loss term needs a non-zero weight")
        if self.normalize_draws < 1:
            problems.append(f"normalize_draws must be >= 1, got {self.normalize_draws}")
        if self.vgm_noise < 0:
            problems.append(f"vgm_noise must be >= 0, got {self.vgm_noise}")
        if self.dct_block is not None and self.dct_block < 1:
            problems.append(f"dct_block must be >= 1 or None, got {self.dct_block}")
        if not 0.0 < self.dct_fraction <= 1.0:
            problems.append(f"dct_fraction must be in (0, 1], got {self.dct_fraction}")
        try:
            dsp.schedule_spaces(self.schedule)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise UserError("invalid settings: " + "; ".join(problems))

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> AttackConfig:
        """The preset of ``method`` (one of :data:`METHODS`) with overrides."""
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}; known: {sorted(METHODS)}")
        return cls(**{"method": method, **METHODS[method], **overrides})

    @property
    def term_names(self) -> tuple[str, ...]:
        """The loss terms this run computes and records, in a fixed order."""
        return tuple(name for name, w in self.weights if w != 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (for reports and checkpoint fingerprints)."""
        d = dataclasses.asdict(self)
        d["weights"] = dict(self.weights)
        return d


@dataclasses.dataclass(frozen=True)
class ProtectResult:
    """The protected image (uint8, the input's size) and the per-step history of every loss term."""

    image: np.ndarray
    history: dict[str, np.ndarray]  # term -> (steps,) raw values; "total" -> the weighted objective
    steps: int
    seconds: float
    resumed_from: int = 0


@dataclasses.dataclass(frozen=True)
class _Layers:
    irc_early: int
    irc_deep: tuple[int, ...]
    ira: tuple[int, ...]
    vae: tuple[str, ...]

    @classmethod
    def resolve(cls, backbone: Backbone, config: AttackConfig) -> _Layers:
        d = backbone.layers
        pick = lambda value, default: default if value is None else value  # noqa: E731
        layers = cls(
            irc_early=pick(config.irc_early, d.irc_early),
            irc_deep=tuple(pick(config.irc_deep, d.irc_deep)),
            ira=tuple(pick(config.ira_layers, d.ira_layers)),
            vae=tuple(pick(config.vae_layers, d.vae_layers)),
        )
        bad = [i for i in (layers.irc_early, *layers.irc_deep, *layers.ira) if not 0 <= i < d.num_layers]
        if bad:
            raise UserError(
                f"layers {bad} are out of range for {backbone.name} (blocks 0..{d.num_layers - 1})"
            )
        return layers


def _lacks(backbone: Backbone, term: str) -> bool:
    """Whether ``term`` needs an optional adapter part (``TERM_NEEDS``) that ``backbone`` does not have."""
    return term in TERM_NEEDS and not hasattr(backbone, TERM_NEEDS[term])


def uses_target(config: AttackConfig) -> bool:
    """Whether the run's terms read the target image (IRA, the texture terms, directed VGMShield)."""
    names = set(config.term_names)
    return bool({"ira", "ira_vae", "texture", "texture_mean"} & names) or (
        config.vgm_directed and bool({"vgm_vae", "vgm_clip"} & names))


def resolve_terms(backbone: Backbone, config: AttackConfig) -> tuple[AttackConfig, dict[str, str]]:
    """``config`` with the terms ``backbone`` cannot compute removed, and a note for each term left out or cut.

    A term needing an optional part of the backbone (``TERM_NEEDS``: a CLIP image encoder) is off when the
    adapter lacks it; the note says so, and reports record it. LPIPS-VGG is not available in this version, so
    ``aux`` is its CLIP half only.
    """
    keep, notes = [], {}
    for name, w in config.weights:
        if w != 0 and _lacks(backbone, name):
            notes[name] = f"off: {backbone.name} has no CLIP image encoder"
            continue
        keep.append((name, w))
    if "aux" in dict(keep):
        notes["aux"] = "CLIP image distance only (LPIPS-VGG is not available in this version)"
    if not any(w != 0 for _, w in keep):
        raise UserError(
            f"method {config.method!r} has no term {backbone.name} can compute ({'; '.join(notes.values())}); "
            f"choose another method or backbone"
        )
    return dataclasses.replace(config, weights=tuple(keep)), notes


# ------------------------------------------------------------------------------------ the step


def _make_chunk_fn(backbone: Backbone, config: AttackConfig, image_size: tuple[int, int]):
    """The per-image, per-device function: ``chunk(params, x0, target, text, state) -> (state, records)``."""
    names = config.term_names
    weights = dict(config.weights)
    layers = _Layers.resolve(backbone, config)
    spaces = dsp.schedule_spaces(config.schedule)
    space_list = sorted(set(spaces), key=dsp.SPACES.index)
    space_of_step = jnp.asarray([space_list.index(s) for s in spaces], jnp.int32)
    step_size = {
        "rgb": config.step_rgb,
        "lab": config.step_lab,
        "dct": config.step_dct * dsp.dct_step_scale(image_size, config.dct_fraction, config.dct_block),
    }
    # The optax transformation of each space: the sign of the gradient, scaled; descent on the objective.
    optimizers = {s: optax.chain(optax.scale_by_sign(), optax.scale(-step_size[s])) for s in space_list}

    missing = [f"{k} (needs {TERM_NEEDS[k]})" for k in names if _lacks(backbone, k)]
    if missing:
        raise UserError(f"{backbone.name} cannot compute the terms {missing}; see resolve_terms")
    need_denoiser = bool({"dm", "irc", "ira", "sds"} & set(names))
    denoiser_taps = tuple(
        sorted(
            ({layers.irc_early, *layers.irc_deep} if "irc" in names else set())
            | (set(layers.ira) if "ira" in names else set())
        )
    )
    latent_terms = {"texture", "texture_mean"}
    vae_taps = tuple(
        dict.fromkeys((layers.vae if "ira_vae" in names else ()) + (("latent",) if latent_terms & set(names) else ()))
    )
    vgm_on_target = config.vgm_directed and bool({"vgm_vae", "vgm_clip"} & set(names))
    need_target = uses_target(config)
    need_clip = bool({"aux", "vgm_clip"} & set(names))
    noise_std = config.vgm_noise / 2.0  # [-1, 1] scale -> [0, 1] scale

    def anchors(params, x0, target):
        """Features of the target and clean images: constants of the objective."""
        anchor = {}
        if need_target:  # posterior means (key None): the anchors are fixed for the whole run
            anchor["target_cond"], anchor["target_vae"] = backbone.condition(
                params, target, None, vae_layers=vae_taps
            )
        if need_clip:
            anchor["clip_clean"] = backbone.image_embedding(params, x0)
            if vgm_on_target:
                anchor["clip_target"] = backbone.image_embedding(params, target)
        return jax.lax.stop_gradient(anchor)

    def noisy_latent(params, x, key):
        _, taps = backbone.condition(params, x + noise_std * jax.random.normal(key, x.shape), None,
                                     vae_layers=("latent",))
        return taps["latent"]

    def loss_terms(params, x0, delta, key, text, anchor, target) -> dict[str, jax.Array]:
        k_vae, k_noise = jax.random.split(key)
        x_adv = x0 + delta
        cond, vae = backbone.condition(params, x_adv, k_vae if config.vae_sample else None, vae_layers=vae_taps)
        terms: dict[str, jax.Array] = {}
        if need_denoiser:
            noisy = backbone.add_noise(params, cond, k_noise)
            pred, taps = backbone.denoise(params, noisy, cond, text, taps=denoiser_taps)
            if "dm" in names:
                terms["dm"] = backbone.diffusion_loss(pred, noisy)
            if "irc" in names:
                terms["irc"] = losses.irc_loss(taps, layers.irc_early, layers.irc_deep)
            if "ira" in names:
                # The target branch is a constant of the objective: stopping the gradient at its inputs (not
                # only at its taps) keeps JAX from linearising a whole second denoiser pass and XLA from
                # holding its activations for a backward pass that never uses them.
                _, target_taps = backbone.denoise(
                    params, jax.lax.stop_gradient(noisy), anchor["target_cond"], text, taps=layers.ira
                )
                terms["ira"] = losses.ira_loss(taps, jax.lax.stop_gradient(target_taps), layers.ira)
            if "sds" in names:
                terms["sds"] = losses.sds_surrogate(backbone.eps_residual(pred, noisy), noisy.x0)
        if "ira_vae" in names:
            terms["ira_vae"] = losses.ira_loss(vae, anchor["target_vae"], layers.vae)
        if "texture" in names:
            terms["texture"] = losses.texture_sum(vae["latent"], anchor["target_vae"]["latent"])
        if "texture_mean" in names:
            terms["texture_mean"] = losses.mean_squared(vae["latent"], anchor["target_vae"]["latent"])
        if need_clip:
            emb = backbone.image_embedding(params, x_adv)
            if "aux" in names:
                terms["aux"] = losses.cosine_distance(emb, anchor["clip_clean"])
            if "vgm_clip" in names:
                terms["vgm_clip"] = losses.cosine_distance(
                    emb, anchor["clip_target" if config.vgm_directed else "clip_clean"]
                )
        if "vgm_vae" in names:
            # Fresh noise on both branches each step (MMVGM); the reference branch is a constant.
            k_mine, k_ref = jax.random.split(jax.random.fold_in(key, 7))
            reference = target if config.vgm_directed else x0
            ref_latent = jax.lax.stop_gradient(noisy_latent(params, reference, k_ref))
            terms["vgm_vae"] = losses.cosine_distance(noisy_latent(params, x_adv, k_mine), ref_latent)
        return {k: terms[k].astype(jnp.float32) for k in names}

    w = jnp.asarray([weights[k] for k in names], jnp.float32)

    def objective(delta, params, x0, key, text, anchor, target, scale):
        terms = loss_terms(params, x0, delta, key, text, anchor, target)
        values = jnp.stack([terms[k] for k in names])
        return jnp.sum(w * values / scale), values

    def initial_scale(params, x0, delta, text, anchor, target, key):
        """Mean |value| of each term over ``normalize_draws`` draws at the start (never zero); ``key`` is the
        run's step-0 key, so the draws follow the seed."""
        keys = jax.random.split(jax.random.fold_in(key, 2), config.normalize_draws)
        def one(k):
            terms = loss_terms(params, x0, delta, k, text, anchor, target)
            return jnp.stack([terms[name] for name in names])

        draws = jax.lax.map(one, keys)
        return jnp.maximum(jnp.mean(jnp.abs(jax.lax.stop_gradient(draws)), axis=0), 1e-12)

    def space_update(space, x_adv, grad):
        opt = optimizers[space]
        direction = lambda g: opt.update(g, opt.init(g))[0]  # noqa: E731  (stateless: sign, scale)
        return dsp.space_step(
            space, x_adv, grad, direction, dct_fraction=config.dct_fraction, dct_block=config.dct_block
        )

    branches = [functools.partial(space_update, s) for s in space_list]

    def step(params, x0, target, text, anchor, state):
        key, step_key = jax.random.split(state["key"])
        (total, values), grad = jax.value_and_grad(objective, has_aux=True)(
            state["delta"], params, x0, step_key, text, anchor, target, state["scale"]
        )
        x_adv = x0 + state["delta"]
        space = space_of_step[state["step"] % len(spaces)]
        x_next = jax.lax.switch(space, branches, x_adv, grad)
        new_state = dict(
            delta=dsp.project(x_next, x0, config.eps) - x0,
            step=state["step"] + 1,
            key=key,
            scale=state["scale"],
        )
        record = dict(values=values, total=total, grad_finite=jnp.all(jnp.isfinite(grad)))
        return new_state, record

    def chunk(params, x0, target, text, state):
        anchor = anchors(params, x0, target)
        if config.normalize_terms:
            scale = jax.lax.cond(
                state["step"] == 0,
                lambda: initial_scale(params, x0, state["delta"], text, anchor, target, state["key"]),
                lambda: state["scale"],
            )
            state = dict(state, scale=scale)

        def body(state, _):
            # Steps past the end of the run are no-ops, so every chunk has the same length (one compile).
            active = state["step"] < config.steps
            return jax.lax.cond(
                active,
                lambda s: step(params, x0, target, text, anchor, s),
                lambda s: (s, _empty_record(len(names))),
                state,
            )

        return jax.lax.scan(body, state, None, length=config.chunk_size)

    def terms_at(params, x0, target, text, state):
        """Per-term values and gradient finiteness at ``state`` (only used to explain a failure)."""
        anchor = anchors(params, x0, target)
        _, step_key = jax.random.split(state["key"])
        out = {}
        for k in names:
            value, grad = jax.value_and_grad(
                lambda d: loss_terms(params, x0, d, step_key, text, anchor, target)[k]
            )(state["delta"])
            out[k] = (value, jnp.all(jnp.isfinite(grad)))
        return out

    return chunk, terms_at


def _empty_record(n_terms: int) -> dict[str, jax.Array]:
    return dict(
        values=jnp.full((n_terms,), jnp.nan, jnp.float32),
        total=jnp.asarray(jnp.nan, jnp.float32),
        grad_finite=jnp.asarray(True),
    )


def _initial_state(config: AttackConfig, x0: np.ndarray) -> dict[str, np.ndarray]:
    """The loop state of a run seeded by ``config.seed`` (on the host)."""
    return jax.tree.map(np.asarray, _state_from_key(config, jnp.asarray(x0), jax.random.PRNGKey(config.seed)))


def _state_from_key(config: AttackConfig, x0: jax.Array, root: jax.Array) -> dict[str, jax.Array]:
    """The loop state at step 0 from a PRNG key (traceable): the random start inside the budget, the step
    counter, the key of the timestep/noise draws and the term scales (set at step 0 when normalising)."""
    delta = jnp.zeros_like(x0)
    if config.random_start:
        noise = jax.random.uniform(jax.random.fold_in(root, 1), x0.shape, minval=-config.eps, maxval=config.eps)
        delta = dsp.project(x0 + noise, x0, config.eps) - x0
    return dict(
        delta=delta.astype(jnp.float32),
        step=jnp.asarray(0, jnp.int32),
        key=jax.random.fold_in(root, 0),
        scale=jnp.ones((len(config.term_names),), jnp.float32),
    )


def make_protect_fn(backbone: Backbone, config: AttackConfig | None = None, *,
                    image_size: tuple[int, int]) -> Callable:
    """Protection as a pure function of arrays, for use inside your own ``jax.jit``, ``vmap`` or mesh.

    Returns ``fn(params, image, key, text, target=None) -> (protected, history)`` for one image of
    ``image_size``: ``params`` the backbone's step parameters (``backbone.attack_params`` where it has them,
    else ``backbone.params``), ``image`` float32 ``(H, W, 3)`` in [0, 1], ``key`` a PRNG key (the random
    start, timesteps and noise; ``jax.random.PRNGKey(config.seed)`` reproduces ``protect``), ``text`` the
    backbone's ``encode_text(backbone.params, prompt)`` (computed once, on the host), ``target`` float32
    ``(H, W, 3)`` in [0, 1] for methods that use one (default: the seeded procedural texture). ``protected``
    is float32 ``(H, W, 3)`` inside the L-inf budget; ``anti_i2v_jax.dsp.quantize`` rounds it to uint8
    within the budget. ``history`` maps each term and ``"total"`` to its value at every step ``(steps,)``.
    No host callbacks, no checkpoints and no finiteness checks: ``Protector`` adds those between chunks.
    All steps run in one ``lax.scan``, a different XLA program from ``Protector``'s chunks, so the two agree
    to float rounding: the loss histories to ~1e-6, the saved pixels but for one on a half level now and then.
    """
    config, _ = resolve_terms(backbone, config or AttackConfig())
    chunk, _ = _make_chunk_fn(backbone, dataclasses.replace(config, chunk_size=config.steps), image_size)
    default_target = _prepare_target(None, image_size, config.target_seed).astype(np.float32) / 255.0

    def fn(params, image, key, text, target=None):
        x0 = jnp.asarray(image, jnp.float32)
        if x0.shape != (*image_size, 3):
            raise UserError(f"make_protect_fn was built for images of {image_size}, got {x0.shape}")
        tgt = jnp.asarray(default_target if target is None else target, jnp.float32)
        state, record = chunk(params, x0, tgt, text, _state_from_key(config, x0, key))
        history = {k: record["values"][:, i] for i, k in enumerate(config.term_names)}
        history["total"] = record["total"]
        return x0 + state["delta"], history

    return fn


# ------------------------------------------------------------------------------- devices


Mode = Literal["sequential", "dispatch", "shard_map", "pmap"]
MODES: tuple[str, ...] = ("sequential", "dispatch", "shard_map", "pmap")


def _executor(chunk: Callable, mode: Mode, n_devices: int) -> Callable:
    """Map the per-image ``chunk`` over a leading image axis of ``(x0, text, state)``.

    ``dispatch`` runs the one-image program (the very program of a run alone) on each device, asynchronously,
    so an image's bytes never depend on the device count. ``shard_map`` and ``pmap`` build one N-device program;
    XLA optimises it differently from the one-device program (measured on opensora-tiny: gradients differ by
    ~1e-8, enough to flip a few signs), so their bytes may differ from a run alone by a few levels.
    """
    if mode == "dispatch":
        one = jax.jit(chunk)
        devices = jax.devices()[:n_devices]
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


def _index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


# ------------------------------------------------------------------------------- checkpoints


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
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True),
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
                    state=ocp.args.StandardSave({"state": state, "history": history}),
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
    h.update(json.dumps(run, sort_keys=True).encode())
    reference = getattr(backbone, "reference_latents", None)  # another reference video is another run
    for a in (*arrays, *([] if reference is None else [np.asarray(reference)])):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- public API


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

    def _fns(self, image_size: tuple[int, int], mode: Mode, n_devices: int):
        key = (image_size, mode, n_devices)
        if key not in self._compiled:
            chunk, terms_at = _make_chunk_fn(self.backbone, self.config, image_size)
            self._compiled[key] = (_executor(chunk, mode, n_devices), jax.jit(terms_at))
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
        checkpoint_dir: str | Path | None = None,
        progress: bool = False,
        callback: Callable[[int, Mapping[str, np.ndarray]], None] | None = None,
    ) -> list[ProtectResult]:
        """Protect same-size uint8 ``(H, W, 3)`` images, one per device slot, in rounds of ``devices``.

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
        n_dev = 1 if mode == "sequential" else (devices or jax.device_count())
        if n_dev > jax.device_count():
            raise UserError(f"asked for {n_dev} devices but JAX sees {jax.device_count()}")
        h, w = images[0].shape[:2]
        target_img = _prepare_target(target, (h, w), self.config.target_seed)

        results: list[ProtectResult] = []
        for start in range(0, len(images), n_dev):
            batch = images[start : start + n_dev]
            ckpt = None
            if checkpoint_dir is not None:
                suffix = "" if len(images) <= n_dev else f"-{start // n_dev}"
                ckpt = _Checkpointer(
                    Path(str(checkpoint_dir) + suffix),
                    _fingerprint(self.backbone, self.config, target_img, *batch, prompts=prompts[start : start + n_dev]),
                )
            results += self._run_round(
                batch, prompts[start : start + n_dev], target_img, mode, len(batch), ckpt, progress, callback
            )
        return results

    def _run_round(self, images, prompts, target_img, mode, n_dev, ckpt, progress, callback):
        config, names = self.config, self.config.term_names
        t_start = time.perf_counter()
        run, terms_at = self._fns(images[0].shape[:2], mode, n_dev)
        x0 = np.stack([im.astype(np.float32) / 255.0 for im in images])
        target = target_img.astype(np.float32) / 255.0
        text = jax.tree.map(lambda *xs: jnp.stack(xs), *[self._text(p) for p in prompts])
        params = self._params

        restored = ckpt.restore() if ckpt else None
        if restored is not None:
            state, history = restored
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
        if progress and (images[0].shape[:2], mode, n_dev) not in self._ran:
            bar.set_postfix_str("compiling...", refresh=True)  # the first chunk includes XLA's compile
        self._ran.add((images[0].shape[:2], mode, n_dev))
        try:
            step = resumed_from
            while step < config.steps:
                prev_state = state
                state, record = run(params, x0, target, text, state)  # the state stays on device
                record = jax.tree.map(np.asarray, record)
                n = min(config.chunk_size, config.steps - step)
                self._check_finite(record, step, n, prev_state, x0, target, text, terms_at)
                rows = np.concatenate([record["values"][:, :n], record["total"][:, :n, None]], axis=-1)
                history = np.concatenate([history, rows], axis=1)
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

    def _check_finite(self, record, first_step, n, prev_state, x0, target, text, terms_at):
        names = self.config.term_names
        values, total, grad_ok = record["values"][:, :n], record["total"][:, :n], record["grad_finite"][:, :n]
        bad = ~np.isfinite(values).all(-1) | ~np.isfinite(total) | ~grad_ok
        if not bad.any():
            return
        image, offset = (int(a[0]) for a in np.nonzero(bad))
        step = first_step + offset
        where = f"image {image}, " if len(x0) > 1 else ""
        for k, v in zip(names, values[image, offset]):
            if not np.isfinite(v):
                raise NonFiniteError(f"{where}step {step}: loss term '{k}' is {v}; nothing was written")
        if not np.isfinite(total[image, offset]):
            raise NonFiniteError(f"{where}step {step}: the weighted total is {total[image, offset]}; nothing was written")
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
        for _ in range(offset):
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


def _prepare_target(target: np.ndarray | None, size: tuple[int, int], seed: int) -> np.ndarray:
    if target is None:
        return procedural_texture(*size, seed=seed)
    target = np.asarray(target)
    if target.dtype != np.uint8 or target.ndim != 3 or target.shape[-1] != 3:
        raise UserError(f"the target image must be uint8 (H, W, 3), got {target.dtype} {target.shape}")
    if target.shape[:2] != size:
        from PIL import Image

        target = np.asarray(Image.fromarray(target).resize(size[::-1], Image.Resampling.BICUBIC))
    return target


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
    mode: Mode = "shard_map",
    devices: int | None = None,
    prompts: Sequence[str] | None = None,
    target: np.ndarray | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> list[ProtectResult]:
    """Protect same-size images data-parallel, one per device: ``shard_map`` on a mesh or ``pmap`` (one N-device
    program), or ``dispatch`` (the one-image program on each device: bytes equal to each image's run alone)."""
    return Protector(backbone, config or AttackConfig()).protect(
        images,
        prompts=prompts,
        target=target,
        mode=mode,
        devices=devices,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )


__all__ = [
    "METHODS",
    "METHOD_NOTES",
    "TERMS",
    "AttackConfig",
    "AttackError",
    "NonFiniteError",
    "ProtectResult",
    "Protector",
    "protect",
    "protect_batch",
    "resolve_terms",
]
