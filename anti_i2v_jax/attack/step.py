"""One protection step and the ``lax.scan`` chunk of steps for one image, the initial state, and
``make_protect_fn`` (the whole run as a pure function)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anti_i2v_jax import dsp, losses
from anti_i2v_jax.attack.config import (
    TERM_NEEDS,
    AttackConfig,
    _lacks,
    _Layers,
    provides,
    resolve_terms,
    uses_target,
)
from anti_i2v_jax.backbones.base import Backbone
from anti_i2v_jax.errors import UserError
from anti_i2v_jax.target import procedural_texture


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

    missing = [f"{k} (needs one of {TERM_NEEDS[k]})" for k in names if _lacks(backbone, k)]
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
    need_clip = bool({"aux", "vgm_clip"} & set(names)) and provides(backbone, "image_embedding")
    need_lpips = bool({"aux", "vgm_lpips"} & set(names)) and provides(backbone, "lpips")
    noise_std = config.vgm_noise / 2.0  # [-1, 1] scale -> [0, 1] scale

    def anchors(params, x0, target):
        """Features of the target and clean images: constants of the objective."""
        anchor = {}
        if need_target:  # posterior means (key None): the anchors are fixed for the whole run
            anchor["target_cond"], anchor["target_vae"] = backbone.condition(
                params, target, None, vae_layers=vae_taps
            )
        if need_lpips:  # the clean photo's LPIPS features, the reference of every step
            anchor["lpips_clean"] = backbone.perceptual_features(params, x0)
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
            if "ira" in names:
                # The target branch is a constant of the objective: stopping the gradient at its inputs (not
                # only at its taps) keeps JAX from linearising a whole second denoiser pass and XLA from
                # holding its activations for a backward pass that never uses them.
                _, target_taps = backbone.denoise(
                    jax.lax.optimization_barrier(params), jax.lax.stop_gradient(noisy), anchor["target_cond"], text,
                    taps=layers.ira,
                )
                target_taps = jax.lax.stop_gradient(target_taps)
            pred, taps = backbone.denoise(params, noisy, cond, text, taps=denoiser_taps)
            if "dm" in names:
                terms["dm"] = backbone.diffusion_loss(pred, noisy)
            if "irc" in names:
                terms["irc"] = losses.irc_loss(taps, layers.irc_early, layers.irc_deep)
            if "ira" in names:
                terms["ira"] = losses.ira_loss(taps, target_taps, layers.ira)
            if "sds" in names:
                terms["sds"] = losses.sds_surrogate(backbone.eps_residual(pred, noisy), noisy.x0)
        if "ira_vae" in names:
            terms["ira_vae"] = losses.ira_loss(vae, anchor["target_vae"], layers.vae)
        if "texture" in names:
            terms["texture"] = losses.texture_sum(vae["latent"], anchor["target_vae"]["latent"])
        if "texture_mean" in names:
            terms["texture_mean"] = losses.mean_squared(vae["latent"], anchor["target_vae"]["latent"])
        if need_clip:
            # A backbone whose condition already holds this image's CLIP embedding (from the tower pass it
            # conditions on) saves a second pass and its backward.
            emb = cond.get("clip_embedding") if isinstance(cond, Mapping) else None
            if emb is None:
                emb = backbone.image_embedding(params, x_adv)
            if "aux" in names:
                terms["aux"] = losses.cosine_distance(emb, anchor["clip_clean"])
            if "vgm_clip" in names:
                terms["vgm_clip"] = losses.cosine_distance(
                    emb, anchor["clip_target" if config.vgm_directed else "clip_clean"]
                )
        if need_lpips:  # to the clean image in both VGMShield modes (MMVGM), and in Anti-I2V's aux
            perceptual = backbone.perceptual_distance(params, x_adv, anchor["lpips_clean"])
            if "aux" in names:
                terms["aux"] = terms.get("aux", 0.0) + perceptual
            if "vgm_lpips" in names:
                terms["vgm_lpips"] = perceptual
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

    def space_update(space, x_adv, grad):
        opt = optimizers[space]
        direction = lambda g: opt.update(g, opt.init(g))[0]  # noqa: E731  (stateless: sign, scale)
        return dsp.space_step(
            space, x_adv, grad, direction, dct_fraction=config.dct_fraction, dct_block=config.dct_block
        )

    branches = [functools.partial(space_update, s) for s in space_list]

    # The term normalisation runs through the step's own code: the first ``n_draws`` iterations of a run are
    # draws of the objective at step 0 (keys from the run's step-0 key, so they follow the seed) that set the
    # scales and move nothing. One copy of the objective in the program instead of a second, forward-only one
    # for step 0 (a quarter of DynamiCrafter's compile), for the price of the draws' unused backward passes.
    n_draws = config.draws
    ones = jnp.ones((len(names),), jnp.float32)

    def iteration(params, x0, target, text, anchor, state):
        """One scan iteration: a normalisation draw while ``state["draw"] < n_draws``, else a protection step."""
        key, step_key = jax.random.split(state["key"])
        scale, obj_key = state["scale"], step_key
        if n_draws:
            drawing = state["draw"] < n_draws
            draw_key = jax.random.split(jax.random.fold_in(state["key"], 2), n_draws)[
                jnp.minimum(state["draw"], n_draws - 1)
            ]
            obj_key = jax.lax.cond(drawing, lambda: draw_key, lambda: step_key)
            scale = jnp.where(drawing, ones, scale)
        (total, values), grad = jax.value_and_grad(objective, has_aux=True)(
            state["delta"], params, x0, obj_key, text, anchor, target, scale
        )
        x_adv = x0 + state["delta"]
        space = space_of_step[state["step"] % len(spaces)]
        x_next = jax.lax.switch(space, branches, x_adv, grad)
        new_state = stepped = dict(state, delta=dsp.project(x_next, x0, config.eps) - x0, step=state["step"] + 1,
                                   key=key)
        kind = jnp.asarray(STEP, jnp.int32)
        if n_draws:
            # A draw: the mean |value| of each term over the draws becomes its scale (never zero).
            acc, draw = state["acc"] + jnp.abs(values), state["draw"] + 1
            drawn = dict(state, acc=acc, draw=draw,
                         scale=jnp.where(draw == n_draws, jnp.maximum(acc / n_draws, 1e-12), state["scale"]))
            new_state = jax.lax.cond(drawing, lambda: drawn, lambda: stepped)
            kind = jnp.where(drawing, DRAW, STEP).astype(jnp.int32)
        record = dict(values=values, total=total, grad_finite=jnp.all(jnp.isfinite(grad)), kind=kind)
        return new_state, record

    def chunk(params, x0, target, text, state):
        anchor = anchors(params, x0, target)

        def body(carry, _):
            # ``chunk_size`` steps per chunk, after the draws where the run starts (the draws take
            # iterations of their own, idle in every later chunk); steps past the end of the run are idle too,
            # so every chunk has the same length (one compile).
            state, steps_done = carry
            drawing = state["draw"] < n_draws
            active = drawing | ((steps_done < config.chunk_size) & (state["step"] < config.steps))
            state, record = jax.lax.cond(
                active,
                lambda s: iteration(params, x0, target, text, anchor, s),
                lambda s: (s, _empty_record(len(names))),
                state,
            )
            return (state, steps_done + (record["kind"] == STEP)), record

        (state, _), records = jax.lax.scan(
            body, (state, jnp.asarray(0, jnp.int32)), None, length=config.chunk_size + n_draws
        )
        return state, records

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


# What each scan iteration was, in its record's ``kind``: idle (past the run's end, or a chunk's spare draw
# slots), a normalisation draw, or a protection step.
IDLE, DRAW, STEP = 0, 1, 2


def _empty_record(n_terms: int) -> dict[str, jax.Array]:
    return dict(
        values=jnp.full((n_terms,), jnp.nan, jnp.float32),
        total=jnp.asarray(jnp.nan, jnp.float32),
        grad_finite=jnp.asarray(True),
        kind=jnp.asarray(IDLE, jnp.int32),
    )


def _initial_state(config: AttackConfig, x0: np.ndarray) -> dict[str, np.ndarray]:
    """The loop state of a run seeded by ``config.seed`` (on the host)."""
    return jax.tree.map(np.asarray, _state_from_key(config, jnp.asarray(x0), jax.random.PRNGKey(config.seed)))


def _state_from_key(config: AttackConfig, x0: jax.Array, root: jax.Array) -> dict[str, jax.Array]:
    """The loop state at step 0 from a PRNG key (traceable): the random start inside the budget, the step
    counter, the key of the timestep/noise draws, the term scales (set by the normalisation draws), and the
    draws' count and running sum of |value|."""
    delta = jnp.zeros_like(x0)
    if config.random_start:
        noise = jax.random.uniform(jax.random.fold_in(root, 1), x0.shape, minval=-config.eps, maxval=config.eps)
        delta = dsp.project(x0 + noise, x0, config.eps) - x0
    return dict(
        delta=delta.astype(jnp.float32),
        step=jnp.asarray(0, jnp.int32),
        key=jax.random.fold_in(root, 0),
        scale=jnp.ones((len(config.term_names),), jnp.float32),
        draw=jnp.asarray(0, jnp.int32),
        acc=jnp.zeros((len(config.term_names),), jnp.float32),
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
    chunk, _ = _make_chunk_fn(backbone, dataclasses.replace(config, chunk_size=max(config.steps, 1)), image_size)
    default_target = _prepare_target(None, image_size, config.target_seed).astype(np.float32) / 255.0

    def fn(params, image, key, text, target=None):
        x0 = jnp.asarray(image, jnp.float32)
        if x0.shape != (*image_size, 3):
            raise UserError(f"make_protect_fn was built for images of {image_size}, got {x0.shape}")
        tgt = jnp.asarray(default_target if target is None else target, jnp.float32)
        state, record = chunk(params, x0, tgt, text, _state_from_key(config, x0, key))
        record = jax.tree.map(lambda a: a[config.draws : config.draws + config.steps], record)  # draws first
        history = {k: record["values"][:, i] for i, k in enumerate(config.term_names)}
        history["total"] = record["total"]
        return x0 + state["delta"], history

    return fn


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
