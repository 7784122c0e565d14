"""Golden cases for DynamiCrafter, computed by the upstream PyTorch code (Doubiiu/DynamiCrafter) on a tiny,
randomly initialised model. Format: tests/golden/README.md.

Runs in a Python environment that can import the upstream repository (torch, open_clip_torch 2.22,
kornia, omegaconf, pytorch_lightning), NOT the project venv:

    python tools/golden/dynamicrafter.py --upstream /path/to/DynamiCrafter --style 256 --case tiny-256-eps
    python tools/golden/dynamicrafter.py --upstream /path/to/DynamiCrafter --style 1024 --case tiny-1024
    # another frame count or batch size on an existing case's weights (its checkpoint is referenced, not copied)
    python tools/golden/dynamicrafter.py --upstream /path/to/DynamiCrafter --weights-from tests/golden/dynamicrafter/tiny-1024 --frames 6 --case tiny-1024-frames6
    python tools/golden/dynamicrafter.py --upstream /path/to/DynamiCrafter --weights-from tests/golden/dynamicrafter/tiny-1024 --batch 2 --case tiny-1024-batch2
    # recompute an existing case from its own files and compare with its outputs.safetensors
    python tools/golden/dynamicrafter.py --upstream /path/to/DynamiCrafter --check DIR

Nothing from upstream is copied here: the model, the encoders, q_sample / p_losses and the DDIM sampler are
the upstream objects, driven through forward hooks. The only changes to upstream behaviour, all
deterministic stand-ins that keep the maths: tools/upstream/stubs.py (import-only stand-ins),
``DDIMSampler.register_buffer`` keeps tensors on the CPU (upstream moves them to CUDA), xformers is reported
unavailable to lvdm.modules.attention (plain torch attention), and, while z0 is
encoded, the VAE posterior's ``sample()`` returns its mean (no torch RNG).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "upstream"))
from hooks import recorded, version  # noqa: E402  (shared by the generators)

sys.path.insert(0, str(REPO / "tools" / "golden"))
from seeded import materialise, seeded_weights  # noqa: E402

UPSTREAM_COMMIT = "c453369"
T_FRAMES = 4
TEXT_CTX = 77

# ----------------------------------------------------------------------------------------------------------
# Configs: tiny versions of configs/inference_{256,512,1024}_v1.0.yaml.


def _clip_arch(vision_layers: int) -> dict:
    return {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 224, "layers": vision_layers, "width": 48, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": TEXT_CTX, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 3},
    }


def make_config(style: str) -> dict:
    """The model config (the ``model:`` tree of the inference yaml) of a tiny model in the given style."""
    if style == "256":
        latent_hw = [12, 12]
        unet = dict(model_channels=64, attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 1],
                    num_head_channels=16, context_dim=64, default_fs=3,
                    image_cross_attention_scale_learnable=True)
        vae = dict(ch=32, ch_mult=[1, 1, 1], num_res_blocks=1)
        vision_layers = 2
        top = {}
    elif style in ("512", "1024"):
        latent_hw = [8, 16] if style == "1024" else [10, 16]
        unet = dict(model_channels=32, attention_resolutions=[4, 1], num_res_blocks=2, channel_mult=[1, 2, 2],
                    num_head_channels=16, context_dim=64, default_fs=10 if style == "1024" else 24)
        vae = dict(ch=32, ch_mult=[1, 1, 1, 2], num_res_blocks=1)
        vision_layers = 3
        top = dict(rescale_betas_zero_snr=True, parameterization="v")
    else:
        raise SystemExit(f"unknown style {style}")
    unet_params = {
        "in_channels": 8, "out_channels": 4, "model_channels": unet["model_channels"],
        "attention_resolutions": unet["attention_resolutions"], "num_res_blocks": unet["num_res_blocks"],
        "channel_mult": unet["channel_mult"], "dropout": 0.0, "num_head_channels": unet["num_head_channels"],
        "transformer_depth": 1, "context_dim": unet["context_dim"], "use_linear": True, "use_checkpoint": False,
        "temporal_conv": True, "temporal_attention": True, "temporal_selfatt_only": True,
        "use_relative_position": False, "use_causal_attention": False, "temporal_length": T_FRAMES,
        "addition_attention": True, "image_cross_attention": True,
    }
    if unet.get("image_cross_attention_scale_learnable"):
        unet_params["image_cross_attention_scale_learnable"] = True
    unet_params.update({"default_fs": unet["default_fs"], "fs_condition": True})
    params = {
        **top,
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "timesteps": 1000,
        "first_stage_key": "video", "cond_stage_key": "caption", "cond_stage_trainable": False,
        "conditioning_key": "hybrid", "image_size": latent_hw, "channels": 4, "scale_by_std": False,
        "scale_factor": 0.18215, "use_ema": False, "uncond_type": "empty_seq",
    }
    if style == "512":
        params.update(use_dynamic_rescale=True, base_scale=0.7, fps_condition_type="fps", perframe_ae=True)
    if style == "1024":
        params.update(use_dynamic_rescale=True, base_scale=0.3, fps_condition_type="fps", perframe_ae=True)
    arch = _clip_arch(vision_layers)
    text_width = arch["text_cfg"]["width"]
    assert unet_params["context_dim"] == text_width
    params.update({
        "unet_config": {"target": "lvdm.modules.networks.openaimodel3d.UNetModel", "params": unet_params},
        "first_stage_config": {
            "target": "lvdm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4, "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                             "ch": vae["ch"], "ch_mult": vae["ch_mult"], "num_res_blocks": vae["num_res_blocks"],
                             "attn_resolutions": [], "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": {"target": "lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder",
                              "params": {"arch": copy.deepcopy(arch), "version": None, "freeze": True,
                                         "layer": "penultimate"}},
        "img_cond_stage_config": {"target": "lvdm.modules.encoders.condition.FrozenOpenCLIPImageEmbedderV2",
                                  "params": {"arch": copy.deepcopy(arch), "version": None, "freeze": True}},
        "image_proj_stage_config": {"target": "lvdm.modules.encoders.resampler.Resampler",
                                    "params": {"dim": 40, "depth": 2, "dim_head": 8, "heads": 3, "num_queries": 16,
                                               "embedding_dim": arch["vision_cfg"]["width"],
                                               "output_dim": text_width, "ff_mult": 2,
                                               "video_length": T_FRAMES}},
    })
    return {"model": {"target": "lvdm.models.ddpm3d.LatentVisualDiffusion", "params": params}}


def write_config(config: dict, path: Path, style: str) -> None:
    import yaml

    head = (
        f"# DynamiCrafter golden-case model config (tiny random weights), shape of configs/inference_{style}_v1.0.yaml.\n"
        "# cond_stage_config/img_cond_stage_config params.arch is the open_clip model_cfg dict (open_clip's own JSON format,\n"
        "# as in open_clip/model_configs/ViT-H-14.json) instead of a registry name; version: null = no pretrained download.\n"
    )
    path.write_text(head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110))


# ----------------------------------------------------------------------------------------------------------
# Upstream model


def import_upstream(upstream: Path) -> None:
    sys.path.insert(0, str(REPO / "tools" / "upstream"))
    import stubs

    stubs.install()
    sys.path.insert(0, str(upstream))


def build_model(config: dict):
    """instantiate_from_config on the config, with each ``arch`` dict registered in open_clip's registry."""
    import lvdm.modules.attention
    import open_clip.factory
    from omegaconf import OmegaConf
    from utils.utils import instantiate_from_config

    # no xformers: the plain torch attention path (CrossAttention.forward), as the public case; the xformers
    # stand-in of tools/upstream/stubs.py takes (B, L, H, D) and upstream's efficient_forward passes (B*H, L, D)
    lvdm.modules.attention.XFORMERS_IS_AVAILBLE = False
    config = copy.deepcopy(config)
    params = config["model"]["params"]
    for key in ("cond_stage_config", "img_cond_stage_config"):
        arch = params[key]["params"].get("arch")
        if isinstance(arch, dict):
            name = f"golden-dynamicrafter-{key}"
            open_clip.factory._MODEL_CONFIGS[name] = copy.deepcopy(arch)
            params[key]["params"]["arch"] = name
    # as scripts/evaluation/inference.py does
    params["unet_config"]["params"]["use_checkpoint"] = False
    cfg = OmegaConf.create(config)
    return instantiate_from_config(cfg.model)


def perturb_constants(model, std: float = 0.02) -> list[str]:
    """Every parameter whose elements are all equal (zero-initialised layers, unit norm weights, zero biases,
    scalars) gets N(0, std) added, from the torch global RNG, in named_parameters order."""
    import torch

    touched = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and bool((p == p.reshape(-1)[0]).all()):
                p.add_(torch.randn_like(p) * std)
                touched.append(name)
    return touched


def set_alphas(model, seed: int) -> dict[str, float]:
    """The learnable image cross-attention scales (``attn2.alpha``, zero at init): draw U(-1.5, 1.5) so that
    tanh(alpha) + 1 is clearly different from 1 (0.1 .. 1.9)."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".alpha"):
                p.copy_(torch.empty((), dtype=p.dtype).uniform_(-1.5, 1.5, generator=g))
                out[name] = float(p)
    return out


def load_checkpoint(model, path: Path):
    """scripts/evaluation/inference.py:load_model_checkpoint (strict; renames framestride_embed for 256)."""
    sys.argv = sys.argv[:1]
    sys.path.insert(0, str(Path(sys.modules["utils.utils"].__file__).parents[1] / "scripts" / "evaluation"))
    from inference import load_model_checkpoint

    return load_model_checkpoint(model, str(path))


# ----------------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(seed: int, config: dict, image_hw, t: int, fs: int, aa_hw, frames: int = T_FRAMES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    h, w = image_hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy / h, xx / w
    chans = []
    for _ in range(3):  # a few random low-frequency waves per channel
        a, fy, fx, ph = rng.uniform(0.3, 0.6), rng.uniform(0.5, 3), rng.uniform(0.5, 3), rng.uniform(0, 6.3)
        chans.append(a * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph) + rng.uniform(-0.3, 0.3))
    image = np.clip(np.stack(chans)[None] + rng.uniform(-0.1, 0.1, (1, 3, h, w)), -1, 1).astype(np.float32)
    ah, aw = aa_hw
    yy, xx = np.mgrid[0:ah, 0:aw].astype(np.float64)
    aa = np.stack([np.sin(yy / 7.0 + c) * np.cos(xx / 5.0 - c) for c in range(3)])[None]
    aa = np.clip(0.8 * aa + rng.uniform(-0.15, 0.15, aa.shape), -1, 1).astype(np.float32)
    tokens = np.zeros((1, TEXT_CTX), np.int64)
    n = 11
    tokens[0, 0], tokens[0, 1:1 + n], tokens[0, 1 + n] = 998, rng.integers(1, 998, n), 999
    uncond = np.zeros((1, TEXT_CTX), np.int64)
    uncond[0, :2] = [998, 999]
    lh, lw = config["model"]["params"]["image_size"]
    return {
        "image": image,
        "text_tokens": tokens,
        "uncond_text_tokens": uncond,
        "noise": rng.standard_normal((1, 4, frames, lh, lw)).astype(np.float32),
        "t": np.array([t], np.int64),
        "fs": np.array([fs], np.int64),
        "latent_for_decode": rng.standard_normal((1, 4, frames, lh, lw)).astype(np.float32),
        "clip_aa.image": aa,
    }


BATCH_T, BATCH_FS, BATCH_TOKENS = 700, 13, 5  # samples 1.. of a batch case: another t, fs and prompt length


def make_batch_inputs(seed: int, config: dict, spec: dict, frames: int, batch: int) -> dict[str, np.ndarray]:
    """``batch`` samples: sample 0 exactly as ``make_inputs(seed, ...)``, sample b > 0 drawn from seed + 100 b
    with timestep BATCH_T, fs BATCH_FS and a BATCH_TOKENS-token prompt, so that every per-sample input differs
    (an image, a caption and its length, t (the other side of the dynamic-rescale knee at 400), fs, the noise).
    The extra CLIP antialias image stays one sample."""
    samples = [make_inputs(seed, config, spec["image_hw"], spec["t"], spec["fs"], spec["aa_hw"], frames=frames)]
    for b in range(1, batch):
        one = make_inputs(seed + 100 * b, config, spec["image_hw"], BATCH_T, BATCH_FS, spec["aa_hw"], frames=frames)
        tokens = np.zeros_like(one["text_tokens"])
        tokens[0, 0], tokens[0, 1:1 + BATCH_TOKENS], tokens[0, 1 + BATCH_TOKENS] = 998, one["text_tokens"][0, 1:1 + BATCH_TOKENS], 999
        samples.append({**one, "text_tokens": tokens})
    return {k: samples[0][k] if k == "clip_aa.image" else np.concatenate([s[k] for s in samples])
            for k in samples[0]}


# ----------------------------------------------------------------------------------------------------------
# The upstream computation


@contextlib.contextmanager
def posterior_mode():
    """DiagonalGaussianDistribution.sample() returns the mean (deterministic z0)."""
    from lvdm.distributions import DiagonalGaussianDistribution as D

    original = D.sample
    D.sample = lambda self, noise=None: self.mean
    try:
        yield
    finally:
        D.sample = original


def _cpu_sampler():
    from lvdm.models.samplers.ddim import DDIMSampler

    class CPUDDIMSampler(DDIMSampler):
        def register_buffer(self, name, attr):  # upstream moves every tensor to CUDA
            setattr(self, name, attr)

    return CPUDDIMSampler


def compute(model, inp: dict, settings: dict) -> tuple[dict, dict]:
    """Every output of the contract, from the upstream model. Returns (outputs, ddim timesteps visited)."""
    import torch
    from lvdm.common import extract_into_tensor

    dt = next(model.parameters()).dtype
    x = {k: torch.from_numpy(np.asarray(v)) for k, v in inp.items()}
    for k, v in x.items():
        if v.is_floating_point():
            x[k] = v.to(dt)
    out: dict[str, torch.Tensor] = {}
    image, T = x["image"], x["noise"].shape[2]
    vae = model.first_stage_model
    enc = vae.encoder
    with torch.no_grad():
        # (1) VAE encoder taps and posterior
        mods = {"vae.enc.conv_in": enc.conv_in}
        for i, level in enumerate(enc.down):
            mods[f"vae.enc.down.{i}"] = level.downsample if i != len(enc.down) - 1 else level.block[-1]
        mods.update({"vae.enc.mid": enc.mid.block_2, "vae.enc.conv_out": enc.conv_out})
        taps: dict = {}
        with recorded(mods, taps):
            posterior = vae.encode(image)
        out["vae.posterior_mean"], out["vae.posterior_logvar"] = posterior.mean, posterior.logvar
        out.update(taps)
        # (3) decode
        out["vae.decode"] = model.decode_first_stage(x["latent_for_decode"])
        # (4) CLIP image tower, Resampler
        emb = model.embedder
        out["clip_image.preprocessed"] = emb.preprocess(image)
        blocks = emb.model.visual.transformer.resblocks
        taps = {}
        names = [f"clip_image.block.{i}" for i in range(len(blocks))]
        with recorded(dict(zip(names, blocks)), taps, keep=lambda n, o: o.transpose(0, 1) if n in names else o):
            tokens = emb(image)
        out["clip_image.tokens"] = tokens
        out.update(taps)
        out["clip_aa.preprocessed"] = emb.preprocess(x["clip_aa.image"])
        out["clip_aa.tokens"] = emb(x["clip_aa.image"])
        out["resampler.out"] = model.image_proj_model(tokens)
        # (5) text (penultimate): hooks on the blocks that run
        text = model.cond_stage_model
        blocks = text.model.transformer.resblocks
        used = len(blocks) - text.layer_idx
        names = [f"text.block.{i}" for i in range(used)]
        taps = {}
        with recorded(dict(zip(names, list(blocks)[:used])), taps, keep=lambda n, o: o.transpose(0, 1) if n in names else o):
            out["text.context"] = text.encode_with_transformer(x["text_tokens"])
        out.update(taps)
        # (6) unconditional
        out["uncond.text.context"] = text.encode_with_transformer(x["uncond_text_tokens"])
        out["uncond.clip_image.tokens"] = emb(torch.zeros_like(image))
        out["uncond.resampler.out"] = model.image_proj_model(out["uncond.clip_image.tokens"])
        # (2) z0 and the conditioning, as scripts/evaluation/inference.py builds them
        video = image[:, :, None].repeat(1, 1, T, 1, 1)
        with posterior_mode():
            z0 = model.encode_first_stage(video)
        out["diffusion.z0"] = z0
        c_concat = z0[:, :, :1].repeat(1, 1, T, 1, 1)
        cond = {"c_crossattn": [torch.cat([out["text.context"], out["resampler.out"]], 1)], "c_concat": [c_concat]}
        uc = {"c_crossattn": [torch.cat([out["uncond.text.context"], out["uncond.resampler.out"]], 1)],
              "c_concat": [c_concat]}
        # (7) training loss at t (LatentDiffusion.forward after its randint, then p_losses) with UNet taps
        t, noise, fs = x["t"], x["noise"], x["fs"]
        x_start = z0 * extract_into_tensor(model.scale_arr, t, z0.shape) if model.use_dynamic_rescale else z0
        out["diffusion.x_start"] = x_start
        out["diffusion.x_t"] = model.q_sample(x_start, t, noise)
        out["diffusion.target"] = model.get_v(x_start, noise, t) if model.parameterization == "v" else noise.clone()
        unet = model.model.diffusion_model
        mods = {"unet.time_embed": unet.time_embed}
        if unet.fs_condition:
            mods["unet.fps_embedding"] = unet.fps_embedding
        mods.update({f"unet.input_blocks.{i}": m for i, m in enumerate(unet.input_blocks)})
        mods.update({"unet.init_attn": unet.init_attn, "unet.middle_block": unet.middle_block})
        mods.update({f"unet.output_blocks.{i}": m for i, m in enumerate(unet.output_blocks)})
        mods["unet.out"] = unet
        taps = {}
        with recorded(mods, taps):
            loss, _ = model.p_losses(x_start, cond, t, noise=noise, fs=fs)
        out.update(taps)
        out["loss"] = loss
        # (8) DDIM runs
        visited = {}
        Sampler = _cpu_sampler()
        for run in settings["ddim_runs"]:
            sampler = Sampler(model)
            samples, _ = sampler.sample(
                S=run["steps"], batch_size=noise.shape[0], shape=tuple(noise.shape[1:]), conditioning=cond,
                unconditional_conditioning=uc, unconditional_guidance_scale=run["cfg_scale"], eta=run["eta"],
                x_T=noise, fs=fs, timestep_spacing=run["timestep_spacing"],
                guidance_rescale=run["guidance_rescale"], verbose=False)
            out[f"{run['name']}.x0"] = samples
            visited[run["name"]] = [int(s) for s in np.flip(np.asarray(sampler.ddim_timesteps))]
    result = {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in out.items()}
    return result, visited


def compute_float64(model, inp: dict, settings: dict) -> dict:
    """The same computation in float64 (weights, buffers, inputs; the UNet's dtype; GroupNormSpecific's
    float32 upcast off; torch default dtype float64 so that the sampler's torch.full constants are float64)."""
    import torch
    from lvdm import basics

    m = copy.deepcopy(model).double()
    m.model.diffusion_model.dtype = torch.float64
    original = basics.GroupNormSpecific.forward
    basics.GroupNormSpecific.forward = lambda self, x: torch.nn.GroupNorm.forward(self, x)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result, _ = compute(m, inp, settings)
    finally:
        torch.set_default_dtype(previous)
        basics.GroupNormSpecific.forward = original
    return result


# ----------------------------------------------------------------------------------------------------------
# case.json


def describe(style: str, config: dict, inp: dict, out: dict, settings: dict, visited: dict, model) -> dict:
    p = config["model"]["params"]
    up = p["unet_config"]["params"]
    dd = p["first_stage_config"]["params"]["ddconfig"]
    arch = p["cond_stage_config"]["params"]["arch"]
    v = p.get("parameterization", "eps") == "v"
    dyn = p.get("use_dynamic_rescale", False)
    perframe = p.get("perframe_ae", False)
    base = p.get("base_scale", 0.7)
    B, _, T, lh, lw = inp["noise"].shape
    H, W = inp["image"].shape[2:]
    t = int(inp["t"][0])
    shp = lambda k: str(list(out[k].shape))  # noqa: E731
    vl = arch["vision_cfg"]["layers"]
    tl = arch["text_cfg"]["layers"]
    nlev = len(dd["ch_mult"])
    ae = "frame by frame (perframe_ae True)" if perframe else "all B*T frames in one batch (perframe_ae False)"
    outputs = {
        "vae.posterior_mean": f"{shp('vae.posterior_mean')}: first_stage_model.encode(image) -> DiagonalGaussianDistribution; its .mean (first 4 channels of quant_conv(encoder(x))). This is posterior.mode().",
        "vae.posterior_logvar": f"{shp('vae.posterior_logvar')}: its .logvar (last 4 channels), clamped to [-30, 20] as the distribution does.",
        "vae.enc.conv_in": f"{shp('vae.enc.conv_in')}: forward hook on first_stage_model.encoder.conv_in (NCHW).",
    }
    for i in range(nlev):
        k = f"vae.enc.down.{i}"
        if i != nlev - 1:
            outputs[k] = f"{shp(k)}: output of encoder level down[{i}] = output of down[{i}].downsample (after its {dd['num_res_blocks']} ResnetBlock(s); pad (0,1,0,1) then 3x3 stride-2 conv)."
        else:
            outputs[k] = f"{shp(k)}: output of encoder level down[{i}] = output of its last ResnetBlock down[{i}].block[-1] (last level: no downsample)."
    outputs.update({
        "vae.enc.mid": f"{shp('vae.enc.mid')}: output of encoder.mid.block_2 (after mid.block_1, mid.attn_1, mid.block_2).",
        "vae.enc.conv_out": f"{shp('vae.enc.conv_out')}: output of encoder.conv_out (after norm_out+swish), before quant_conv.",
        "vae.decode": f"{shp('vae.decode')}: model.decode_first_stage(latent_for_decode): (b c t h w) -> (b t) c h w, z/scale_factor (0.18215), first_stage_model.decode (post_quant_conv, decoder) {ae}, back to (B,3,T,H,W). Not clamped.",
        "clip_image.preprocessed": f"{shp('clip_image.preprocessed')}: embedder.preprocess(image): kornia.geometry.resize to (224,224), interpolation bicubic, align_corners=True, antialias=True (no blur here: both sides upscale), then (x+1)/2, then kornia.enhance.normalize with OpenAI CLIP mean/std.",
        "clip_image.tokens": f"{shp('clip_image.tokens')}: model.embedder(image) (FrozenOpenCLIPImageEmbedderV2): preprocess, conv1 (patch 14, no bias), flatten, prepend class_embedding, + positional_embedding, ln_pre, the {vl} transformer blocks (LND inside), back to B N D. No ln_post, no proj. 257 tokens = 1 + (224/14)^2.",
    })
    for i in range(vl):
        k = f"clip_image.block.{i}"
        outputs[k] = f"{shp(k)}: forward hook on embedder.model.visual.transformer.resblocks[{i}] during model.embedder(image); the hook sees L N D, stored transposed to B N D."
    ah, aw = inp["clip_aa.image"].shape[2:]
    outputs.update({
        "clip_aa.preprocessed": f"{shp('clip_aa.preprocessed')}: embedder.preprocess(clip_aa.image): the antialias branch runs along the axis that downscales ({ah} -> 224): kornia gaussian_blur2d (reflect border) with sigma_i = max((in_i/224 - 1)/2, 0.001) and kernel int(max(4*sigma_i, 3)) made odd, per axis, before the bicubic resize.",
        "clip_aa.tokens": f"{shp('clip_aa.tokens')}: model.embedder(clip_aa.image).",
        "resampler.out": f"{shp('resampler.out')}: model.image_proj_model(clip_image.tokens) (Resampler, num_queries 16 x video_length {T} = {16 * T} query tokens, frame-major).",
        "text.context": f"{shp('text.context')}: cond_stage_model.encode_with_transformer(text_tokens): token_embedding + positional_embedding, the first {tl - 1} of {tl} resblocks (penultimate layer, causal attn_mask), ln_final. No text_projection.",
    })
    for i in range(tl - 1):
        k = f"text.block.{i}"
        outputs[k] = f"{shp(k)}: forward hook on cond_stage_model.model.transformer.resblocks[{i}] during text.context, transposed from L N D to B N D (before ln_final)."
    outputs.update({
        "uncond.text.context": f"{shp('uncond.text.context')}: encode_with_transformer(uncond_text_tokens).",
        "uncond.clip_image.tokens": f"{shp('uncond.clip_image.tokens')}: model.embedder(zeros_like(image)) (the unconditional image; mid-grey after preprocessing).",
        "uncond.resampler.out": f"{shp('uncond.resampler.out')}: image_proj_model(uncond.clip_image.tokens).",
        "diffusion.z0": f"{shp('diffusion.z0')}: the clean video latent: model.encode_first_stage(video) where video = image repeated T times, with the posterior's sample() replaced by mode(), i.e. 0.18215 * vae.posterior_mean for every frame ({ae}). c_concat (the concat conditioning) is z0[:, :, :1] repeated T times, as scripts/evaluation/inference.py builds it.",
    })
    if dyn:
        sa = float(model.scale_arr[t])
        outputs["diffusion.x_start"] = f"{shp('diffusion.x_start')}: z0 * scale_arr[t] (dynamic rescale, LatentDiffusion.forward; scale_arr = concat(linspace(1, {base}, 400), full(1000, {base})), scale_arr[{t}] = {sa:.7g} in float32)."
    else:
        outputs["diffusion.x_start"] = f"{shp('diffusion.x_start')}: = diffusion.z0 (use_dynamic_rescale False: LatentDiffusion.forward does not rescale; no scale_arr buffer)."
    sched = "zero-terminal-SNR schedule" if v else "linear-in-sqrt ('linear') beta schedule 0.00085..0.012, no zero-SNR rescale"
    outputs["diffusion.x_t"] = f"{shp('diffusion.x_t')}: model.q_sample(x_start, t, noise) = sqrt_alphas_cumprod[t] * x_start + sqrt_one_minus_alphas_cumprod[t] * noise (buffers from the checkpoint, {sched})."
    outputs["diffusion.target"] = (f"{shp('diffusion.target')}: the loss target: v = get_v(x_start, noise, t) = sqrt(abar_t)*noise - sqrt(1-abar_t)*x_start." if v
                                   else f"{shp('diffusion.target')}: the loss target: eps parameterization, target = noise (bitwise the input noise).")
    mc = up["model_channels"]
    outputs["unet.time_embed"] = f"{shp('unet.time_embed')}: hook on UNet time_embed: Linear-SiLU-Linear of timestep_embedding(t, model_channels={mc}) ([cos, sin], max_period 10000), before the per-frame repeat_interleave."
    outputs["unet.fps_embedding"] = (f"{shp('unet.fps_embedding')}: hook on UNet fps_embedding applied to timestep_embedding(fs, model_channels); added to time_embed after both are repeat_interleave'd T times."
                                     + (" In the checkpoint (released 256 layout) this module's weights are named model.diffusion_model.framestride_embed.*; load_model_checkpoint renames them to fps_embedding." if style == "256" else ""))
    unet = model.model.diffusion_model
    for i in range(len(unet.input_blocks)):
        k = f"unet.input_blocks.{i}"
        extra = ": the conv_in output, BEFORE init_attn" if i == 0 else ""
        kinds = [type(m).__name__ for m in unet.input_blocks[i]]
        outputs[k] = f"{shp(k)}: forward hook on model.diffusion_model.input_blocks[{i}] (TimestepEmbedSequential of {kinds}; output (B*T) C H W with frames contiguous per sample){extra}."
    outputs["unet.init_attn"] = f"{shp('unet.init_attn')}: hook on model.diffusion_model.init_attn (the TemporalTransformer applied right after input_blocks[0]; its output is hs[0], the first skip)."
    outputs["unet.middle_block"] = f"{shp('unet.middle_block')}: hook on model.diffusion_model.middle_block."
    for i in range(len(unet.output_blocks)):
        k = f"unet.output_blocks.{i}"
        kinds = [type(m).__name__ for m in unet.output_blocks[i]]
        outputs[k] = f"{shp(k)}: hook on model.diffusion_model.output_blocks[{i}] ({kinds}; input was cat([h, hs.pop()], dim=1))."
    ctx_len = TEXT_CTX + 16 * T
    pred = "v prediction" if v else "eps prediction"
    outputs["unet.out"] = f"{shp('unet.out')}: UNet output ({pred}), (B,4,T,h,w): model.apply_model(x_t, t, cond, fs=fs) with cond = {{c_concat: [z0 first frame repeated T], c_crossattn: [cat(text.context, resampler.out, dim=1)]}} (hybrid conditioning: UNet(cat([x_t, c_concat], 1), t, context=c_crossattn, fs=fs)). Context length 77 + 16*{T} = {ctx_len} hits the per-frame split (frame i gets text + image tokens [16i:16i+16]). Captured by a hook on model.diffusion_model during the loss call below."
    outputs["loss"] = "[] (0-d): the training loss: model.p_losses(x_start, cond, t, noise=noise, fs=fs) (what LatentDiffusion.forward calls after drawing t" + (" and applying x*scale_arr[t]" if dyn else "") + "), i.e. mean over all elements of (unet.out - diffusion.target)^2 (logvar 0, original_elbo_weight 0). No CFG dropout (cond as above), eval mode (dropout inactive)."
    for run in settings["ddim_runs"]:
        name, S = run["name"], run["steps"]
        ts = visited[name]
        if v:
            core = "e_t = sqrt(a_t)*out + sqrt(1-a_t)*x, pred_x0 = sqrt(a_t)*x - sqrt(1-a_t)*out (these two square roots are the sqrt_alphas_cumprod / sqrt_one_minus_alphas_cumprod buffers at ts_i)"
        else:
            core = "e_t = out (eps), pred_x0 = (x - sqrt(1-a_t)*e_t) / sqrt(a_t) (sqrt(1-a_t) = ddim_sqrt_one_minus_alphas, computed as np.sqrt(1 - a_t) on the float32 a_t; sqrt(a_t) by torch)"
        resc = " pred_x0 *= scale_arr[ts_prev]/scale_arr[ts_i] (ts_prev = ts[i-1], or ts[0] for i=0);" if dyn else ""
        gr = (f" guidance_rescale {run['guidance_rescale']}: out = r*out*std(c)/std(out) + (1-r)*out, std per sample over all non-batch dims ({'v' if v else 'eps'}-space);"
              if run["guidance_rescale"] > 0 else " guidance_rescale 0 (off);")
        spacing = run["timestep_spacing"]
        how = ("'uniform': ddim timesteps = range(0, 1000, 1000 // S) + 1" if spacing == "uniform"
               else "'uniform_trailing': round(arange(1000, 0, -1000/S)) - 1")
        outputs[f"{name}.x0"] = (
            f"{shp(name + '.x0')}: DDIMSampler(model).sample(S={S}, batch_size={B}, shape={tuple(int(s) for s in inp['noise'].shape[1:])}, conditioning=cond, unconditional_conditioning=uc, unconditional_guidance_scale={run['cfg_scale']}, eta={run['eta']}, x_T=noise, fs=fs, timestep_spacing='{spacing}', guidance_rescale={run['guidance_rescale']}) final latent. "
            f"Spacing {how}. Timesteps visited, in order: {ts}. uc = {{c_concat: same as cond, c_crossattn: cat(uncond.text.context, uncond.resampler.out)}}. "
            f"Per step (index i into the ascending timesteps): out = u + s*(c - u) from two apply_model calls;{gr} {core};{resc} x_prev = sqrt(a_prev)*pred_x0 + sqrt(1-a_prev)*e_t with a_t = alphas_cumprod[ts_i], a_prev = alphas_cumprod[ts_(i-1)] or alphas_cumprod[0] for i=0 (eta 0: sigma 0, no noise). Everything in float32.")
    return outputs


def inputs_doc(style, config, inp) -> dict:
    p = config["model"]["params"]
    up = p["unet_config"]["params"]
    B, C, T, lh, lw = inp["noise"].shape
    H, W = inp["image"].shape[2:]
    ah, aw = inp["clip_aa.image"].shape[2:]
    fs_kind = p.get("fps_condition_type", "fs")
    return {
        "image": f"[{B}, 3, {H}, {W}] float32 in [-1,1]: the conditioning image, NCHW (three random low-frequency sine waves per channel + per-pixel uniform noise of +-0.1, clipped). The 'video' of the I2V pipeline is this image repeated T={T} times along a new frame axis (b c t h w).",
        "text_tokens": f"[{B}, {TEXT_CTX}] int64 OpenCLIP token ids of the prompt, already tokenised (reduced vocab 1000: start token 998, 11 random ids in [1, 997]" + (f" ({BATCH_TOKENS} in samples 1..)" if B > 1 else "") + ", end token 999, padding 0, mirroring open_clip's 49406/49407/0 in its 49408 vocab). Fed to cond_stage_model.encode_with_transformer directly (the upstream forward() would call open_clip.tokenize on strings, whose ids do not fit the reduced vocab).",
        "uncond_text_tokens": f"[{B}, {TEXT_CTX}] int64: the stand-in for open_clip.tokenize(\"\") = [start 998, end 999, 0, ...], used for the unconditional (empty-prompt, uncond_type empty_seq) branch of CFG.",
        "noise": f"[{B}, {C}, {T}, {lh}, {lw}] float32 N(0,1), (B,4,T,h,w) latent layout: the diffusion noise for q_sample / the loss, and also x_T (the starting latent) of the DDIM runs.",
        "t": f"[{B}] int64 = {[int(v) for v in inp['t']]}: diffusion timestep per sample (0..999) for x_t, unet.out and loss.",
        "fs": f"[{B}] int64 = {[int(v) for v in inp['fs']]}: the fs conditioning per sample passed to the UNet (UNet default_fs is {up['default_fs']}, deliberately different). fps_condition_type '{fs_kind}' ({style} style{': frame stride' if fs_kind == 'fs' else ''}); the UNet treats it the same way either way (timestep_embedding -> fps_embedding).",
        "latent_for_decode": f"[{B}, {C}, {T}, {lh}, {lw}] float32 N(0,1): a fixed (scaled) latent video to decode with decode_first_stage.",
        "clip_aa.image": f"[1, 3, {ah}, {aw}] float32 in [-1,1]: an extra image, larger than 224 along H only, so that the kornia antialias Gaussian blur is active in the CLIP preprocess along that axis (W upscales: sigma 0.001 there, kernel 3). For the main 'image' both sides are < 224, so the blur is skipped: kornia only blurs when downscaling.",
    }


# ----------------------------------------------------------------------------------------------------------


STYLES = {
    "256": dict(image_hw=(48, 48), t=611, fs=5, aa_hw=(500, 96),
                ddim_runs=[dict(name="ddim", steps=2, eta=0.0, cfg_scale=7.5, guidance_rescale=0.0, timestep_spacing="uniform"),
                           dict(name="ddim.steps5", steps=5, eta=0.0, cfg_scale=7.5, guidance_rescale=0.0, timestep_spacing="uniform")]),
    "512": dict(image_hw=(80, 128), t=337, fs=10, aa_hw=(32, 800),
                ddim_runs=[dict(name="ddim", steps=2, eta=0.0, cfg_scale=7.5, guidance_rescale=0.7, timestep_spacing="uniform_trailing"),
                           dict(name="ddim.steps3", steps=3, eta=0.0, cfg_scale=7.5, guidance_rescale=0.7, timestep_spacing="uniform_trailing")]),
    "1024": dict(image_hw=(64, 128), t=173, fs=6, aa_hw=(460, 64),
                 ddim_runs=[dict(name="ddim", steps=2, eta=0.0, cfg_scale=7.5, guidance_rescale=0.7, timestep_spacing="uniform_trailing"),
                            dict(name="ddim.steps4", steps=4, eta=0.0, cfg_scale=7.5, guidance_rescale=0.7, timestep_spacing="uniform_trailing")]),
}


def worst(a: dict, b: dict, tol: dict) -> dict:
    res = {}
    for k in a:
        err = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
        bound = tol["atol"] + tol["rtol"] * np.abs(b[k].astype(np.float64))
        res[k] = {"max_abs_err": float(err.max()) if err.size else 0.0,
                  "max_err_over_tol": float((err / bound).max()) if err.size else 0.0,
                  "absmax": float(np.abs(b[k]).max()) if err.size else 0.0}
    return res


def generate(args) -> None:
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    style = args.style
    spec = STYLES[style]
    out_dir = Path(args.out) if args.out else REPO / "tests" / "golden" / "dynamicrafter" / args.case
    out_dir.mkdir(parents=True, exist_ok=True)
    config = make_config(style)
    unet_params = config["model"]["params"]["unet_config"]["params"]
    for item in args.unet or ():  # variants the yaml allows beyond the releases' values (transformer_depth, ...)
        key, _, value = item.partition("=")
        if key not in unet_params:
            raise SystemExit(f"--unet {item}: {key} is not a unet_config param")
        unet_params[key] = json.loads(value)
    write_config(config, out_dir / "config.yaml", style)
    torch.manual_seed(args.seed)
    model = build_model(config)
    seeded_keys = None
    if args.seeded:  # every parameter from tools/golden/seeded.py; the buffers (schedule, scale_arr) stay real
        perturbed, alphas = [], {}
        names = {n for n, _ in model.named_parameters()}
        seeded_keys = {k: list(v.shape) for k, v in model.state_dict().items() if k in names}
        values = seeded_weights(seeded_keys, args.seed)
        state = {k: torch.from_numpy(values[k]) if k in names else v.detach().clone().contiguous()
                 for k, v in model.state_dict().items()}
    else:
        perturbed = perturb_constants(model)
        alphas = set_alphas(model, args.seed) if style == "256" else {}
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    rename = (lambda k: k.replace(".fps_embedding.", ".framestride_embed.")) if style == "256" else (lambda k: k)
    state = {rename(k): v for k, v in state.items()}  # the released 256 checkpoint names the fs embedding framestride_embed
    torch.save({"state_dict": state}, out_dir / "model.ckpt")
    save_torch(state, out_dir / "model.safetensors")
    # rebuild from the files on disk, exactly as a user of the case would
    model = load_checkpoint(build_model(config), out_dir / "model.ckpt").eval()
    inp = make_inputs(args.seed, config, spec["image_hw"], spec["t"], spec["fs"], spec["aa_hw"])
    settings = {"seed": args.seed, "t": spec["t"], "fs": spec["fs"], "ddim_runs": spec["ddim_runs"],
                "posterior": "mode", "style": style}
    out, visited = compute(model, inp, settings)
    save_file({k: np.ascontiguousarray(v) for k, v in inp.items()}, out_dir / "inputs.safetensors")
    save_file(out, out_dir / "outputs.safetensors")

    tol = {"atol": args.tol, "rtol": args.tol}  # at least 4x the float32 noise measured below
    noise = worst(out, compute_float64(model, inp, settings), tol)
    rerun, _ = compute(load_checkpoint(build_model(config), out_dir / "model.ckpt").eval(), inp, settings)
    bitwise = all(np.array_equal(rerun[k], out[k]) for k in out)
    top = sorted(noise.items(), key=lambda kv: -kv[1]["max_err_over_tol"])[:5]
    if top[0][1]["max_err_over_tol"] > 0.25:
        raise SystemExit(f"float32 noise {top[0]} is too close to the tolerance {tol}; widen it")

    p = config["model"]["params"]
    up, dd = p["unet_config"]["params"], p["first_stage_config"]["params"]["ddconfig"]
    arch = p["cond_stage_config"]["params"]["arch"]
    v = p.get("parameterization", "eps") == "v"
    B, C, T, lh, lw = inp["noise"].shape
    H, W = inp["image"].shape[2:]
    heads = []
    ds = 1
    for lvl, m in enumerate(up["channel_mult"]):
        heads.append(f"level {lvl}: {m * up['model_channels']} ch, ds {ds}, {m * up['model_channels'] // up['num_head_channels']} heads x {up['num_head_channels']}" + (" + attention" if ds in up["attention_resolutions"] else ""))
        ds *= 2
    style_words = {
        "256": "256 (eps, linear schedule without zero-SNR rescale, no dynamic rescale (no scale_arr buffer), fs = frame stride (fps_condition_type default 'fs'), learnable image cross-attention scale (attn2.alpha), perframe_ae False as scripts/run.sh runs 256)",
        "512": f"512 (v, zero-terminal SNR, dynamic rescale base_scale {p.get('base_scale')}, fps, perframe_ae True)",
        "1024": f"1024 (v, zero-terminal SNR, dynamic rescale base_scale {p.get('base_scale')}, fps, perframe_ae True)",
    }[style]
    ckpt_notes = [
        "Prefixes as in the real checkpoint: the schedule buffers (betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2"
        + (", scale_arr (1400))" if p.get("use_dynamic_rescale") else "; no scale_arr: dynamic rescale is off)")
        + ", model.diffusion_model.*, first_stage_model.*, cond_stage_model.model.* (text transformer; no visual), embedder.model.* (visual tower incl. unused ln_post/proj, plus the unused text leftovers token_embedding, positional_embedding, ln_final, text_projection, logit_scale), image_proj_model.*. This is exactly model.state_dict() of the upstream model"
        + (" with model.diffusion_model.fps_embedding.* renamed to model.diffusion_model.framestride_embed.* (the released 256 checkpoint's name; scripts/evaluation/inference.py:load_model_checkpoint renames it back after the strict load fails)." if style == "256" else "."),
        ("With parameterization v, sqrt_recip_alphas_cumprod and sqrt_recipm1_alphas_cumprod are stored as zeros (upstream behaviour) and alphas_cumprod[999] = 0 (zero terminal SNR)." if v
         else "With parameterization eps the buffers are the plain linear-in-sqrt schedule (alphas_cumprod[999] > 0); sqrt_recip_alphas_cumprod / sqrt_recipm1_alphas_cumprod are filled."),
        "open_clip arch: config.yaml has, under model.params.cond_stage_config.params.arch and img_cond_stage_config.params.arch, the open_clip model_cfg dict (same schema as open_clip/model_configs/ViT-H-14.json: embed_dim, vision_cfg{image_size, layers, width, head_width, patch_size}, text_cfg{context_length, vocab_size, width, heads, layers}) instead of the registry name 'ViT-H-14'. Heads: vision width/head_width, text `heads`; mlp_ratio 4; nn.GELU (erf); LayerNorm eps 1e-5. To rebuild upstream: register the dict in open_clip.factory._MODEL_CONFIGS under any name, pass that name as arch, version None (pretrained=None).",
        "Text vocab reduced to 1000 (token ids < 1000); context_length stays 77 (the UNet splits the context at 77).",
        (f"Weights: every parameter (state_dict keys that are model parameters, in state_dict order) from tools/golden/seeded.py seeded_weights(keys, seed={args.seed}): matrices and kernels N(0,1)/sqrt(fan-in), 1-D weights 1 + 0.1 N, biases and other 1-D tensors 0.1 N, scalars N(0,1); the buffers (diffusion schedule" + (", scale_arr" if p.get("use_dynamic_rescale") else "") + ") are the upstream model's own, stored in buffers.safetensors." if args.seeded else
        f"Weights: torch.manual_seed({args.seed}) before instantiate_from_config, then every parameter whose elements are all equal ({len(perturbed)} tensors: zero-initialised output layers such as out.2, proj_out, out_layers.3, temopral_conv.conv4.3, fps_embedding.2, zero biases, unit norm weights, logit_scale"
        + (", the attn2.alpha scalars" if alphas else "") + ") gets N(0, 0.02) added (torch global RNG, named_parameters order)."
        + (f" Then the learnable image cross-attention scales attn2.alpha (zero at init) are set from U(-1.5, 1.5) (torch.Generator seeded {args.seed + 7}) so that the factor tanh(alpha)+1 is far from 1: "
           + ", ".join(f"{k.replace('model.diffusion_model.', '')}={val:.4f}" for k, val in alphas.items()) + "." if alphas else "")),
    ]
    config_notes = [
        "use_checkpoint false and dropout 0.0 (the real configs have use_checkpoint True, which scripts/evaluation/inference.py overrides to False, and dropout 0.1); TemporalConvBlock's hard-coded Dropout(0.1) is inactive because the model is in eval mode. Numerically none of this matters.",
        f"UNet: model_channels {up['model_channels']}, channel_mult {up['channel_mult']}, num_res_blocks {up['num_res_blocks']}, attention_resolutions {up['attention_resolutions']} (ds values; ds doubles per level), num_head_channels {up['num_head_channels']} -> " + "; ".join(heads) + f"; middle block {up['channel_mult'][-1] * up['model_channels']} ch with attention; init_attn 8 heads x {up['num_head_channels']}; context_dim = text width {up['context_dim']}; temporal_length = T; default_fs {up['default_fs']}"
        + ("; image_cross_attention_scale_learnable true (out = text_attn + 1.0 * img_attn * (tanh(alpha)+1))." if up.get("image_cross_attention_scale_learnable") else "; image_cross_attention_scale_learnable false (scale 1.0)."),
        f"VAE: ch {dd['ch']}, ch_mult {dd['ch_mult']} -> channels {[dd['ch'] * m for m in dd['ch_mult']]}, num_res_blocks {dd['num_res_blocks']} (decoder {dd['num_res_blocks'] + 1}), downsample x{2 ** (len(dd['ch_mult']) - 1)}, no attention in the levels (mid attention only).",
        f"CLIP: vision {arch['vision_cfg']['layers']} layers, width {arch['vision_cfg']['width']} ({arch['vision_cfg']['width'] // arch['vision_cfg']['head_width']} heads), patch 14 at 224; text {arch['text_cfg']['layers']} layers (penultimate: {arch['text_cfg']['layers'] - 1} run), width {arch['text_cfg']['width']}, {arch['text_cfg']['heads']} heads.",
        f"Resampler: embedding_dim = CLIP vision width, output_dim = context_dim, num_queries 16 per frame, video_length = T, so the context is 77 + 16*T = {77 + 16 * T} long and the UNet's hard-coded per-frame split is taken.",
        "Every GroupNorm in the UNet (32 groups) sees 64 channels (2 per group), so the per-channel time/fs embedding added in every ResBlock is NOT cancelled by out_layers' GroupNorm (unlike a 32-channel level)."
        if all(m * up["model_channels"] >= 64 for m in up["channel_mult"]) else
        "Level 0 has 32 channels: GroupNorm(32) there has one channel per group and cancels the per-channel time/fs embedding added in its ResBlocks (out_layers' GroupNorm), as in the public tiny-v-zero-snr case; the 64-channel levels (1, 2 and the middle block: 2 channels per group) do not cancel it, so t and fs reach unet.out through them (see the ablations in coverage). The tiny-256-eps case has 64 channels everywhere.",
    ]
    if style == "256":
        runs_note = "DDIM as scripts/run.sh runs the 256 model: timestep_spacing 'uniform' (the inference.py default), guidance_rescale 0.0 (default), cfg 7.5; eta 0 instead of the script's 1.0 (eta > 0 needs torch's RNG). S=3 is not used: with 'uniform' spacing range(0, 1000, 333) + 1 reaches t=1000 and upstream indexes alphas_cumprod[1000] (IndexError)."
    else:
        runs_note = f"DDIM as scripts/run.sh runs the {style} model: timestep_spacing 'uniform_trailing', guidance_rescale 0.7, cfg 7.5; eta 0 instead of the script's 1.0 (eta > 0 needs torch's RNG)."
    if p.get("use_dynamic_rescale"):
        sa = model.scale_arr.numpy()
        for run in spec["ddim_runs"]:
            asc = visited[run["name"]][::-1]
            ratios = [f"{sa[a]:.4f}/{sa[b]:.4f} at t={b}" for a, b in zip([asc[0]] + asc[:-1], asc) if sa[a] != sa[b]]
            runs_note += (f" {run['name']}: pred_x0 rescale ratio scale_arr[ts_prev]/scale_arr[ts_i] != 1 at "
                          + "; ".join(ratios) + "." if ratios else f" {run['name']}: every rescale ratio is 1 (all t >= 400).")
        runs_note += f" x_start uses scale_arr[{spec['t']}] = {sa[spec['t']]:.7g} (t < 400, linear part)."
    coverage = [f"{style} style: {style_words}. {runs_note}"]
    if up["transformer_depth"] != 1:
        coverage.append(f"transformer_depth {up['transformer_depth']} (every released config has 1): each SpatialTransformer, "
                        f"TemporalTransformer and init_attn stacks {up['transformer_depth']} BasicTransformerBlocks "
                        f"(transformer_blocks.0..{up['transformer_depth'] - 1}) between its proj_in and proj_out.")
    # ablations measured on the upstream model: how far each feature moves unet.out
    coverage.append(ablation_note(model, inp, style))
    coverage.append("Not exercised: the real widths, fp16 autocast, xformers, use_checkpoint True, relative-position or causal temporal attention (off in every released config), interpolation/loop modes, eta > 0 (needs torch RNG), posterior.sample(), multiple_cond_cfg.")
    sizes = {}
    meta = {
        "backbone": "dynamicrafter",
        "component": "LatentVisualDiffusion end to end: AutoencoderKL (encoder taps, posterior, decode), FrozenOpenCLIPImageEmbedderV2 + Resampler, FrozenOpenCLIPEmbedder (penultimate), 3D UNet (block taps), training loss, DDIM with CFG",
        "upstream": f"Doubiiu/DynamiCrafter @ {UPSTREAM_COMMIT} (github.com/Doubiiu/DynamiCrafter), open-clip-torch {version('open_clip_torch')}, kornia {version('kornia')}",
        "checkpoint": "model.ckpt",
        "checkpoint_files": {
            "model.ckpt": "torch.save({'state_dict': OrderedDict}) - a Lightning-style file; load with torch.load(..., map_location='cpu')['state_dict'] (plain tensors, weights_only=True works).",
            "model.safetensors": "the same keys and float32 tensors as model.ckpt's state_dict.",
            "config.yaml": f"model config in the shape of configs/inference_{style}_v1.0.yaml.",
        },
        "checkpoint_notes": ckpt_notes,
        "call": (f"Upstream Doubiiu/DynamiCrafter @ {UPSTREAM_COMMIT} (open-clip-torch {version('open_clip_torch')}, kornia {version('kornia')}, torch {torch.__version__}, CPU, float32, no autocast, no xformers; tools/upstream/stubs.py import stand-ins). "
                 "Written by tools/golden/dynamicrafter.py. Model: lvdm.models.ddpm3d.LatentVisualDiffusion built by utils.utils.instantiate_from_config from config.yaml (with params.arch of the two OpenCLIP stages registered in open_clip.factory._MODEL_CONFIGS, version None, use_checkpoint False), eval mode, weights loaded strictly from model.ckpt with scripts/evaluation/inference.py:load_model_checkpoint. "
                 f"Everything under torch.no_grad(). Style: {style_words}. Steps: (1) VAE-encode `image` (taps, posterior); (2) z0 = encode_first_stage of the image repeated T times with mode() instead of sample(); (3) decode `latent_for_decode`; (4) CLIP image tokens + block taps, Resampler; (5) text context (penultimate) from tokens; (6) unconditional text/image context; (7) p_losses at the given t and noise with UNet taps (forward hooks, first call); (8) DDIM runs with CFG (lvdm.models.samplers.ddim.DDIMSampler, its register_buffer overridden to keep tensors on the CPU instead of moving them to CUDA). "
                 "Weights: see checkpoint_notes."),
        "config_notes": config_notes,
        "coverage": coverage,
        "inputs": inputs_doc(style, config, inp),
        "outputs": describe(style, config, inp, out, settings, visited, model),
        "tolerance": tol,
        "settings": settings,
        "ddim_timesteps": visited,
        "shapes": {"T": T, "image_hw": [H, W], "latent_hw": [lh, lw],
                   "vae_downsample": 2 ** (len(dd["ch_mult"]) - 1), "context_length": 77 + 16 * T,
                   "clip_tokens": 257, "context_dim": up["context_dim"]},
        "layouts": "All tensors in upstream layout: images NCHW, videos/latents (B,C,T,H,W), UNet taps (B*T,C,H,W) with b-major/t-minor rows, token sequences (B,N,D). Flax NHWC ports must transpose.",
        "float32_noise": {
            "method": "the same upstream run in float64 (weights, buffers and inputs cast, UNet dtype float64, GroupNormSpecific's fp32 upcast disabled, torch default dtype float64) compared with these float32 outputs",
            "worst_err_over_tolerance": top[0][1]["max_err_over_tol"],
            "worst_output": top[0][0],
            "largest": dict(top),
            "run_to_run": ("a rerun from the files on disk reproduces every output bit for bit (CPU)" if bitwise
                           else "a rerun from the files on disk does NOT reproduce every output bit for bit"),
        },
        "generator": f"tools/golden/dynamicrafter.py --style {style} --case {out_dir.name} --seed {args.seed}"
                     + "".join(f" --unet '{item}'" for item in args.unet or ())
                     + (" --safetensors-only" if args.safetensors_only else "") + (" --seeded" if args.seeded else "")
                     + (f" --tol {args.tol:g}" if args.tol != 1e-4 else ""),
    }
    assert set(meta["outputs"]) == set(out), set(meta["outputs"]) ^ set(out)
    meta["outputs"] = {k: meta["outputs"][k] for k in out}  # same order as the file
    for name in ("config.yaml", "model.ckpt", "model.safetensors", "inputs.safetensors", "outputs.safetensors"):
        sizes[name] = (out_dir / name).stat().st_size
    meta["sizes_bytes"] = sizes
    if seeded_keys is not None:  # no weights stored: the keys, the seed and the real buffers
        keys = {rename(k): v for k, v in seeded_keys.items()}
        file = "model.safetensors" if args.safetensors_only else "model.ckpt"
        save_file({k: np.ascontiguousarray(v.numpy()) for k, v in state.items() if k not in keys},
                  out_dir / "buffers.safetensors")
        for name in ("model.ckpt", "model.safetensors"):
            (out_dir / name).unlink()
            meta["sizes_bytes"].pop(name)
        meta["sizes_bytes"]["buffers.safetensors"] = (out_dir / "buffers.safetensors").stat().st_size
        meta["checkpoint"] = file
        meta["checkpoint_files"] = {
            file: ("not stored: tools/golden/seeded.py materialise(case) writes it from seeded_weights: every "
                   "parameter seeded_weights(keys, seed), the buffers from buffers.safetensors; keys as the "
                   "upstream model's state_dict" + (" (fps_embedding renamed framestride_embed)" if style == "256" else "")),
            "buffers.safetensors": "the checkpoint's non-parameter tensors (the schedule buffers"
                                   + (", scale_arr" if "scale_arr" in state else "") + "), as the upstream model computed them",
            "config.yaml": meta["checkpoint_files"]["config.yaml"],
        }
        meta["seeded_weights"] = {"file": file, "seed": args.seed, "buffers": "buffers.safetensors", "keys": keys}
    elif args.safetensors_only:  # one copy of the weights (another case holds a Lightning .ckpt)
        (out_dir / "model.ckpt").unlink()
        meta["checkpoint"] = "model.safetensors"
        meta["checkpoint_files"] = {k: v.replace("as model.ckpt's state_dict", "as the upstream model's state_dict")
                                    for k, v in meta["checkpoint_files"].items() if k != "model.ckpt"}
        meta["sizes_bytes"].pop("model.ckpt")
    (out_dir / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in out_dir.iterdir():  # safetensors writes 0600 files
        f.chmod(0o644)
    print(json.dumps({"dir": str(out_dir), "sizes": sizes, "noise_top": top, "bitwise_rerun": bitwise,
                      "outputs": len(out), "ddim": visited}, indent=1))


def ablation_note(model, inp, style) -> str:
    """How far unet.out moves (in units of the tolerance) when each conditioning path is removed."""

    base, _ = _unet_out(model, inp, {})
    res = {}
    for what in ("fs", "t", "image_tokens", "alpha", "temporal_conv", "temporal_attn", "init_attn"):
        if what == "alpha" and style != "256":
            continue
        got, _ = _unet_out(model, inp, {what: True})
        d = np.abs(got - base)
        res[what] = float((d / (1e-4 + 1e-4 * np.abs(base))).max())
    parts = ", ".join(f"{k} {v:.0f}x" for k, v in res.items())
    return ("Ablations on the upstream model, each measured as max |delta unet.out| / tolerance: " + parts +
            " (fs: fs+7; t: t+50 (x_t fixed); image_tokens: image context tokens zeroed; "
            + ("alpha: every attn2.alpha set to 0; " if "alpha" in res else "")
            + "temporal_conv/temporal_attn/init_attn: the module replaced by identity).")


def _unet_out(model, inp, ablate):
    import torch

    unet = model.model.diffusion_model
    patches = []
    try:
        with torch.no_grad():
            x = {k: torch.from_numpy(np.asarray(v)) for k, v in inp.items()}
            T = x["noise"].shape[2]
            with posterior_mode():
                z0 = model.encode_first_stage(x["image"][:, :, None].repeat(1, 1, T, 1, 1))
            text = model.cond_stage_model.encode_with_transformer(x["text_tokens"])
            img = model.image_proj_model(model.embedder(x["image"]))
            if ablate.get("image_tokens"):
                img = torch.zeros_like(img)
            t = x["t"] + (50 if ablate.get("t") else 0)
            fs = x["fs"] + (7 if ablate.get("fs") else 0)
            if ablate.get("alpha"):
                for n, p in unet.named_parameters():
                    if n.endswith(".alpha"):
                        patches.append((p, p.detach().clone()))
                        p.data.zero_()
            identity = lambda m, a, o: a[0]  # noqa: E731
            for n, m in unet.named_modules():
                if (ablate.get("temporal_conv") and n.endswith("temopral_conv")) or \
                        (ablate.get("temporal_attn") and type(m).__name__ == "TemporalTransformer" and not n.startswith("init_attn")) or \
                        (ablate.get("init_attn") and n == "init_attn"):
                    patches.append(m.register_forward_hook(identity))
            cond = {"c_crossattn": [torch.cat([text, img], 1)], "c_concat": [z0[:, :, :1].repeat(1, 1, T, 1, 1)]}
            x_t = model.q_sample(z0, x["t"], x["noise"])
            y = model.apply_model(x_t, t, cond, fs=fs)
            return y.numpy(), None
    finally:
        for p in patches:
            if isinstance(p, tuple):
                p[0].data.copy_(p[1])
            else:
                p.remove()


def _model_from(case: Path, config: dict):
    """The upstream model with ``case``'s weights (its model.ckpt, or model.safetensors through a temporary .ckpt),
    loaded by scripts/evaluation/inference.py:load_model_checkpoint."""
    import tempfile

    import torch

    seeded = materialise(case)
    if seeded is not None and seeded.suffix == ".ckpt":
        return load_checkpoint(build_model(config), seeded).eval()
    if (case / "model.ckpt").exists():
        return load_checkpoint(build_model(config), case / "model.ckpt").eval()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"state_dict": load_file(seeded or case / "model.safetensors")}, Path(tmp) / "model.ckpt")
        return load_checkpoint(build_model(config), Path(tmp) / "model.ckpt").eval()


def derive(args) -> None:
    """A case at another frame count (``--frames``) or batch size (``--batch``) on an existing case's weights (``--weights-from``): its
    config.yaml is copied, its checkpoint referenced (case.json ``weights_from``), one DDIM run kept."""
    import shutil

    import torch
    import yaml
    from safetensors.numpy import save_file

    base = Path(args.weights_from).resolve()
    base_meta = json.loads((base / "case.json").read_text())
    config = yaml.safe_load((base / "config.yaml").read_text())
    style = base_meta["settings"]["style"]
    spec = STYLES[style]
    video_length = config["model"]["params"]["image_proj_stage_config"]["params"]["video_length"]
    out_dir = Path(args.out) if args.out else REPO / "tests" / "golden" / "dynamicrafter" / args.case
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "config.yaml", out_dir / "config.yaml")
    model = _model_from(base, config)
    frames = args.frames or base_meta["shapes"]["T"]
    inp = make_batch_inputs(args.seed, config, spec, frames, args.batch)
    settings = {**base_meta["settings"], "seed": args.seed, "ddim_runs": spec["ddim_runs"][:1]}
    if args.batch > 1:
        settings.update(t=[int(v) for v in inp["t"]], fs=[int(v) for v in inp["fs"]])
    out, visited = compute(model, inp, settings)
    tol = {"atol": 1e-4, "rtol": 1e-4}
    noise = worst(out, compute_float64(model, inp, settings), tol)
    top = sorted(noise.items(), key=lambda kv: -kv[1]["max_err_over_tol"])[:5]
    if top[0][1]["max_err_over_tol"] > 0.25:
        raise SystemExit(f"float32 noise {top[0]} is too close to the tolerance {tol}; widen it")
    save_file({k: np.ascontiguousarray(v) for k, v in inp.items()}, out_dir / "inputs.safetensors")
    save_file(out, out_dir / "outputs.safetensors")
    B, C, T, lh, lw = inp["noise"].shape
    notes = []
    if B > 1:
        notes.append(
            f"Batch of {B}: every per-sample input differs (image, caption and its length, t {settings['t']}, fs "
            f"{settings['fs']}, noise); upstream runs the batch in one call everywhere (the VAE frame by frame, "
            f"p_losses with per-sample t, DDIM with per-sample fs and the empty prompt's context per sample).")
    if T != video_length:
        notes.append(
        f"T = {T} frames with the Resampler's video_length {video_length}: the image context has 16 x {video_length} "
        f"tokens, so its length 77 + {16 * video_length} is not 77 + 16*T and the UNet takes its other branch: the "
        f"whole context (text + every image token) is repeated for each of the T frames (every frame attends to all "
        f"{16 * video_length} image tokens). Descriptions below that speak of the per-frame split describe the base "
        f"case; here that split is not taken.")
    notes.append(f"Weights, config and everything else as {base.name}.")
    meta = {k: v for k, v in base_meta.items() if k not in ("sizes_bytes", "float32_noise", "generator")}
    meta.update({
        "weights_from": f"../{base.name}",
        "checkpoint": f"../{base.name}/" + ("model.ckpt" if (base / "model.ckpt").exists() else "model.safetensors"),
        "checkpoint_files": {"config.yaml": f"a copy of ../{base.name}/config.yaml",
                             "weights": f"not stored here: the checkpoint files of ../{base.name} (weights_from)"},
        "coverage": [" ".join(notes)] + base_meta["coverage"],
        "inputs": inputs_doc(style, config, inp),
        "outputs": describe(style, config, inp, out, settings, visited, model),
        "settings": settings,
        "ddim_timesteps": visited,
        "shapes": {**base_meta["shapes"], "B": B, "T": T,
                   "context_length": 77 + 16 * (video_length if T != video_length else T)},
        "float32_noise": {"method": base_meta["float32_noise"]["method"],
                          "worst_err_over_tolerance": top[0][1]["max_err_over_tol"], "worst_output": top[0][0]},
        "generator": f"tools/golden/dynamicrafter.py --weights-from {base.name} --frames {T} --batch {B} --case {out_dir.name} "
                     f"--seed {args.seed} (torch {torch.__version__})",
    })
    meta["outputs"] = {k: meta["outputs"][k] for k in out}
    meta["sizes_bytes"] = {n: (out_dir / n).stat().st_size for n in ("config.yaml", "inputs.safetensors", "outputs.safetensors")}
    (out_dir / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in out_dir.iterdir():
        f.chmod(0o644)
    print(json.dumps({"dir": str(out_dir), "sizes": meta["sizes_bytes"], "noise_top": top[:2], "outputs": len(out)},
                     indent=1))


def check(args) -> None:
    """Recompute a case from its own config.yaml, model.ckpt, inputs and settings; compare with its outputs."""
    import yaml
    from safetensors.numpy import load_file

    case = Path(args.check)
    meta = json.loads((case / "case.json").read_text())
    config = yaml.safe_load((case / "config.yaml").read_text())
    model = _model_from((case / meta["weights_from"]).resolve() if "weights_from" in meta else case, config)
    inp = load_file(case / "inputs.safetensors")
    expected = load_file(case / "outputs.safetensors")
    got, visited = compute(model, inp, meta["settings"])
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    print(f"missing {missing} extra {extra}")
    worst_name, worst_val = None, -1.0
    for k in expected:
        if k not in got:
            continue
        d = float(np.abs(got[k].astype(np.float64) - expected[k]).max()) if expected[k].size else 0.0
        print(f"{k:28s} {str(list(expected[k].shape)):24s} max|diff| {d:.3e}")
        if d > worst_val:
            worst_name, worst_val = k, d
    print(f"worst {worst_name} {worst_val:.3e}; ddim timesteps {visited} (case: {meta.get('ddim_timesteps')})")
    if args.seed_check:
        import torch

        torch.manual_seed(meta["settings"]["seed"])
        fresh = build_model(config)
        perturb_constants(fresh)
        ref = torch.load(case / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        mine = fresh.state_dict()
        diffs = {k: float((mine[k] - ref[k]).abs().max()) for k in ref if k in mine}
        bad = {k: v for k, v in diffs.items() if v != 0}
        print(f"weights rebuilt from the seed: {len(diffs)} tensors compared, {len(bad)} differ"
              + (f"; worst {max(bad.items(), key=lambda kv: kv[1])}" if bad else " (bit for bit)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="a checkout of Doubiiu/DynamiCrafter (commit c453369)")
    ap.add_argument("--style", choices=sorted(STYLES), help="which released inference yaml to mirror")
    ap.add_argument("--case", help="case name: writes tests/golden/dynamicrafter/<case>/ (or --out)")
    ap.add_argument("--out", help="output folder (default tests/golden/dynamicrafter/<case>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unet", action="append", metavar="KEY=JSON",
                    help="with --style: override a unet_config param, e.g. transformer_depth=2 channel_mult=[1,2]")
    ap.add_argument("--safetensors-only", action="store_true", help="with --style: keep model.safetensors, not model.ckpt")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="with --style: atol = rtol of the case (at least 4x the float32 noise, which the generator checks)")
    ap.add_argument("--seeded", action="store_true",
                    help="with --style: seeded parameters (tools/golden/seeded.py), not stored; only the buffers are")
    ap.add_argument("--check", help="recompute this case folder and compare with its outputs.safetensors")
    ap.add_argument("--seed-check", action="store_true", help="with --check: also rebuild the weights from the seed")
    ap.add_argument("--weights-from", help="an existing case folder whose weights and config a new case reuses")
    ap.add_argument("--frames", type=int, help="with --weights-from: the frame count of the new case (default: the base's)")
    ap.add_argument("--batch", type=int, default=1, help="with --weights-from: samples per batch (per-sample t, fs, prompt)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    import_upstream(Path(args.upstream))
    if args.check:
        check(args)
    elif args.weights_from:
        if not ((args.frames or args.batch > 1) and args.case):
            ap.error("--weights-from needs --case and --frames or --batch")
        derive(args)
    else:
        if not (args.style and args.case):
            ap.error("--style and --case are required (or --check)")
        generate(args)


if __name__ == "__main__":
    main()
