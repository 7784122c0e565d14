"""DynamiCrafter against the golden upstream cases (every listed output, from .ckpt and .safetensors), the .ckpt
reader (and its refusal of code), the converter's rules and the CLIP head."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import assert_close, case_dirs, load_case, output_params

from anti_i2v_jax.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "golden"))
from seeded import materialise  # noqa: E402  (golden cases with seeded weights)

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

try:
    import torch
except ImportError:  # the .ckpt paths need the torch extra; the .safetensors ones do not
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="reading .ckpt files needs the torch extra")
FILES = [pytest.param("model.ckpt", marks=needs_torch), "model.safetensors"]

CASES = case_dirs("dynamicrafter")


@functools.cache
def _meta(case: Path) -> dict:
    import json

    return json.loads((case / "case.json").read_text())


def _weights_root(case: Path) -> Path:
    """The case folder that holds ``case``'s weights: its own, or the one its ``weights_from`` names (the same
    tiny model run on other inputs)."""
    base = _meta(case).get("weights_from")
    return (case / base).resolve() if base else case


def weights(case: Path, file_name: str) -> Path:
    """The checkpoint file of ``case`` (from :func:`_weights_root`); for a case with seeded weights
    (``seeded_weights``), the file ``tools/golden/seeded.py`` builds from its keys, seed and buffers."""
    root = _weights_root(case)
    seeded = materialise(root)
    return seeded if seeded is not None and seeded.name == file_name else root / file_name


def _has_weights(case: Path, file_name: str) -> bool:
    """Whether ``weights(case, file_name)`` gives a file, without building a seeded one (that needs torch for a
    .ckpt, which a test marked needs_torch then skips)."""
    root = _weights_root(case)
    seeded = _meta(root).get("seeded_weights")
    return seeded["file"] == file_name if seeded else (root / file_name).exists()
needs_case = pytest.mark.skipif(not CASES, reason="no dynamicrafter cases: set ANTI_I2V_FIXTURES")


class _RunsCode:
    """Unpickling this calls os.system: a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@needs_torch
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from weights_convert.core import TorchCheckpointSource

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match="could run code") as e:
        TorchCheckpointSource(path)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert not marker.exists(), "the payload ran"


@needs_torch
def test_lightning_style_metadata_becomes_inert(tmp_path):
    import argparse

    from weights_convert.core import TorchCheckpointSource

    # A class from a data-only module (as Lightning/omegaconf hyper-parameters are) that weights_only refuses.

    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"model.w": torch.arange(3.0)}, "hparams": argparse.Namespace(lr=1e-5)}, path)
    source = TorchCheckpointSource(path, prefix="model.")
    assert source.keys() == ["w"]
    np.testing.assert_array_equal(source.load("w"), [0.0, 1.0, 2.0])
    with pytest.raises(UserError, match="not a readable"):
        (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
        TorchCheckpointSource(tmp_path / "junk.ckpt")


@functools.cache
def vae_outputs(case, file_name) -> dict[str, np.ndarray]:
    import yaml

    from anti_i2v_jax.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from weights_convert.core import PrefixSource, convert
    from weights_convert.dynamicrafter import checkpoint_source, ldm_vae_rules

    ddconfig = yaml.safe_load((case / "config.yaml").read_text())["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    levels = len(ddconfig["ch_mult"])
    cfg = AutoencoderKLConfig(
        block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
        layers_per_block=ddconfig["num_res_blocks"], latent_channels=ddconfig["z_channels"], norm_num_groups=32,
    )
    taps = ("conv_in", *(f"down_blocks.{i}" for i in range(levels)), "mid_block", "conv_out")
    model = AutoencoderKL(cfg, taps=taps)
    _, inp, _ = load_case(case)
    image = inp["image"].transpose(0, 2, 3, 1)
    source = PrefixSource(checkpoint_source(weights(case, file_name)), "first_stage_model.")
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image))["params"]
    params, _ = convert(source, ldm_vae_rules(levels), abstract)
    (mean, logvar), state = model.apply({"params": params}, image, method=model.encode, mutable=["intermediates"])
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    out = {"vae.posterior_mean": nchw(mean), "vae.posterior_logvar": nchw(logvar)}
    upstream = {"conv_in": "conv_in", "mid_block": "mid", "conv_out": "conv_out",
                **{f"down_blocks.{i}": f"down.{i}" for i in range(levels)}}
    for t in taps:
        out[f"vae.enc.{upstream[t]}"] = nchw(state["intermediates"]["encoder"][f"tap:{t}"][0])
    z = inp["latent_for_decode"]  # (B, C, T, h, w), decoded frame by frame after / scale_factor
    b, c, t, h, w = z.shape
    frames = z.transpose(0, 2, 3, 4, 1).reshape(b * t, h, w, c) / 0.18215
    video = np.asarray(model.apply({"params": params}, frames, method=model.decode))
    out["vae.decode"] = video.reshape(b, t, *video.shape[1:]).transpose(0, 4, 1, 2, 3)
    return out


@functools.cache
def conditioning_outputs(case, file_name) -> dict[str, np.ndarray]:
    """CLIP preprocessing, the OpenCLIP towers and the Resampler, from the case's own config.yaml."""
    import yaml

    from anti_i2v_jax.backbones.dynamicrafter.image_encoder import (
        VisionConfig,
        VisionTower,
        clip_preprocess,
    )
    from anti_i2v_jax.backbones.dynamicrafter.resampler import (
        Resampler,
        ResamplerConfig,
    )
    from anti_i2v_jax.backbones.text.openclip_text import TextConfig, TextTower
    from weights_convert.core import PrefixSource, convert
    from weights_convert.dynamicrafter import (
        RESAMPLER_RULES,
        checkpoint_source,
        clip_text_rules,
        clip_vision_rules,
    )

    params_cfg = yaml.safe_load((case / "config.yaml").read_text())["model"]["params"]
    arch = params_cfg["cond_stage_config"]["params"]["arch"]
    vision = VisionConfig(**arch["vision_cfg"])
    text = TextConfig(**arch["text_cfg"])
    resampler = ResamplerConfig(**params_cfg["image_proj_stage_config"]["params"])
    _, inp, _ = load_case(case)
    source = checkpoint_source(weights(case, file_name))
    part = lambda prefix: PrefixSource(source, prefix)  # noqa: E731

    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    out = {}
    vt, tt, rs = VisionTower(vision, taps=tuple(range(vision.layers))), TextTower(text, taps=tuple(range(text.layers))), Resampler(resampler)
    img = clip_preprocess(inp["image"].transpose(0, 2, 3, 1))
    rules, unused = clip_vision_rules()
    head = [r"embedder\.model\.visual\.(ln_post\..*|proj)"]  # the image head: test_clip_image_head
    pv, _ = convert(part("embedder."), rules, jax.eval_shape(lambda: vt.init(jax.random.PRNGKey(0), img))["params"],
                    ignore=unused + head)
    rules, unused = clip_text_rules(text.layers)
    pt, _ = convert(part("cond_stage_model."), rules,
                    jax.eval_shape(lambda: tt.init(jax.random.PRNGKey(0), inp["text_tokens"]))["params"], ignore=unused)
    out["clip_image.preprocessed"] = nchw(img)
    tokens, st = vt.apply({"params": pv}, img, mutable=["intermediates"])
    out["clip_image.tokens"] = np.asarray(tokens)
    for i in range(vision.layers):
        out[f"clip_image.block.{i}"] = np.asarray(st["intermediates"]["transformer"][f"tap:{i}"][0])
    aa = clip_preprocess(inp["clip_aa.image"].transpose(0, 2, 3, 1))
    out["clip_aa.preprocessed"], out["clip_aa.tokens"] = nchw(aa), np.asarray(vt.apply({"params": pv}, aa))
    grey = clip_preprocess(np.zeros_like(inp["image"]).transpose(0, 2, 3, 1))
    out["uncond.clip_image.tokens"] = np.asarray(vt.apply({"params": pv}, grey))
    ctx, st = tt.apply({"params": pt}, inp["text_tokens"], mutable=["intermediates"])
    out["text.context"] = np.asarray(ctx)
    for i in range(text.layers - text.skip_last):
        out[f"text.block.{i}"] = np.asarray(st["intermediates"]["transformer"][f"tap:{i}"][0])
    out["uncond.text.context"] = np.asarray(tt.apply({"params": pt}, inp["uncond_text_tokens"]))
    pr, _ = convert(part("image_proj_model."), RESAMPLER_RULES,
                    jax.eval_shape(lambda: rs.init(jax.random.PRNGKey(0), tokens))["params"])
    out["resampler.out"] = np.asarray(rs.apply({"params": pr}, tokens))
    out["uncond.resampler.out"] = np.asarray(rs.apply({"params": pr}, out["uncond.clip_image.tokens"]))
    return out


def diffusion_config(case):
    """The case's DiffusionConfig, read from its config.yaml as the converter reads it."""
    import yaml

    from anti_i2v_jax.backbones.dynamicrafter.config import from_yaml

    return from_yaml(yaml.safe_load((case / "config.yaml").read_text()), str(case / "config.yaml")).diffusion


@functools.cache
def diffusion_outputs(case, file_name) -> dict[str, np.ndarray]:
    """z0 (our VAE's posterior mean x scale_factor, every frame), dynamic rescale, q_sample and the target, with
    the schedule built from config.yaml; first checks it against every schedule buffer the checkpoint has."""
    from anti_i2v_jax.backbones.dynamicrafter.diffusion import (
        q_sample,
        rescale_x0,
        schedule,
        target,
    )
    from weights_convert.dynamicrafter import checkpoint_source

    cfg = diffusion_config(case)
    tables = schedule(cfg)
    source = checkpoint_source(weights(case, file_name))
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        if name == "scale_arr" and name not in source.keys():
            # upstream registers the buffer only with dynamic rescale on
            assert not cfg.use_dynamic_rescale, f"{case.name}: dynamic rescale on, but the checkpoint has no scale_arr"
            continue
        np.testing.assert_array_equal(tables[name], source.load(name), err_msg=f"{case.name}: {name}")
    _, inp, _ = load_case(case)
    frames = inp["noise"].shape[2]
    mean = vae_outputs(case, file_name)["vae.posterior_mean"]
    z0 = np.repeat((cfg.scale_factor * mean)[:, :, None], frames, axis=2)
    t = np.asarray(inp["t"])  # one timestep per sample
    x_start = np.asarray(rescale_x0(tables, z0, t))
    return {"diffusion.z0": z0, "diffusion.x_start": x_start,
            "diffusion.x_t": np.asarray(q_sample(tables, x_start, inp["noise"], t)),
            "diffusion.target": np.asarray(target(cfg, tables, x_start, inp["noise"], t))}


# Upstream module names that this port's U-Net sows under another name.
UNET_ALIASES = {"framestride_embed": "fps_embedding"}


@functools.cache
def unet_outputs(case, file_name) -> dict[str, np.ndarray]:
    """The U-Net on the case's x_t with the hybrid conditioning, and the v-loss."""
    import yaml

    from anti_i2v_jax.backbones.dynamicrafter.unet import UNetConfig, UNetModel
    from weights_convert.core import PrefixSource, convert
    from weights_convert.dynamicrafter import UNET_RULES, checkpoint_source

    cfg = UNetConfig.from_ldm(yaml.safe_load((case / "config.yaml").read_text())["model"]["params"]["unet_config"]["params"])
    _, inp, expected = load_case(case)
    source = PrefixSource(checkpoint_source(weights(case, file_name)), "model.diffusion_model.")

    cond = conditioning_outputs(case, file_name)
    x_t = diffusion_outputs(case, file_name)["diffusion.x_t"].transpose(0, 2, 3, 4, 1)  # (B, T, h, w, C); checked against the port above
    z0 = expected["diffusion.z0"].transpose(0, 2, 3, 4, 1)
    x = np.concatenate([x_t, np.repeat(z0[:, :1], x_t.shape[1], axis=1)], axis=-1)
    context = np.concatenate([cond["text.context"], cond["resampler.out"]], axis=1)
    meta, _, _ = load_case(case)
    taps = tuple(UNET_ALIASES.get(n[len("unet."):], n[len("unet."):]) for n in meta["outputs"]
                 if n.startswith("unet.") and n != "unet.out")
    model = UNetModel(cfg, taps=taps)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, inp["t"], context, inp["fs"]))["params"]
    params, _ = convert(source, UNET_RULES, abstract)
    out, state = model.apply({"params": params}, x, inp["t"], context, inp["fs"], mutable=["intermediates"])
    result = {"unet.out": np.asarray(out).transpose(0, 4, 1, 2, 3)}
    for name in meta["outputs"]:  # keyed by the case's own names (either spelling of an aliased module)
        if name.startswith("unet.") and name != "unet.out":
            v = np.asarray(state["intermediates"][f"tap:{UNET_ALIASES.get(name[5:], name[5:])}"][0])
            result[name] = v.transpose(0, 3, 1, 2) if v.ndim == 4 else v
    result["loss"] = np.asarray(np.mean((result["unet.out"] - expected["diffusion.target"]) ** 2))
    return result


@functools.cache
def ddim_outputs(case, file_name) -> dict[str, np.ndarray]:
    """Every DDIM run the case lists under settings.ddim_runs (steps, CFG scale, guidance rescale, spacing), with
    the case's own schedule and parameterisation."""
    import jax.numpy as jnp
    import yaml

    from anti_i2v_jax.backbones.dynamicrafter.diffusion import ddim_sample, schedule
    from anti_i2v_jax.backbones.dynamicrafter.unet import UNetConfig, UNetModel
    from weights_convert.core import PrefixSource, convert
    from weights_convert.dynamicrafter import UNET_RULES, checkpoint_source

    meta, inp, _ = load_case(case)
    cfg = UNetConfig.from_ldm(yaml.safe_load((case / "config.yaml").read_text())["model"]["params"]["unet_config"]["params"])
    source = PrefixSource(checkpoint_source(weights(case, file_name)), "model.diffusion_model.")
    cond = conditioning_outputs(case, file_name)
    contexts = {
        True: np.concatenate([cond["text.context"], cond["resampler.out"]], axis=1),
        False: np.concatenate([cond["uncond.text.context"], cond["uncond.resampler.out"]], axis=1),
    }
    z0 = diffusion_outputs(case, file_name)["diffusion.z0"].transpose(0, 2, 3, 4, 1)
    c_concat = np.repeat(z0[:, :1], z0.shape[1], axis=1)
    x_T = inp["noise"].transpose(0, 2, 3, 4, 1)
    model = UNetModel(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.concatenate([x_T, c_concat], -1),
                                                 inp["t"], contexts[True], inp["fs"]))["params"]
    params, _ = convert(source, UNET_RULES, abstract)
    apply = jax.jit(lambda x, t, ctx: model.apply({"params": params}, jnp.concatenate([x, c_concat], -1),
                                                  jnp.full((len(x_T),), t), ctx, inp["fs"]))
    dcfg = diffusion_config(case)
    out = {}
    for run in meta["settings"]["ddim_runs"]:
        assert run.get("eta", 0.0) == 0.0, f"{case.name}: DDIM with eta > 0 needs torch's RNG; not comparable"
        x = ddim_sample(lambda x, t, c: apply(x, t, contexts[c]), x_T, dcfg, schedule(dcfg), steps=run["steps"],
                        guidance_scale=run["cfg_scale"], guidance_rescale=run.get("guidance_rescale", 0.0),
                        spacing=run.get("timestep_spacing", "uniform"))
        out[f"{run['name']}.x0"] = np.asarray(x).transpose(0, 4, 1, 2, 3)
    return out


# Which computation produces an output, by the output's name (the case.json contract).
GROUPS = (
    (("vae.",), vae_outputs),
    (("clip_image.", "clip_aa.", "text.", "uncond.", "resampler."), conditioning_outputs),
    (("diffusion.",), diffusion_outputs),
    (("unet.", "loss"), unet_outputs),
    (("ddim",), ddim_outputs),
)


def ours(case, file_name, output) -> np.ndarray:
    for prefixes, compute in GROUPS:
        if output.startswith(prefixes):
            got = compute(case, file_name)
            assert output in got, f"{case.name}: {output} is listed but {compute.__name__} does not produce it"
            return got[output]
    raise AssertionError(f"{case.name}: no check computes the listed output {output!r}")


def _case_file_params():
    """(case, output, checkpoint file) for every listed output and every checkpoint file the case has."""
    out = []
    for param in output_params("dynamicrafter"):
        case, output = param.values
        if case is None:
            return [pytest.param(None, None, None, id=param.id, marks=param.marks)]
        for f in FILES:
            name = f.values[0] if hasattr(f, "values") else f
            if _has_weights(case, name):
                marks = list(getattr(f, "marks", ()))
                if _meta(case).get("weights_from") and _meta(case).get("shapes", {}).get("B", 1) == 1:
                    marks.append(pytest.mark.heavy)  # another frame count on another case's model: CI time
                out.append(pytest.param(case, output, name, id=f"{param.id}:{name}", marks=marks))
    return out


@pytest.mark.parametrize("case, output, file_name", _case_file_params())
def test_every_listed_output_matches_upstream(case, output, file_name):
    """Each output every case lists (outputs, depths, DDIM runs and settings all read from the case)."""
    meta, _, expected = load_case(case)
    assert_close(ours(case, file_name, output), expected[output], meta["tolerance"], f"{case.name}: {output}")


def _keys_dir():
    from headers import KEYS

    return KEYS


def test_dry_run_maps_every_full_size_512_tensor(tmp_path, capsys):
    from headers import needs_keys, read_keys, write_header_only

    if needs_keys.args[0]:
        pytest.skip("key lists not found")
    from weights_convert import __main__ as convert_main

    write_header_only(tmp_path / "model.safetensors", read_keys("dynamicrafter_512_keys.txt"), "F32")
    config = _keys_dir() / "dynamicrafter_inference_512_v1.0.yaml"
    assert convert_main.main(["dynamicrafter", "--src", str(tmp_path / "model.safetensors"), "--config", str(config),
                              "--dry-run"]) == 0
    # 2520 tensors: 13 schedule buffers and the unused CLIP parts (text projection, logit scales, the last text
    # block, the image embedder's copy of the text tower, ln_post / proj) are checked or listed, not stored
    line = capsys.readouterr().out.strip()
    mapped, ignored = (int(x) for x in __import__("re").findall(r"mapped (\d+) tensors, ignored (\d+)", line)[0])
    assert mapped + ignored == 2520 and line.endswith("missing 0, unexpected 0")


@needs_case
@needs_torch
def test_convert_then_load_round_trips(tmp_path, capsys):
    from anti_i2v_jax.backbones.dynamicrafter import load_converted
    from weights_convert import __main__ as convert_main
    from weights_convert import dynamicrafter as conv

    cases = [c for c in CASES if _has_weights(c, "model.ckpt") and not _meta(c).get("weights_from")]
    assert cases, "no case with a Lightning .ckpt"
    for case in cases:  # the .ckpt through the CLI, vs a direct load
        capsys.readouterr()
        out = tmp_path / case.name
        assert convert_main.main(["dynamicrafter", "--src", str(weights(case, "model.ckpt")), "--config",
                                  str(case / "config.yaml"), "--dst", str(out), "--dtype", "float32"]) == 0
        _round_trip_equals(load_converted(out, "dynamicrafter-512"),
                           conv.load(weights(case, "model.ckpt"), case / "config.yaml")[1])


def _round_trip_equals(backbone, direct):
    from anti_i2v_jax.backbones.dynamicrafter import scan_layout

    # the loaded backbone holds the CLIP tower's blocks stacked for its scan (real-size execution)
    assert "resblocks" in backbone.params["clip_image"]["transformer"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), backbone.params,
                 scan_layout(direct, backbone.config))
    # no tokenizer was converted: the prompt path refuses clearly
    with pytest.raises(ValueError, match="no tokenizer"):
        backbone.encode_text(backbone.params, "a dog")


@pytest.mark.heavy  # ~30-70 s end to end; the CLI, geometry and device tests cover the path in CI
def test_protect_and_generate_on_dynamicrafter_tiny(tmp_path, capsys):
    from pathlib import Path

    from anti_i2v_jax import cli
    from anti_i2v_jax.io import load_image

    src = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"
    assert cli.main(["protect", str(src), "--backbone", "dynamicrafter-tiny", "--steps", "2", "--out", str(tmp_path), "--quiet"]) == 0
    out, original = load_image(tmp_path / "astronaut_protected.png"), load_image(src)
    assert 0 < np.abs(out.astype(int) - original.astype(int)).max() <= 16
    assert cli.main(["generate", str(src), "--prompt", "a person", "--backbone", "dynamicrafter-tiny", "--steps", "2",
                     "--out", str(tmp_path)]) == 0


def test_full_size_512_shapes_match_the_key_list():
    from headers import KEYS, needs_keys, read_keys

    if needs_keys.args[0]:
        pytest.skip("key lists not found")
    import yaml

    from anti_i2v_jax.backbones.dynamicrafter import abstract_params, from_yaml
    from weights_convert.core import DictSource, convert
    from weights_convert.dynamicrafter import rules_for

    class Shapes(DictSource):
        def shape(self, key):
            return self._t[key]

    config = from_yaml(yaml.safe_load((KEYS / "dynamicrafter_inference_512_v1.0.yaml").read_text()))
    assert (config.height, config.width, config.frames) == (320, 512, 16)
    rules, unused = rules_for(config)
    _, report = convert(Shapes(read_keys("dynamicrafter_512_keys.txt")), rules, abstract_params(config), ignore=unused,
                        dry_run=True)
    assert report.mapped > 2400 and not report.missing


@pytest.mark.heavy
def test_unet_remat_equals_plain():
    import dataclasses

    from anti_i2v_jax.backbones.dynamicrafter import tiny_backbone
    from anti_i2v_jax.backbones.dynamicrafter.unet import UNetModel

    bb = tiny_backbone(seed=4)
    cfg = bb.config.unet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cfg.temporal_length, 16, 16, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77 + 16 * cfg.temporal_length, cfg.context_dim)).astype(np.float32)
    t, fs = np.array([500]), np.array([10])

    def run(model):
        def f(xx):
            return model.apply({"params": bb.params["unet"]}, xx, t, ctx, fs).sum()

        # jitted: op-by-op remat through the whole U-Net took over a minute
        return jax.jit(lambda xx: model.apply({"params": bb.params["unet"]}, xx, t, ctx, fs))(x), jax.jit(jax.grad(f))(x)

    out, grad = run(UNetModel(cfg))
    out2, grad2 = run(UNetModel(dataclasses.replace(cfg, remat=True)))
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad2, grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key, value", [("use_linear", False), ("temporal_selfatt_only", False),
                                        ("use_relative_position", True), ("use_causal_attention", True)])
def test_unet_options_no_checkpoint_uses_are_refused(key, value):
    """Options the yaml allows but no release sets (the port would otherwise compute something else) are errors."""
    from anti_i2v_jax.backbones.dynamicrafter.unet import UNetConfig

    assert UNetConfig.from_ldm({"transformer_depth": 2}).transformer_depth == 2
    with pytest.raises(UserError, match=key):
        UNetConfig.from_ldm({key: value})


@pytest.mark.parametrize("content, message", [
    (None, "no such config file"),
    ("model: [1, 2", "not valid YAML"),
    ("foo: 1", "not a DynamiCrafter inference config"),
    ("model:\n  params:\n    timesteps: 1000\n", "malformed DynamiCrafter config"),
])
def test_bad_config_yaml_is_one_line(tmp_path, capsys, content, message):
    from weights_convert import __main__ as convert_main

    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"")
    code = convert_main.main(["dynamicrafter", "--src", str(src), "--config", str(config), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err  # bad input: one line, exit 2


@needs_case
def test_convert_keeps_the_openclip_vocabulary_and_refuses_a_bad_one(tmp_path, capsys):
    """--tokenizer takes open_clip's .gz itself; only the vocabulary is kept; a bad one fails before any work."""
    import gzip

    from anti_i2v_jax.backbones.dynamicrafter import load_converted
    from anti_i2v_jax.backbones.text.openclip_tokenizer import OpenCLIPTokenizer
    from weights_convert import __main__ as convert_main

    vocab = Path(__file__).parent / "data" / "openclip" / "bpe_simple_vocab_16e6.txt.gz"
    case = next(c for c in CASES if _has_weights(c, "model.safetensors"))
    args = ["dynamicrafter", "--src", str(weights(case, "model.safetensors")), "--config", str(case / "config.yaml"),
            "--dtype", "float32"]
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"not a merges file\n"))
    capsys.readouterr()
    assert convert_main.main([*args, "--tokenizer", str(bad), "--dst", str(tmp_path / "no")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "no").exists()

    out = tmp_path / "with-vocab"
    assert convert_main.main([*args, "--tokenizer", str(vocab), "--dst", str(out)]) == 0
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [vocab.name]
    backbone = load_converted(out, "dynamicrafter-1024")
    ids = OpenCLIPTokenizer(vocab, backbone.config.text.context_length)("a dog running")
    np.testing.assert_array_equal(backbone.tokenizer("a dog running"), ids)
    assert ids[0] == 49406 and 49407 in ids


@needs_case
@pytest.mark.parametrize("case", [c for c in CASES if _has_weights(c, "model.safetensors")][:1] or CASES[:1],
                         ids=lambda c: c.name)
def test_clip_image_head_is_open_clips_image_embedding(case):
    """The converter keeps the image tower's ln_post and proj (DynamiCrafter never runs them) as ``clip_head``, and
    ``image_embedding`` is open_clip's ``encode_image``: LayerNorm(class token) @ proj, recomputed here in numpy from
    the checkpoint's own tensors."""
    from anti_i2v_jax.backbones.dynamicrafter import DynamiCrafterBackbone
    from anti_i2v_jax.backbones.dynamicrafter.image_encoder import (
        VisionTower,
        clip_preprocess,
    )
    from weights_convert import dynamicrafter as conv

    name = "model.safetensors" if _has_weights(case, "model.safetensors") else "model.ckpt"
    config, params, _ = conv.load(weights(case, name), case / "config.yaml")
    source = conv.checkpoint_source(weights(case, name))
    w = {k: np.asarray(source.load(f"embedder.model.visual.{k}"), np.float64) for k in ("ln_post.weight", "ln_post.bias", "proj")}
    assert params["clip_head"]["proj"].shape == (config.vision.width, config.vision.embed_dim) == w["proj"].shape
    bb = DynamiCrafterBackbone(name=case.name, config=config, params=params)
    x = np.random.default_rng(0).uniform(size=(*bb.model_size, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(bb.image_embedding(params, x))
        tokens = np.asarray(VisionTower(config.vision).apply({"params": params["clip_image"]},
                                                             clip_preprocess(bb.preprocess(x)[None])), np.float64)
    cls = tokens[0, 0]
    ln = (cls - cls.mean()) / np.sqrt(cls.var() + 1e-5) * w["ln_post.weight"] + w["ln_post.bias"]
    np.testing.assert_allclose(got, ln @ w["proj"], rtol=1e-4, atol=1e-5)
    # the condition carries the same embedding (the CLIP terms reuse its tower pass), with or without the head
    cond, _ = bb.condition(params, x, None)
    np.testing.assert_allclose(cond["clip_embedding"], got, rtol=1e-6, atol=1e-7)
    del params["clip_head"]  # weights converted before the head was kept: the bare class token
    np.testing.assert_allclose(bb.image_embedding(params, x), cls, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bb.condition(params, x, None)[0]["clip_embedding"], cls, rtol=1e-4, atol=1e-5)


@needs_case
@needs_torch
def test_an_openclip_file_gives_other_backbones_the_clip_terms(tmp_path):
    """An open_clip checkpoint (here the image/text towers of a case, saved under open_clip's own key names) loads
    with every key checked, embeds an image as DynamiCrafter's own tower does with the same weights, and gives
    cogvideox-tiny the CLIP terms, computed from the step's own parameters."""
    import yaml

    from anti_i2v_jax import AttackConfig, resolve_terms
    from anti_i2v_jax.backbones.dynamicrafter import DynamiCrafterBackbone
    from anti_i2v_jax.backbones.registry import load
    from anti_i2v_jax.nn import openclip_image
    from weights_convert import dynamicrafter as conv

    case = next(c for c in CASES if _has_weights(c, "model.safetensors") or _has_weights(c, "model.ckpt"))
    name = "model.safetensors" if _has_weights(case, "model.safetensors") else "model.ckpt"
    source = conv.checkpoint_source(weights(case, name))
    state = {k[len("embedder.model."):]: torch.from_numpy(np.ascontiguousarray(source.load(k)))
             for k in source.keys() if k.startswith("embedder.model.")}
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    arch = yaml.safe_load((case / "config.yaml").read_text())["model"]["params"]["img_cond_stage_config"]["params"]["arch"]
    model = openclip_image.load(tmp_path / "open_clip_pytorch_model.bin", arch)

    config, params, _ = conv.load(weights(case, name), case / "config.yaml")
    dc = DynamiCrafterBackbone(name=case.name, config=config, params=params)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(*dc.model_size, 3)).astype(np.float32))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(model(model.params, x), dc.image_embedding(params, x), rtol=1e-4, atol=1e-5)

    del state["visual.proj"]
    torch.save(state, tmp_path / "no_proj.bin")
    with pytest.raises(UserError, match="head/proj"):
        openclip_image.load(tmp_path / "no_proj.bin", arch)

    cog = load("cogvideox-tiny").with_clip(model)
    assert resolve_terms(cog, AttackConfig.for_method("vgmshield"))[0].term_names == ("vgm_vae", "vgm_clip")
    assert "aux" in resolve_terms(cog, AttackConfig())[0].term_names
    with jax.default_matmul_precision("highest"):  # the step's own call: the encoder's weights among attack_params
        np.testing.assert_allclose(cog.image_embedding(cog.attack_params, x), model(model.params, x), rtol=1e-5, atol=1e-6)
