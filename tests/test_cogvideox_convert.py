"""The CogVideoX converter: dry runs on header-only full-size checkpoints, mismatches, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from fixtures import case_dirs
from headers import KEYS, needs_keys, read_keys, write_header_only

from anti_i2v_jax.backbones.cogvideox import config as configs
from anti_i2v_jax.errors import UserError
from weights_convert import __main__ as convert_main
from weights_convert import cogvideox as conv

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it


def build_folder(root: Path, variant: str) -> tuple[Path, int, int]:
    """A diffusers folder of header-only files with the full-size key lists; returns (path, mapped, ignored)."""
    real = json.loads((KEYS / "cogvideox_real_configs.json").read_text())
    tag = {"5b": "CogVideoX-5b-I2V", "1.5": "CogVideoX1.5-5B-I2V"}[variant]
    tr_keys = read_keys({"5b": "cogvideox_5b_i2v_transformer_keys.txt", "1.5": "cogvideox1.5_5b_i2v_transformer_keys.txt"}[variant])
    vae_keys, t5_keys = read_keys("cogvideox_vae_keys.txt"), read_keys("t5_v1_1_xxl_encoder_keys.txt")
    src = root / tag
    for sub in ("transformer", "vae", "text_encoder", "scheduler"):
        (src / sub).mkdir(parents=True)
    (src / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXImageToVideoPipeline"}))
    (src / "transformer" / "config.json").write_text(json.dumps(real[f"transformer_{tag}"]))
    (src / "vae" / "config.json").write_text(json.dumps(real[f"vae_{tag}"]))
    (src / "text_encoder" / "config.json").write_text(json.dumps({
        "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
        "model_type": "t5", "architectures": ["T5EncoderModel"],
    }))
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
        "timestep_spacing": "trailing",
    }))
    names = list(tr_keys)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for fname, keys in shards.items():
        write_header_only(src / "transformer" / fname, {k: tr_keys[k] for k in keys})
    (src / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    write_header_only(src / "vae" / "diffusion_pytorch_model.safetensors", vae_keys, "F32")
    write_header_only(src / "text_encoder" / "model.safetensors", t5_keys)
    ignored = 1  # encoder.embed_tokens.weight, the tied copy of shared.weight
    return src, len(tr_keys) + len(vae_keys) + len(t5_keys) - ignored, ignored


@needs_keys
@pytest.mark.parametrize("variant", ["5b", "1.5"])
def test_dry_run_maps_every_full_size_tensor(tmp_path, capsys, variant):
    src, mapped, ignored = build_folder(tmp_path, variant)
    assert convert_main.main(["cogvideox", "--src", str(src), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"mapped {mapped} tensors, ignored {ignored}, missing 0, unexpected 0"]


@needs_keys
def test_full_size_shapes_match_the_key_lists():
    """jax.eval_shape of the full-size presets, leaf by leaf against the key lists (through the rule table)."""
    from weights_convert.core import DictSource, convert

    class Shapes(DictSource):
        def shape(self, key):
            return self._t[key]

    for preset, keys in [(configs.cogvideox_5b_i2v(), "cogvideox_5b_i2v_transformer_keys.txt"),
                         (configs.cogvideox15_5b_i2v(), "cogvideox1.5_5b_i2v_transformer_keys.txt")]:
        from anti_i2v_jax.backbones.cogvideox.backbone import abstract_params

        abstract = abstract_params(preset)
        _, report = convert(Shapes(read_keys(keys)), conv.TRANSFORMER_RULES, abstract["transformer"], dry_run=True)
        assert report.mapped == len(read_keys(keys))
        _, report = convert(Shapes(read_keys("cogvideox_vae_keys.txt")), conv.VAE_RULES, abstract["vae"], dry_run=True)
        assert report.mapped == 436
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["transformer"]))
        assert n_params == (5_625_087_552 if preset.transformer.use_learned_positional_embeddings else 5_571_594_880)
    from anti_i2v_jax.backbones.text.t5 import t5_v1_1_xxl

    _, report = convert(Shapes(read_keys("t5_v1_1_xxl_encoder_keys.txt")), conv.T5_RULES,
                        conv.t5_abstract(t5_v1_1_xxl()), ignore=conv.T5_IGNORED, dry_run=True)
    assert report.mapped == 219


@needs_keys
def test_a_mismatch_exits_1_listing_both_sets(tmp_path, capsys):
    src, _, _ = build_folder(tmp_path, "5b")
    vae = read_keys("cogvideox_vae_keys.txt")
    vae.pop("encoder.norm_out.weight")
    vae["encoder.extra.weight"] = (3,)
    vae["encoder.conv_in.conv.bias"] = (64,)
    write_header_only(src / "vae" / "diffusion_pytorch_model.safetensors", vae, "F32")
    assert convert_main.main(["cogvideox", "--src", str(src), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "encoder.extra.weight" in err and "encoder/norm_out/scale" in err and "encoder.conv_in.conv.bias (64,)" in err


def test_unknown_config_keys_are_refused():
    with pytest.raises(UserError, match="unknown config keys \\['use_magic'\\]"):
        configs.TransformerConfig.from_diffusers({"num_layers": 2, "use_magic": True})
    with pytest.raises(UserError, match="not supported"):
        configs.VAEConfig.from_diffusers({"use_quant_conv": True})


@pytest.mark.parametrize("case", case_dirs("cogvideox") or [pytest.param(None, marks=pytest.mark.skip(reason="set ANTI_I2V_FIXTURES"))])
def test_convert_then_load_round_trips(tmp_path, case, capsys):
    from anti_i2v_jax.backbones.cogvideox import load_converted
    from anti_i2v_jax.backbones.cogvideox.transformer import stack_blocks

    assert convert_main.main(["cogvideox", "--src", str(case), "--dst", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert "missing 0, unexpected 0; wrote" in capsys.readouterr().out
    backbone = load_converted(tmp_path / "out")
    _, _, direct, _ = conv.load_diffusers(case, with_text=False)
    # loaded for a real-size run: the blocks stacked for the scanned, rematerialised stack
    assert backbone.config.transformer.scan_layers and backbone.config.transformer.remat
    direct["transformer"] = stack_blocks(direct["transformer"], backbone.config.transformer.num_layers)
    assert jax.tree.structure(backbone.params) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(backbone.params), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert backbone.name == ("cogvideox1.5-5b-i2v" if backbone.config.transformer.is_v15 else "cogvideox-5b-i2v")
    assert convert_main.main(["cogvideox", "--src", str(case), "--dst", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("case", case_dirs("cogvideox") or [pytest.param(None, marks=pytest.mark.skip(reason="set ANTI_I2V_FIXTURES"))])
def test_bfloat16_weights_load_and_run(tmp_path, case, capsys):
    import jax.numpy as jnp

    from anti_i2v_jax.backbones.cogvideox import load_converted

    assert convert_main.main(["cogvideox", "--src", str(case), "--dst", str(tmp_path / "bf16")]) == 0
    backbone = load_converted(tmp_path / "bf16")
    assert {a.dtype for a in jax.tree.leaves(backbone.params)} == {jnp.dtype(jnp.bfloat16)}
    cond, _ = backbone.condition(backbone.params, jnp.full((64, 96, 3), 0.5), None)
    assert np.isfinite(np.asarray(cond["image_latents"], np.float32)).all()
