"""CogVideoX modules: switches (scan, remat) and the adapter on the tiny config, and the quick-start run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anti_i2v_jax.backbones.cogvideox import config as configs
from anti_i2v_jax.backbones.cogvideox import tiny_backbone
from anti_i2v_jax.backbones.cogvideox.backbone import init_params
from anti_i2v_jax.backbones.cogvideox.transformer import (
    CogVideoXTransformer3DModel,
    block_taps,
    stack_blocks,
)

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it


@pytest.fixture(scope="module")
def tiny():
    config = configs.tiny()
    return config, init_params(config, seed=3)


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    f, (h, w) = config.latent_frames, (config.height // 8, config.width // 8)
    x = rng.standard_normal((2, f, h, w, config.transformer.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, config.transformer.max_text_seq_length, config.transformer.text_embed_dim)).astype(np.float32)
    return x, text, np.array([10, 700])


@pytest.mark.parametrize("switch", ["scan_layers", "remat", "both"])
def test_scan_and_remat_equal_the_plain_stack(tiny, switch):
    config, params = tiny
    x, text, t = _inputs(config)
    layers = tuple(range(config.transformer.num_layers))
    plain = CogVideoXTransformer3DModel(config.transformer, taps=layers)
    out, st = plain.apply({"params": params["transformer"]}, x, text, t, mutable=["intermediates"])
    flags = {"scan_layers": switch in ("scan_layers", "both"), "remat": switch in ("remat", "both")}
    other = CogVideoXTransformer3DModel(dataclasses.replace(config.transformer, **flags), taps=layers)
    p = dict(params["transformer"])
    if flags["scan_layers"]:
        p = stack_blocks(p, config.transformer.num_layers)
    out2, st2 = other.apply({"params": p}, x, text, t, mutable=["intermediates"])
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=1e-5)
    for a, b in zip(block_taps(st2, layers), block_taps(st, layers)):
        for i in layers:
            np.testing.assert_allclose(a[i], b[i], atol=1e-5, rtol=1e-5)
    # Gradients agree too (remat changes only what is stored).
    g = lambda params_, model: jax.grad(lambda xx: model.apply({"params": params_}, xx, text, t).sum())(x)  # noqa: E731
    np.testing.assert_allclose(g(p, other), g(params["transformer"], plain), atol=1e-4, rtol=1e-4)


def test_taps_are_opt_in(tiny):
    config, params = tiny
    x, text, t = _inputs(config)
    _, st = CogVideoXTransformer3DModel(config.transformer).apply(
        {"params": params["transformer"]}, x, text, t, mutable=["intermediates"]
    )
    assert not st.get("intermediates")


def test_adapter_condition_noise_and_denoise_shapes():
    bb = tiny_backbone()
    x = jnp.asarray(np.random.default_rng(0).random((50, 70, 3)), jnp.float32)
    cond, taps = bb.condition(bb.params, x, None, vae_layers=bb.layers.vae_layers + ("latent",))
    f, h, w, c = bb.latent_shape
    assert cond["image_latents"].shape == (f, h, w, c) and not np.asarray(cond["image_latents"][1:]).any()
    np.testing.assert_allclose(cond["video_latents"][0], cond["image_latents"][0], rtol=1e-6)  # both x0.7 in v1.0
    assert set(taps) == {*bb.layers.vae_layers, "latent"}
    noisy = bb.add_noise(bb.params, cond, jax.random.PRNGKey(0))
    text = bb.encode_text(bb.params, "a person waving")
    pred, block = bb.denoise(bb.params, noisy, cond, text, taps=(0, 3))
    assert pred.shape == noisy.target.shape and set(block) == {0, 3}
    assert np.isfinite(float(bb.diffusion_loss(pred, noisy)))
    assert not np.allclose(text, bb.encode_text(bb.params, "a cat"))


@pytest.mark.heavy  # CI time: the CogVideoX parity cases and cogvideox-tiny protection runs cover this path
def test_gradient_reaches_the_image_through_the_vae_and_transformer():
    bb = tiny_backbone()
    x = jnp.asarray(np.random.default_rng(1).random((64, 64, 3)), jnp.float32)
    text = bb.encode_text(bb.params, "")

    def loss(img):
        cond, _ = bb.condition(bb.params, img, None)
        noisy = bb.add_noise(bb.params, cond, jax.random.PRNGKey(2))
        pred, _ = bb.denoise(bb.params, noisy, cond, text)
        return bb.diffusion_loss(pred, noisy)

    g = jax.grad(loss)(x)
    assert np.isfinite(g).all() and np.abs(g).max() > 0


@pytest.mark.heavy  # ~30-70 s end to end; the CLI, geometry and device tests cover the path in CI
def test_quick_start_protects_the_bundled_portrait(tmp_path, capsys):
    """The README's main line: `anti-i2v protect examples/astronaut.png` on the default cogvideox-tiny."""
    from pathlib import Path

    from anti_i2v_jax import cli
    from anti_i2v_jax.io import load_image

    src = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"
    assert cli.main(["protect", str(src), "--out", str(tmp_path), "--quiet"]) == 0
    out = load_image(tmp_path / "astronaut_protected.png")
    original = load_image(src)
    assert out.shape == original.shape
    assert 0 < np.abs(out.astype(int) - original.astype(int)).max() <= 16


def test_generate_writes_a_video_and_a_frame_grid(tmp_path, capsys):
    from pathlib import Path

    from PIL import Image

    from anti_i2v_jax import cli

    src = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"
    assert cli.main(["generate", str(src), "--prompt", "an astronaut", "--steps", "2", "--out", str(tmp_path)]) == 0
    gif = Image.open(tmp_path / "cogvideox-tiny" / "astronaut_video.gif")
    assert gif.n_frames == 9 and gif.size == (64, 64)
    assert Image.open(tmp_path / "cogvideox-tiny" / "astronaut_frames.png").size == (8 * 64, 2 * 64)


def test_image_encoder_params_encode_images_exactly_and_refuse_videos():
    from anti_i2v_jax.backbones.cogvideox.vae import (
        AutoencoderKLCogVideoX,
        image_encoder_params,
    )

    bb = tiny_backbone()
    taps = ("conv_in", "down_blocks.1", "mid_block", "conv_out")
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, 1, 64, 64, 3)), jnp.float32)
    full = AutoencoderKLCogVideoX(bb.config.vae, taps=taps)
    image = AutoencoderKLCogVideoX(bb.config.vae, taps=taps, image_only=True)
    (m1, l1), s1 = full.apply({"params": bb.params["vae"]}, x, method=full.encode, mutable=["intermediates"])
    small = image_encoder_params(bb.params["vae"])
    (m2, l2), s2 = image.apply({"params": small}, x, method=image.encode, mutable=["intermediates"])
    np.testing.assert_allclose(m2, m1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l2, l1, atol=1e-5, rtol=1e-5)
    for name in taps:
        np.testing.assert_allclose(
            s2["intermediates"]["encoder"][f"tap:{name}"][0], s1["intermediates"]["encoder"][f"tap:{name}"][0],
            atol=1e-5, rtol=1e-5,
        )
    n = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert n(small) < 0.5 * n(bb.params["vae"]["encoder"])
    with pytest.raises(ValueError, match="single"):
        image.apply({"params": small}, jnp.zeros((1, 9, 64, 64, 3)), method=image.encode)
    # The adapter gives the same condition from either parameter set.
    img = jnp.asarray(np.random.default_rng(5).random((64, 64, 3)), jnp.float32)
    c_full, _ = bb.condition(bb.params, img, None)
    c_attack, _ = bb.condition(bb.attack_params, img, None)
    np.testing.assert_allclose(c_attack["image_latents"], c_full["image_latents"], atol=1e-5, rtol=1e-5)
