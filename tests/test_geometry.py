"""Geometry (frames x height x width, fps) is a run setting: every shape follows it, bad ones are one clear error."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anti_i2v_jax.backbones import registry
from anti_i2v_jax.errors import UserError

# A geometry unlike each tiny backbone's default (non-square, another frame count), and its latent video shape.
OTHER = {
    "cogvideox-tiny": (dict(frames=13, height=96, width=160), (4, 12, 20, 4)),
    "opensora-tiny": (dict(frames=34, height=96, width=160, fps=12.0), None),
    "dynamicrafter-tiny": (dict(frames=6, height=96, width=160, fps=8.0), (6, 24, 40, 4)),
}


@pytest.fixture(scope="module", params=sorted(OTHER))
def tiny(request):
    return registry.load(request.param)


def _step_shapes(bb):
    """Shapes of one protection step's pieces at the adapter's geometry (no compute)."""
    h, w = bb.model_size

    def run(params, x, key):
        cond, _ = bb.condition(params, x, None)
        return cond, bb.add_noise(params, cond, key)

    x = jax.ShapeDtypeStruct((h + 7, w + 5, 3), jnp.float32)  # any input size: resized to the model size
    return jax.eval_shape(run, bb.attack_params, x, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_every_shape_follows_the_geometry(tiny):
    want, latent = OTHER[tiny.name]
    bb = tiny.with_geometry(**want)
    g = bb.geometry
    assert (g.frames, g.height, g.width) == (want["frames"], want["height"], want["width"])
    assert bb.model_size == (want["height"], want["width"])
    assert tiny.geometry != g and tiny.model_size != bb.model_size  # the original is untouched
    _, noisy = _step_shapes(bb)
    if latent is None:  # Open-Sora: the temporal VAE's chunks of 17 frames -> 5 latent frames each
        latent = (bb.config.latent_frames, want["height"] // 8, want["width"] // 8, 4)
        assert latent[0] == 10
    assert noisy.x0.shape == latent and noisy.z_t.shape == latent


@pytest.mark.slow
def test_one_step_runs_at_another_geometry(tiny):
    """A real forward pass and diffusion loss at the new geometry (the denoiser's positions, masks, tables)."""
    want, _ = OTHER[tiny.name]
    bb = tiny.with_geometry(**want)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((100, 170, 3)), jnp.float32)
    text = bb.encode_text(bb.params, "a video")

    @jax.jit
    def loss(params, x):
        cond, _ = bb.condition(params, x, None)
        noisy = bb.add_noise(params, cond, jax.random.PRNGKey(1))
        pred, _ = bb.denoise(params, noisy, cond, text)
        assert pred.shape == noisy.target.shape
        return bb.diffusion_loss(pred, noisy)

    value, grad = jax.value_and_grad(loss, argnums=1)(bb.attack_params, x)
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0


@pytest.mark.slow
def test_fps_reaches_the_denoiser():
    """Open-Sora and DynamiCrafter are conditioned on fps / frame stride: another value, another prediction."""
    for name in ("opensora-tiny", "dynamicrafter-tiny"):
        bb = registry.load(name)
        x = jnp.full((64, 64, 3), 0.5, jnp.float32)
        text = bb.encode_text(bb.params, "a video")
        cond, _ = jax.jit(lambda p: bb.condition(p, x, None))(bb.attack_params)
        noisy = jax.jit(lambda p, c: bb.add_noise(p, c, jax.random.PRNGKey(0)))(bb.attack_params, cond)
        faster = bb.with_geometry(fps=bb.geometry.fps + 5)
        assert faster.geometry.fps == bb.geometry.fps + 5 and bb.with_geometry(fps=bb.geometry.fps) is bb
        a, b = (np.asarray(jax.jit(lambda p, m=m: m.denoise(p, noisy, cond, text)[0])(bb.attack_params))
                for m in (bb, faster))
        assert not np.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("name, geometry, words", [
    ("cogvideox-tiny", dict(frames=14), ["--frames 14", "4k + 1", "nearest: 13 or 17"]),
    ("cogvideox-tiny", dict(height=100, width=170), ["--height 100", "nearest: 96 or 112", "--width 170", "160 or 176"]),
    ("cogvideox-tiny", dict(frames=1), ["--frames 1", "at least 5", "nearest: 5"]),
    ("cogvideox-tiny", dict(fps=8), ["no fps", "--model-fps"]),
    ("opensora-tiny", dict(frames=13), ["--frames 13", "at least 17"]),
    ("opensora-tiny", dict(height=100), ["--height 100", "multiple of 8", "96 or 104"]),
    ("opensora-tiny", dict(fps=0), ["--model-fps 0", "positive"]),
    ("dynamicrafter-tiny", dict(height=100), ["--height 100", "multiple of 8", "96 or 104"]),
    ("dynamicrafter-tiny", dict(frames=1), ["--frames 1", "at least 2"]),
    ("dynamicrafter-tiny", dict(fps=2.5), ["--model-fps 2.5", "whole number"]),
])
def test_a_geometry_the_model_cannot_take_names_the_nearest_valid_one(name, geometry, words):
    with pytest.raises(UserError) as e:
        registry.load(name).with_geometry(**geometry)
    message = str(e.value)
    assert name in message and "\n" not in message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.slow
def test_learned_position_table_fixes_the_size_but_not_the_frame_count():
    """CogVideoX-5b-I2V (v1.0) keeps its learned table at 480 x 720; its frame count may change (diffusers then
    adds a sincos table); 1.5's RoPE grid limits the size; every shape at real size by eval_shape."""
    v10 = registry.get("cogvideox-5b-i2v").abstract()
    with pytest.raises(UserError, match="--height 480 --width 720"):
        v10.with_geometry(height=480, width=640)
    assert v10.with_geometry(frames=25).latent_shape == (7, 60, 90, 16)
    v15 = registry.get("cogvideox1.5-5b-i2v").abstract()
    with pytest.raises(UserError, match="at most 2400 x 2400"):
        v15.with_geometry(height=2416)
    # 17 frames -> 5 latent frames, padded to 6 (whole temporal patches of 2); any size under the RoPE limit.
    bb = v15.with_geometry(frames=17, height=480, width=640)
    assert bb.latent_shape == (6, 60, 80, 16)
    cond = {"image_latents": jax.ShapeDtypeStruct(bb.latent_shape, jnp.bfloat16)}
    noisy_shape = jax.ShapeDtypeStruct(bb.latent_shape, jnp.bfloat16)
    from anti_i2v_jax.backbones.base import Noisy

    noisy = Noisy(x0=noisy_shape, z_t=noisy_shape, t=jax.ShapeDtypeStruct((), jnp.int32), target=noisy_shape)
    text = jax.ShapeDtypeStruct((226, 4096), jnp.bfloat16)
    pred, _ = jax.eval_shape(lambda p, n, c, t: bb.denoise(p, n, c, t), bb.params, noisy, cond, text)
    assert pred.shape == bb.latent_shape


@pytest.mark.slow
def test_a_resume_at_another_geometry_is_another_run():
    from anti_i2v_jax.attack import AttackConfig, _fingerprint

    bb = registry.load("dynamicrafter-tiny")
    image = np.zeros((64, 64, 3), np.float32)
    config = AttackConfig.for_method("anti-i2v")
    a = _fingerprint(bb, config, image, prompts=["p"])
    assert a == _fingerprint(bb.with_geometry(frames=bb.geometry.frames), config, image, prompts=["p"])
    assert a != _fingerprint(bb.with_geometry(frames=6), config, image, prompts=["p"])
    assert a != _fingerprint(bb.with_geometry(fps=8), config, image, prompts=["p"])


@pytest.mark.heavy  # CI time: the one-step geometry tests cover each backbone; this is the CLI command
def test_cli_protect_and_generate_at_another_geometry(tmp_path, capsys):
    from anti_i2v_jax.cli import main

    out = tmp_path / "out"
    assert main(["protect", "examples/astronaut.png", "--backbone", "cogvideox-tiny", "--frames", "13", "--height",
                 "96", "--width", "160", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "astronaut_report.json").read_text())
    assert report["geometry"] == {"frames": 13, "height": 96, "width": 160, "fps": None}
    assert report["model_size"] == [96, 160] and report["frames"] == 13
    assert main(["generate", "examples/astronaut.png", "--prompt", "a man", "--backbone", "opensora-tiny",
                 "--frames", "34", "--height", "48", "--width", "80", "--steps", "2", "--out", str(tmp_path / "g")]) == 0
    assert "(34 frames, opensora-tiny)" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_bad_geometry_is_one_line_and_exit_2(tmp_path, capsys):
    from anti_i2v_jax.cli import main

    assert main(["protect", "examples/astronaut.png", "--backbone", "cogvideox-tiny", "--height", "100",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nearest: 96 or 112" in err
    assert not (tmp_path / "o").exists()


def test_geometry_is_a_small_value():
    from anti_i2v_jax.backbones.base import Geometry

    g = Geometry(frames=49, height=480, width=720)
    assert dataclasses.asdict(g) == {"frames": 49, "height": 480, "width": 720, "fps": None}
    assert g.describe() == "49 frames x 480 x 720"
