"""The baselines on the real (tiny) backbones: the eps-space residual of score distillation on every
parameterisation (eps, v, rectified flow), and the terms that depend on what a backbone has."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anti_i2v_jax import AttackConfig, Protector, protect, resolve_terms
from anti_i2v_jax.backbones import load
from anti_i2v_jax.backbones.cogvideox import scheduler

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it


def _eps_variant(bb):
    """DynamiCrafter-tiny with the eps parameterisation of the released 256 model."""
    cfg = bb.config
    return dataclasses.replace(bb, config=dataclasses.replace(
        cfg, diffusion=dataclasses.replace(cfg.diffusion, parameterization="eps")))


def _noisy(bb, seed=0):
    """A draw with a timestep well inside (100, 900), where recovering eps from (z_t, x0) is well conditioned."""
    x = jnp.asarray(np.random.default_rng(seed).uniform(size=(64, 64, 3)), jnp.float32)
    cond, _ = bb.condition(bb.params, x, None)
    for k in range(50):
        noisy = bb.add_noise(bb.params, cond, jax.random.PRNGKey(k))
        if 100 < float(noisy.t) < 900:
            return noisy
    raise AssertionError("no draw with t in (100, 900)")


def _alpha_bar(bb, t):
    if bb.name.startswith("cogvideox"):
        return float(scheduler.alphas_cumprod(bb.config.scheduler)[int(t)])
    return float(bb.tables["alphas_cumprod"][int(t)])


@pytest.mark.parametrize("variant", ["cogvideox-tiny (v)", "opensora-tiny (rectified flow)",
                                     "dynamicrafter-tiny (v)", "dynamicrafter-tiny (eps)"])
def test_eps_residual_is_the_noise_space_residual(variant):
    """``eps_residual(prediction)`` equals ``eps_hat - eps`` with both recovered here from the noising formula
    alone: eps from (z_t, x0), eps_hat from (z_t, prediction). This fixes the sign that SDS(-)/SDS(+) mean on
    every parameterisation (on rectified flow, ``pred - target`` has the opposite sign)."""
    name, param = variant.split(" (")
    bb = load(name)
    if param == "eps)":
        bb = _eps_variant(bb)
    noisy = _noisy(bb)
    pred = jnp.asarray(np.random.default_rng(1).normal(size=noisy.x0.shape), jnp.float32)
    got = np.asarray(bb.eps_residual(pred, noisy))
    z_t, x0, t = np.asarray(noisy.z_t, np.float64), np.asarray(noisy.x0, np.float64), float(noisy.t)
    p = np.asarray(pred, np.float64)
    if param == "rectified flow)":
        s = 1.0 - t / 1000.0  # z_t = s x0 + (1 - s) eps, v = x0 - eps
        eps = (z_t - s * x0) / (1.0 - s)
        eps_hat = z_t - s * p
        want = eps_hat - eps
        assert np.all(got[0] == 0.0), "frame 0 is the conditioning frame: no residual"
        got, want = got[1:], want[1:]
    else:
        a = _alpha_bar(bb, t)  # z_t = sqrt(a) x0 + sqrt(1 - a) eps
        eps = (z_t - np.sqrt(a) * x0) / np.sqrt(1.0 - a)
        eps_hat = p if param == "eps)" else np.sqrt(a) * p + np.sqrt(1.0 - a) * z_t  # v = sqrt(a) eps - sqrt(1-a) x0
        want = eps_hat - eps
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def test_clip_terms_follow_the_backbone():
    """VGMShield's and Anti-I2V's CLIP terms run where the backbone has OpenCLIP (DynamiCrafter) and are
    reported off elsewhere; a method left with no term is a clear error."""
    dc, cog = load("dynamicrafter-tiny"), load("cogvideox-tiny")
    vgm = AttackConfig.for_method("vgmshield")
    assert resolve_terms(dc, vgm)[0].term_names == ("vgm_vae", "vgm_clip")
    config, notes = resolve_terms(cog, vgm)
    assert config.term_names == ("vgm_vae",) and "no CLIP image encoder" in notes["vgm_clip"]
    assert "aux" in resolve_terms(dc, AttackConfig())[0].term_names
    with pytest.raises(Exception, match="no term"):
        resolve_terms(cog, AttackConfig(weights=(("aux", -1.0),)))


def test_vgmshield_moves_the_image_on_dynamicrafter():
    """The undirected VGMShield starts from the clean image: only its per-step noise gives a gradient there.
    With the CLIP term (DynamiCrafter), the image moves and both distances to the clean image grow."""
    bb = load("dynamicrafter-tiny")
    image = (np.random.default_rng(2).uniform(size=(64, 64, 3)) * 255).astype(np.uint8)
    config = AttackConfig.for_method("vgmshield", steps=4, chunk_size=4, checkpoint_every=4)
    result = Protector(bb, config).protect([image])[0]
    assert np.abs(result.image.astype(int) - image.astype(int)).max() > 0
    clip = result.history["vgm_clip"]
    assert clip[0] == pytest.approx(0.0, abs=1e-6) and clip[-1] > clip[0]


@pytest.mark.parametrize("name", ["opensora-tiny", "cogvideox-tiny"])
def test_sds_minus_and_plus_move_the_image_in_opposite_directions(name):
    bb = load(name)
    image = (np.random.default_rng(3).uniform(size=(64, 64, 3)) * 255).astype(np.uint8)
    runs = {m: protect(bb, image, AttackConfig.for_method(m, steps=2, chunk_size=2, checkpoint_every=2)).image
            for m in ("sds", "sds+")}
    minus, plus = (runs[m].astype(int) - image.astype(int) for m in ("sds", "sds+"))
    assert np.abs(minus).max() > 0 and np.abs(plus).max() > 0
    # Same first draw, opposite sign of the same gradient: the first steps mostly mirror each other.
    moved = (minus != 0) & (plus != 0)
    assert np.mean(np.sign(minus[moved]) == -np.sign(plus[moved])) > 0.9


@pytest.mark.parametrize("name", ["cogvideox-tiny", "opensora-tiny", "dynamicrafter-tiny"])
def test_a_reference_video_becomes_the_clean_latents_with_the_image_first(name):
    """``with_reference_video`` takes a clip of any length and size: its latents become the clean video
    latents, except frame 0, which stays the image's own latent (replace_first), so the image still reaches
    the video latents (SDS needs it)."""
    bb = load(name)
    rng = np.random.default_rng(4)
    clip = rng.uniform(size=(5, 40, 56, 3)).astype(np.float32)  # any length, any size
    ref = bb.with_reference_video(bb.params, clip)
    image = jnp.asarray(rng.uniform(size=(64, 64, 3)), jnp.float32)
    plain, _ = bb.condition(bb.params, image, None)
    cond, _ = ref.condition(ref.params, image, None)
    video, repeated = np.asarray(cond["video_latents"]), np.asarray(plain["video_latents"])
    assert video.shape == repeated.shape == ref.reference_latents.shape
    np.testing.assert_allclose(video[0], repeated[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(video[1:], ref.reference_latents[1:])
    assert np.abs(video[1:] - repeated[1:]).max() > 1e-3
