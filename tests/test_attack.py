"""The protection loop on the test double: budget, objective, devices, resume, failures."""

import dataclasses

import jax
import numpy as np
import pytest
from double import TinyBackbone

from anti_i2v_jax import (
    METHOD_NOTES,
    METHODS,
    AttackConfig,
    NonFiniteError,
    Protector,
    UserError,
    protect,
    protect_batch,
    resolve_terms,
)
from anti_i2v_jax.target import procedural_texture

FAST = AttackConfig(steps=6, chunk_size=3, checkpoint_every=3)


def test_protect_keeps_size_budget_and_records_every_term(backbone, image):
    result = protect(backbone, image, FAST)
    assert result.image.shape == image.shape and result.image.dtype == np.uint8
    change = np.abs(result.image.astype(int) - image.astype(int))
    assert 0 < change.max() <= 16
    # The test double has no CLIP image encoder: the auxiliary term is off, and the protector says so.
    assert set(result.history) == {"irc", "ira", "ira_vae", "dm", "total"}
    assert "aux" in Protector(backbone, FAST).term_notes
    for values in result.history.values():
        assert values.shape == (6,) and np.isfinite(values).all()


def test_a_deterministic_term_is_normalised_to_one(backbone, image):
    """The VAE IRA term has no random draw: its start value equals its normalisation, so the total starts at 1."""
    config = AttackConfig(weights=(("ira_vae", 1.0),), steps=2, chunk_size=2, checkpoint_every=2)
    assert protect(backbone, image, config).history["total"][0] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.slow
def test_normalisation_over_several_draws_is_steadier_than_one(backbone, image):
    """The diffusion loss varies with the random (t, eps) draw; its normalisation is the mean over
    ``normalize_draws`` draws, so the effective weight varies less between seeds than with one draw."""
    from anti_i2v_jax.attack import _initial_state, _make_chunk_fn

    x0 = image.astype(np.float32) / 255
    text = backbone.encode_text(backbone.params, "a video")

    def scales(draws):
        config = AttackConfig(weights=(("dm", -1.0),), steps=1, chunk_size=1, checkpoint_every=1, normalize_draws=draws)
        chunk = jax.jit(_make_chunk_fn(backbone, config, image.shape[:2])[0])
        out = []
        for seed in range(8):  # the draws follow the seed through the state's key
            state, _ = chunk(backbone.params, x0, x0, text, _initial_state(dataclasses.replace(config, seed=seed), x0))
            out.append(float(state["scale"][0]))
        return np.std(out) / np.mean(out)

    one, many = scales(1), scales(16)
    assert many < 0.5 * one, (one, many)


def test_sign_descent_lowers_the_objective(backbone, image):
    """Pulling the VAE features onto the target's: a deterministic term that should fall steadily."""
    config = AttackConfig(weights=(("ira_vae", 1.0),), schedule="rgb", steps=20, chunk_size=10)
    hist = protect(backbone, image, config).history["ira_vae"]
    assert hist[-1] < 0.9 * hist[0]
    flipped = dataclasses.replace(config, weights=(("ira_vae", -1.0),))
    assert protect(backbone, image, flipped).history["ira_vae"][-1] > hist[0]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["alternate", "lab", "dct", "rgb"])
def test_every_schedule_moves_the_image_within_budget(backbone, image, schedule):
    config = dataclasses.replace(FAST, schedule=schedule, eps=4 / 255)
    out = protect(backbone, image, config).image
    change = np.abs(out.astype(int) - image.astype(int))
    assert 0 < change.max() <= 4


@pytest.mark.slow
def test_dct_schedule_changes_only_low_frequencies(backbone, image):
    config = dataclasses.replace(FAST, schedule="dct", eps=1.0)  # a budget that never binds
    protector = Protector(backbone, config)
    (res,) = protector.protect([image])
    from anti_i2v_jax import dsp

    # Outside the band only the rounding to uint8 remains: white noise of RMS 1/(255 sqrt(12)).
    diff = res.image.astype(np.float32) / 255 - image.astype(np.float32) / 255
    c = np.asarray(dsp.dct2(diff))
    mask = dsp.low_frequency_mask(image.shape[:2], config.dct_fraction)
    outside = np.sqrt(np.mean(np.where(mask, 0, c) ** 2))
    inside = np.sqrt(np.mean(np.where(mask, c, 0) ** 2))
    rounding = 1 / (255 * np.sqrt(12))
    assert outside < 1.2 * rounding
    assert inside > 10 * rounding


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_preset_runs_within_budget(backbone, image, method):
    config = AttackConfig.for_method(method, steps=2, chunk_size=2, checkpoint_every=2)
    result = protect(backbone, image, config)
    assert np.abs(result.image.astype(int) - image.astype(int)).max() <= 16
    assert set(result.history) == {*resolve_terms(backbone, config)[0].term_names, "total"}
    assert all(np.isfinite(v).all() for v in result.history.values())


# What each preset must do to the image, measured at the same 16 fixed (t, eps, noise) draws before and
# after 10 steps: the term that defines the method, and the direction it must move (+1 up, -1 down).
MAIN_TERMS = {
    "anti-i2v": {"ira_vae": -1},
    "advdm": {"dm": +1},
    "mist": {"texture": -1, "dm": +1},
    "mist-vaijsc": {"dm": +1},
    "vgmshield": {"vgm_vae": +1},
    "vgmshield-directed": {"vgm_vae": -1},
    "sds": {"sds": -1},  # the surrogate's gradient is the residual: SDS(-) lowers it, SDS(+) raises it
    "sds+": {"sds": +1},
    "sdst": {"sds": -1, "texture": -1},
    "photoguard": {"texture": -1},
}


def paired_terms(backbone, image, config, protected, probes):
    """Mean of each probe term over 16 fixed draws, at the clean image and at ``protected``."""
    from anti_i2v_jax.attack import _make_chunk_fn

    probe = AttackConfig(weights=tuple((k, 1.0) for k in probes), vgm_directed=config.vgm_directed,
                         normalize_terms=False, steps=1, chunk_size=1, checkpoint_every=1)
    _, terms_at = _make_chunk_fn(backbone, probe, image.shape[:2])
    terms_at = jax.jit(terms_at)
    x0 = image.astype(np.float32) / 255
    target = procedural_texture(*image.shape[:2], seed=config.target_seed).astype(np.float32) / 255
    text = backbone.encode_text(backbone.params, config.prompt)

    def mean_at(x):
        rows = []
        for s in range(16):
            state = dict(delta=x - x0, key=jax.random.PRNGKey(100 + s), step=np.int32(0), scale=np.ones(len(probes)))
            out = terms_at(backbone.params, x0, target, text, state)
            rows.append([float(out[k][0]) for k in probes])
        return dict(zip(probes, np.mean(rows, 0)))

    return mean_at(x0), mean_at(protected.astype(np.float32) / 255)


def test_preset_table_covers_every_method():
    assert set(MAIN_TERMS) == set(METHODS) == set(METHOD_NOTES)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(MAIN_TERMS))
def test_every_preset_moves_the_image_and_its_main_term_the_right_way(backbone, image, method):
    config = AttackConfig.for_method(method, steps=10, chunk_size=10, checkpoint_every=10)
    result = protect(backbone, image, config)
    assert np.abs(result.image.astype(int) - image.astype(int)).max() > 0, "the image did not change"
    before, after = paired_terms(backbone, image, config, result.image, tuple(MAIN_TERMS[method]))
    for term, direction in MAIN_TERMS[method].items():
        assert direction * (after[term] - before[term]) > 0, (term, before[term], after[term])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dispatch", "shard_map", "pmap"])
def test_data_parallel_equals_one_by_one(backbone, image, mode):
    assert jax.device_count() >= 2, "conftest asks XLA for two host devices"
    second = np.ascontiguousarray(image[::-1, ::-1])
    config = dataclasses.replace(FAST, steps=4, chunk_size=2, checkpoint_every=2, prompt="a person")
    batch = protect_batch(backbone, [image, second], config, mode=mode, devices=2, prompts=["a", "b"])
    alone = [protect(backbone, im, config, prompt=p) for im, p in zip([image, second], ["a", "b"])]
    for b, a in zip(batch, alone):
        np.testing.assert_array_equal(b.image, a.image)
        for k in a.history:
            np.testing.assert_array_equal(b.history[k], a.history[k])


@pytest.mark.slow
def test_several_images_per_device_keep_the_bytes_of_each_alone(backbone, image):
    """per_device K (lax.map inside each device program): 5 images on 2 devices x 2, then a round of 1; and
    3 images on one device, 2 then 1."""
    images = [image, image[::-1].copy(), image[:, ::-1].copy(), np.ascontiguousarray(image[::-1, ::-1]),
              np.roll(image, 7, axis=1)]
    prompts = ["a", "b", "c", "d", "e"]
    config = dataclasses.replace(FAST, steps=4, chunk_size=2, checkpoint_every=2)
    protector = Protector(backbone, config)  # one compile for every run alone
    alone = [protector.protect([im], prompts=[p])[0] for im, p in zip(images, prompts)]
    for mode, n in (("dispatch", 5), ("sequential", 3)):
        batch = protector.protect(images[:n], mode=mode, devices=2, per_device=2, prompts=prompts[:n])
        for a, b in zip(alone, batch):
            np.testing.assert_array_equal(b.image, a.image)
            np.testing.assert_array_equal(b.history["total"], a.history["total"])
    vmapped = protect_batch(backbone, images[:2], config, mode="sequential", per_device=2, batching="vmap",
                            prompts=prompts[:2])
    assert all(np.abs(v.image.astype(int) - im.astype(int)).max() <= 16 for v, im in zip(vmapped, images))
    with pytest.raises(UserError, match="'dispatch' or 'sequential'"):
        protect_batch(backbone, images, config, mode="pmap", devices=2, per_device=2)
    with pytest.raises(UserError, match="batching"):
        protect_batch(backbone, images, config, per_device=2, batching="scan")


@pytest.mark.slow
def test_batch_with_more_images_than_devices_runs_in_rounds(backbone, image):
    images = [image, image[::-1].copy(), image[:, ::-1].copy()]
    config = dataclasses.replace(FAST, steps=2, chunk_size=2, checkpoint_every=2)
    batch = protect_batch(backbone, images, config, mode="shard_map", devices=2)
    assert len(batch) == 3
    np.testing.assert_array_equal(batch[2].image, protect(backbone, images[2], config).image)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(backbone, image, tmp_path):
    config = AttackConfig(steps=9, chunk_size=3, checkpoint_every=3, seed=5)
    full = protect(backbone, image, config)

    def stop_after_first_chunk(step, history):
        if step == 3:
            raise _Stop

    ckpt = tmp_path / "state"
    with pytest.raises(_Stop):
        protect(backbone, image, config, checkpoint_dir=ckpt, callback=stop_after_first_chunk)
    assert ckpt.is_dir()
    resumed = protect(backbone, image, config, checkpoint_dir=ckpt)
    assert resumed.resumed_from == 3
    np.testing.assert_array_equal(resumed.image, full.image)
    for k in full.history:
        np.testing.assert_array_equal(resumed.history[k], full.history[k])
    assert not ckpt.exists(), "the checkpoint is removed once the run is complete"


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_refused(backbone, image, tmp_path):
    config = AttackConfig(steps=6, chunk_size=3, checkpoint_every=3)

    def stop(step, history):
        raise _Stop

    with pytest.raises(_Stop):
        protect(backbone, image, config, checkpoint_dir=tmp_path / "s", callback=stop)
    with pytest.raises(UserError, match="different run"):
        protect(backbone, image, dataclasses.replace(config, seed=1), checkpoint_dir=tmp_path / "s")


def test_non_finite_loss_names_step_and_term(image):
    bad = TinyBackbone.create(nan_loss=True)
    with pytest.raises(NonFiniteError, match=r"step 0: loss term 'dm' is nan"):
        protect(bad, image, AttackConfig.for_method("advdm", steps=3, chunk_size=3, checkpoint_every=3))


def test_non_finite_normalisation_draw_is_named(image):
    """The normalisation draws run as the first iterations of the loop; a NaN there is reported as a draw."""
    bad = TinyBackbone.create(nan_loss=True)
    config = AttackConfig(weights=(("dm", -1.0),), steps=3, chunk_size=3, checkpoint_every=3)
    with pytest.raises(NonFiniteError, match=r"normalisation draw 1 of 4 at step 0: loss term 'dm' is nan"):
        protect(bad, image, config)


@pytest.mark.slow
def test_a_save_from_before_the_draws_ran_in_the_loop_resumes(backbone, image, tmp_path):
    """Saves written before the normalisation draws were loop iterations lack the draws' state; they resume."""
    from anti_i2v_jax.attack.checkpoints import _Checkpointer, _fingerprint
    from anti_i2v_jax.attack.step import _prepare_target

    config = AttackConfig(steps=6, chunk_size=3, checkpoint_every=3, seed=2)
    full = protect(backbone, image, config)
    ckpt = tmp_path / "state"

    def stop(step, history):
        raise _Stop

    with pytest.raises(_Stop):
        protect(backbone, image, config, checkpoint_dir=ckpt, callback=stop)
    target = _prepare_target(None, image.shape[:2], config.target_seed)
    fingerprint = _fingerprint(backbone, resolve_terms(backbone, config)[0], target, image, prompts=[config.prompt])
    saved = _Checkpointer(ckpt, fingerprint)
    state, history = saved.restore()
    assert {"draw", "acc"} <= set(state)
    saved.remove()
    _Checkpointer(ckpt, fingerprint).save(3, {k: v for k, v in state.items() if k not in ("draw", "acc")}, history)

    resumed = protect(backbone, image, config, checkpoint_dir=ckpt)
    assert resumed.resumed_from == 3
    np.testing.assert_array_equal(resumed.image, full.image)
    np.testing.assert_array_equal(resumed.history["total"], full.history["total"])


@pytest.mark.slow
def test_non_finite_gradient_names_step_and_term(image, tmp_path):
    bad = TinyBackbone.create(nan_grad=True)
    config = AttackConfig(steps=3, chunk_size=3, checkpoint_every=3)
    with pytest.raises(NonFiniteError, match=r"step 0: the gradient is not finite \(from term\(s\) \['dm'\]\)"):
        protect(bad, image, config, checkpoint_dir=tmp_path / "s")
    assert not any(tmp_path.iterdir()), "nothing is written when a run fails"


def test_bad_settings_are_clear_errors(backbone, image):
    with pytest.raises(UserError, match="out of range"):
        protect(backbone, image, AttackConfig(irc_deep=(7,)))
    with pytest.raises(UserError, match="unknown loss terms"):
        AttackConfig(weights=(("lpips", 1.0),))
    with pytest.raises(UserError, match="checkpoint_every must be >= 1"):
        AttackConfig(chunk_size=4, checkpoint_every=0)
    with pytest.raises(UserError, match="unknown method"):
        AttackConfig.for_method("photoguardian")
    with pytest.raises(UserError, match="too small"):
        protect(backbone, image[:8], FAST)
    with pytest.raises(UserError, match="uint8"):
        protect(backbone, image.astype(np.float32), FAST)


def test_random_start_is_seeded(backbone, image):
    config = AttackConfig.for_method("advdm", steps=0, chunk_size=1, checkpoint_every=1, seed=3)
    a, b = protect(backbone, image, config).image, protect(backbone, image, config).image
    np.testing.assert_array_equal(a, b)
    assert 0 < np.abs(a.astype(int) - image.astype(int)).max() <= 16


def test_a_protector_compiles_once_per_size(backbone, image):
    protector = Protector(backbone, FAST)
    protector.protect([image])
    protector.protect([image[::-1].copy()])
    assert len(protector._compiled) == 1


@pytest.mark.slow
def test_ctrl_c_during_a_save_completes_the_save_then_interrupts(backbone, image, tmp_path, monkeypatch):
    """SIGINT that lands inside the checkpoint save is held until the save is whole: the run then stops with
    KeyboardInterrupt, leaves no *.orbax-checkpoint-tmp folder, and resumes from that save."""
    import os
    import signal

    import orbax.checkpoint as ocp

    config = AttackConfig(steps=6, chunk_size=3, checkpoint_every=3, seed=2)
    full = protect(backbone, image, config)
    real_save = ocp.CheckpointManager.save

    def save_with_ctrl_c(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the middle of the save
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_with_ctrl_c)
    ckpt = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        protect(backbone, image, config, checkpoint_dir=ckpt)
    monkeypatch.undo()
    assert ckpt.is_dir() and not [p for p in ckpt.rglob("*") if "tmp" in p.name], sorted(ckpt.rglob("*"))
    resumed = protect(backbone, image, config, checkpoint_dir=ckpt)
    assert resumed.resumed_from == 3
    np.testing.assert_array_equal(resumed.image, full.image)


def test_the_clip_term_reuses_the_conditions_tower_pass():
    """DynamiCrafter conditions on its CLIP image tower's tokens; the CLIP term of the protected image takes its
    embedding from that same pass (``cond["clip_embedding"]``), so the tower runs once per step for it (its
    own ``image_embedding`` only for the clean anchor), with the value a second pass would give."""
    from anti_i2v_jax import losses
    from anti_i2v_jax.attack import _make_chunk_fn
    from anti_i2v_jax.backbones import registry
    from anti_i2v_jax.backbones.dynamicrafter import DynamiCrafterBackbone

    calls = []

    class Counting(DynamiCrafterBackbone):
        def _own_image_embedding(self, params, x):
            calls.append(x.shape)
            return super()._own_image_embedding(params, x)

    tiny = registry.load("dynamicrafter-tiny")
    backbone = Counting(**{f.name: getattr(tiny, f.name) for f in dataclasses.fields(tiny)})
    probe = AttackConfig(weights=(("aux", 1.0),), normalize_terms=False, steps=1, chunk_size=1, checkpoint_every=1)
    size = backbone.model_size
    _, terms_at = _make_chunk_fn(backbone, probe, size)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(0.2, 0.8, (*size, 3)).astype(np.float32)
    delta = rng.uniform(0, 1, x0.shape).astype(np.float32) - x0  # another image: the tiny tower moves little
    state = dict(delta=delta, key=jax.random.PRNGKey(1), step=np.int32(0), scale=np.ones(1))
    params = backbone.attack_params
    out = jax.jit(terms_at)(params, x0, x0, backbone.encode_text(backbone.params, ""), state)
    assert len(calls) == 1  # the clean anchor's; the protected image's came with its condition
    want = losses.cosine_distance(backbone.image_embedding(params, x0 + delta), backbone.image_embedding(params, x0))
    np.testing.assert_allclose(out["aux"][0], want, rtol=1e-4)
    assert float(want) > 1e-5  # the embeddings differ: the comparison can tell
