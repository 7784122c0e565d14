"""DynamiCrafter, so far: the .ckpt reader (and its refusal of code), and the first-stage KL autoencoder
(LDM key names onto the shared Flax AutoencoderKL) against the golden case, from .ckpt and .safetensors."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from fixtures import assert_close, case_dirs, load_case

from anti_i2v_jax.errors import UserError

torch = pytest.importorskip("torch", reason="reading .ckpt files needs the torch extra")

CASES = case_dirs("dynamicrafter")
needs_case = pytest.mark.skipif(not CASES, reason="no dynamicrafter cases: set ANTI_I2V_FIXTURES")


class _RunsCode:
    """Unpickling this calls os.system: a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from weights_convert.core import TorchCheckpointSource

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match="could run code") as e:
        TorchCheckpointSource(path)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert not marker.exists(), "the payload ran"


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
    from weights_convert.core import SafetensorsSource, TorchCheckpointSource, convert
    from weights_convert.dynamicrafter import ldm_vae_rules

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
    path = case / file_name
    source = TorchCheckpointSource(path) if path.suffix == ".ckpt" else SafetensorsSource(path)

    class FirstStage:
        def keys(self):
            return [k for k in source.keys() if k.startswith("first_stage_model.")]

        shape, load = staticmethod(source.shape), staticmethod(source.load)

    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image))["params"]
    params, _ = convert(FirstStage(), ldm_vae_rules(levels), abstract)
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


VAE_OUTPUTS = ["vae.posterior_mean", "vae.posterior_logvar", "vae.enc.conv_in", "vae.enc.down.0", "vae.enc.down.1",
               "vae.enc.down.2", "vae.enc.mid", "vae.enc.conv_out", "vae.decode"]


@needs_case
@pytest.mark.parametrize("file_name", ["model.ckpt", "model.safetensors"])
@pytest.mark.parametrize("output", VAE_OUTPUTS)
def test_first_stage_vae_matches_upstream(file_name, output):
    for case in CASES:
        meta, _, expected = load_case(case)
        if output in expected:
            assert_close(vae_outputs(case, file_name)[output], expected[output], meta["tolerance"], f"{case.name}: {output}")
