"""Open-Sora 1.2: converter dry runs on full-size headers, full-size shapes, switches, adapter, quick run."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from headers import needs_keys, read_keys, write_header_only

from anti_i2v_jax.backbones.opensora import tiny_backbone
from anti_i2v_jax.backbones.opensora.backbone import abstract_params, opensora_v1_2
from anti_i2v_jax.backbones.opensora.stdit3 import STDiT3, stack_pairs
from weights_convert import __main__ as convert_main
from weights_convert import opensora as conv
from weights_convert.core import DictSource, convert

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

STDIT_CONFIG = {
    "architectures": ["STDiT3"], "caption_channels": 4096, "class_dropout_prob": 0.1, "depth": 28,
    "drop_path": 0.0, "enable_flash_attn": False, "enable_layernorm_kernel": False,
    "enable_sequence_parallelism": False, "freeze_y_embedder": True, "hidden_size": 1152,
    "input_size": [None, None, None], "input_sq_size": 512, "mlp_ratio": 4.0, "model_max_length": 300,
    "model_type": "STDiT3", "num_heads": 16, "only_train_temporal": False, "patch_size": [1, 2, 2],
    "pred_sigma": True, "qk_norm": True, "skip_y_embedder": False, "torch_dtype": "float32",
}
VAE_CONFIG = {
    "architectures": ["VideoAutoencoderPipeline"], "cal_loss": False, "freeze_vae_2d": False, "from_pretrained": None,
    "micro_frame_size": 17, "model_type": "VideoAutoencoderPipeline", "scale": [3.85, 2.32, 2.33, 3.06],
    "shift": [-0.1, 0.34, 0.27, 0.98], "torch_dtype": "float32",
    "vae_2d": {"from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers", "local_files_only": False,
               "micro_batch_size": 4, "subfolder": "vae", "type": "VideoAutoencoderKL"},
    "vae_temporal": {"from_pretrained": None, "type": "VAE_Temporal_SD"},
}


class Shapes(DictSource):
    def shape(self, key):
        return self._t[key]


@needs_keys
def test_dry_run_maps_every_full_size_tensor(tmp_path, capsys):
    for name, cfg, keys in (("stdit3", STDIT_CONFIG, "opensora_stdit3_keys.txt"), ("vae", VAE_CONFIG, "opensora_vae_keys.txt")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        write_header_only(tmp_path / name / "model.safetensors", read_keys(keys), "F32")
    assert convert_main.main(["opensora", "--stdit", str(tmp_path / "stdit3"), "--vae", str(tmp_path / "vae"), "--dry-run"]) == 0
    # 973 - rope.freqs and 517 - (shift, scale): recomputed / checked, not stored
    assert capsys.readouterr().out.strip() == "mapped 1487 tensors, ignored 3, missing 0, unexpected 0"
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({
        "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True, "model_type": "t5",
    }))
    write_header_only(tmp_path / "t5" / "model.safetensors", read_keys("t5_v1_1_xxl_encoder_keys.txt"))
    assert convert_main.main(["opensora", "--stdit", str(tmp_path / "stdit3"), "--vae", str(tmp_path / "vae"),
                              "--t5", str(tmp_path / "t5"), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "mapped 1706 tensors, ignored 4, missing 0, unexpected 0"


@needs_keys
def test_full_size_shapes_match_the_key_lists():
    abstract = abstract_params(opensora_v1_2(height=240, width=426, num_frames=17))
    _, report = convert(Shapes(read_keys("opensora_stdit3_keys.txt")), conv.STDIT_RULES, abstract["stdit"],
                        ignore=conv.STDIT_IGNORED, dry_run=True)
    assert report.mapped == 972
    _, report = convert(Shapes(read_keys("opensora_vae_keys.txt")), conv.VAE_RULES, abstract["vae"],
                        ignore=conv.VAE_IGNORED, dry_run=True)
    assert report.mapped == 515
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(abstract["stdit"]) == 1_207_643_972 - 36 + 1_228_800  # no rope param; y_embedding is one here
    assert count(abstract["vae"]) == 393_341_007


def test_a_wrong_normalisation_buffer_is_refused(tmp_path, capsys):
    from fixtures import case_dirs

    cases = case_dirs("opensora")
    if not cases:
        pytest.skip("set ANTI_I2V_FIXTURES")
    vae_cfg = json.loads((cases[0] / "vae" / "config.json").read_text())
    vae_cfg["shift"] = [0.0, 0.0, 0.0, 0.0]
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(vae_cfg))
    (tmp_path / "vae" / "model.safetensors").symlink_to((cases[0] / "vae" / "model.safetensors").resolve())
    code = convert_main.main(["opensora", "--stdit", str(cases[0] / "stdit3"), "--vae", str(tmp_path / "vae"),
                              "--dst", str(tmp_path / "out")])
    assert code == 2 and "shift" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny():
    return tiny_backbone(seed=2)


@pytest.mark.parametrize("flags", [dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True)])
def test_scan_and_remat_equal_the_plain_stack(tiny, flags):
    cfg = tiny.config.stdit
    f = tiny.config.latent_frames
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, f, 8, 8, 4)).astype(np.float32)
    args = (x, np.array([300.0]), rng.standard_normal((1, 16, 32)).astype(np.float32), np.ones((1, 16), bool),
            np.arange(f)[None] > 0, np.array([24.0]), np.array([64.0]), np.array([64.0]))
    taps = tuple(f"{k}.{i}" for i in range(cfg.depth) for k in ("spatial", "temporal"))
    out, st = STDiT3(cfg, taps=taps).apply({"params": tiny.params["stdit"]}, *args, mutable=["intermediates"])
    params = stack_pairs(tiny.params["stdit"], cfg.depth) if flags.get("scan_layers") else tiny.params["stdit"]
    out2, st2 = STDiT3(dataclasses.replace(cfg, **flags), taps=taps).apply({"params": params}, *args,
                                                                           mutable=["intermediates"])
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=1e-5)
    for t in taps:
        np.testing.assert_allclose(st2["intermediates"][f"tap:{t}"][0], st["intermediates"][f"tap:{t}"][0], atol=1e-5, rtol=1e-5)


def test_adapter_conditions_frame_zero_and_excludes_it_from_the_loss(tiny):
    x = jnp.asarray(np.random.default_rng(1).random((64, 80, 3)), jnp.float32)
    cond, taps = tiny.condition(tiny.params, x, None, vae_layers=tiny.layers.vae_layers + ("latent",))
    assert set(taps) == {*tiny.layers.vae_layers, "latent"}
    lean, _ = tiny.condition(tiny.attack_params, x, None)  # no decoders: the same condition
    np.testing.assert_array_equal(lean["image_latent"], cond["image_latent"])
    assert "decoder" not in tiny.attack_params["vae"]["spatial_vae"]
    noisy = tiny.add_noise(tiny.params, cond, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(noisy.z_t[0], cond["video_latents"][0])  # the conditioning frame is clean
    assert not np.allclose(noisy.z_t[1:], cond["video_latents"][1:])
    text = tiny.encode_text(tiny.params, "a person")
    pred, block = tiny.denoise(tiny.params, noisy, cond, text, taps=(0, 3))
    assert set(block) == {0, 3} and pred.shape == noisy.target.shape
    loss = tiny.diffusion_loss(pred, noisy)
    changed = pred.at[0].add(100.0)  # frame 0 does not count
    assert float(tiny.diffusion_loss(changed, noisy)) == pytest.approx(float(loss), rel=1e-6)

    def objective(img):
        c, _ = tiny.condition(tiny.params, img, None)
        n = tiny.add_noise(tiny.params, c, jax.random.PRNGKey(0))
        return tiny.diffusion_loss(tiny.denoise(tiny.params, n, c, text)[0], n)

    g = jax.jit(jax.grad(objective))(x)
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_protect_runs_end_to_end_on_opensora_tiny(tmp_path, capsys):
    from pathlib import Path

    from anti_i2v_jax import cli
    from anti_i2v_jax.io import load_image

    src = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"
    assert cli.main(["protect", str(src), "--backbone", "opensora-tiny", "--steps", "20", "--out", str(tmp_path), "--quiet"]) == 0
    out, original = load_image(tmp_path / "astronaut_protected.png"), load_image(src)
    assert 0 < np.abs(out.astype(int) - original.astype(int)).max() <= 16
    report = json.loads((tmp_path / "astronaut_report.json").read_text())
    assert report["backbone"] == "opensora-tiny" and len(report["history"]["dm"]) == 20


def test_generate_on_opensora_tiny(tmp_path, capsys):
    from pathlib import Path

    from PIL import Image

    from anti_i2v_jax import cli

    src = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"
    assert cli.main(["generate", str(src), "--prompt", "a person", "--backbone", "opensora-tiny", "--steps", "2",
                     "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "opensora-tiny" / "astronaut_video.gif").size == (64, 64)


def test_convert_then_load_round_trips(tmp_path, capsys):
    from fixtures import case_dirs

    from anti_i2v_jax.backbones.opensora import load_converted
    from anti_i2v_jax.backbones.opensora.stdit3 import stack_pairs

    cases = case_dirs("opensora")
    if not cases:
        pytest.skip("set ANTI_I2V_FIXTURES")
    case = cases[0]
    assert convert_main.main(["opensora", "--stdit", str(case / "stdit3"), "--vae", str(case / "vae"),
                              "--dst", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    backbone = load_converted(tmp_path / "out")
    _, _, direct, _ = conv.load(case / "stdit3", case / "vae")
    # loaded for a real-size run: the pairs stacked for the scanned, rematerialised stack
    assert backbone.config.stdit.scan_layers and backbone.config.stdit.remat
    direct["stdit"] = stack_pairs(direct["stdit"], backbone.config.stdit.depth)
    assert jax.tree.structure(backbone.params) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(backbone.params), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)
