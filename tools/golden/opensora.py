"""Golden cases for Open-Sora 1.2, computed by the upstream PyTorch code (hpcaitech/Open-Sora v1.2.0) on a tiny,
randomly initialised STDiT3 + VideoAutoencoderPipeline. Format: tests/golden/README.md; the case layout, input
and output names follow the public case opensora/tiny-stdit3 (stdit3/ + vae/ Hugging Face folders).

Runs in a Python environment that can import the upstream repository (torch, diffusers 0.27, transformers 4.39,
timm, einops, rotary_embedding_torch, mmengine, ftfy), NOT the project venv:

    python tools/golden/opensora.py --case tiny-batch2                     # upstream at /work/scratch/opensora-src
    python tools/golden/opensora.py --upstream /path/to/Open-Sora --case tiny-batch2
    # recompute an existing case from its own files and compare with its outputs.safetensors
    python tools/golden/opensora.py --check tests/golden/opensora/tiny-batch2

Nothing from upstream is copied here: STDiT3, the VAE pipeline, RFLOW.training_losses, RFLOW.sample,
apply_mask_strategy, prepare_multi_resolution_info and T5Encoder.null are the upstream objects, driven through
forward hooks. The only changes to upstream behaviour, all deterministic stand-ins that keep the maths:
tools/upstream/stubs.py (xformers in torch, import-only colossalai/av/cv2, the torchvision shim), the
``opensora.datasets`` package replaced by an import-only module (inference_utils imports it for IMG_FPS and
read_from_path; its own imports need torchvision's video I/O), the spatial VAE built from the case's own
diffusers config instead of downloaded, the posteriors' ``sample()`` returning the mean, and a text encoder
whose ``encode`` returns the case's features (its ``null`` is upstream ``T5Encoder.null``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "upstream"))
from hooks import recorded, version  # noqa: E402  (shared by the generators)

DEFAULT_UPSTREAM = Path("/work/scratch/opensora-src")
UPSTREAM = "hpcaitech/Open-Sora @ v1.2.0 = 17cce90 (github.com/hpcaitech/Open-Sora)"
TOL = {"atol": 1e-4, "rtol": 1e-4}  # as the public case opensora/tiny-stdit3

# ----------------------------------------------------------------------------------------------------------
# The tiny architecture (the sizes of the public case opensora/tiny-stdit3)

STDIT3 = dict(
    input_size=(None, None, None), input_sq_size=512, in_channels=4, patch_size=(1, 2, 2), hidden_size=64, depth=2,
    num_heads=4, mlp_ratio=4.0, class_dropout_prob=0.0, pred_sigma=True, drop_path=0.0, caption_channels=32,
    model_max_length=8, qk_norm=True, enable_flash_attn=False, enable_layernorm_kernel=False,
    enable_sequence_parallelism=False, only_train_temporal=False, freeze_y_embedder=True, skip_y_embedder=False,
)
VAE_TEMPORAL = dict(
    type="VAE_Temporal", in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=4, num_res_blocks=1,
    channel_multipliers=[1, 2, 2, 4], temporal_downsample=[False, True, True], num_groups=2, activation_fn="swish",
)
VAE_2D_DIFFUSERS = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.27.2", "act_fn": "silu",
    "block_out_channels": [8, 16, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 4, "latents_mean": None, "latents_std": None, "layers_per_block": 1,
    "norm_num_groups": 4, "out_channels": 3, "sample_size": 512, "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# the rest of hpcai-tech/OpenSora-VAE-v1.2/config.json, real values
VAE_PIPELINE = dict(
    vae_2d=dict(type="VideoAutoencoderKL", from_pretrained="PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
                subfolder="vae", micro_batch_size=4, local_files_only=False),
    freeze_vae_2d=False, cal_loss=False, micro_frame_size=17, from_pretrained=None,
    shift=[-0.10, 0.34, 0.27, 0.98], scale=[3.85, 2.32, 2.33, 3.06],
)

# ----------------------------------------------------------------------------------------------------------
# Cases. Per-sample values differ on purpose (B = 2): t, fps, caption length, x_mask; the sampler uses mask
# strategy "0" for every sample (the port's I2V wiring) with each sample's own image latent, caption and fps.

CASES = {
    "tiny-batch2": dict(
        B=2, H=32, W=24, num_frames=18,
        t=[250.0, 812.5], fps=[24.0, 8.0], y_lens=[8, 5],
        x_mask_cond_frames=[1, 2],  # leading frames with x_mask False, per sample
        rflow=dict(num_sampling_steps=5, cfg_scale=7.0, use_timestep_transform=True, mask_strategy="0", align=5),
    ),
}

# ----------------------------------------------------------------------------------------------------------
# Upstream


def import_upstream(upstream: Path) -> None:
    sys.path.insert(0, str(REPO / "tools" / "upstream"))
    import stubs

    stubs.install()
    # opensora.utils.inference_utils imports IMG_FPS and read_from_path from opensora.datasets, whose own imports
    # need torchvision's video I/O (absent from a CPU wheel). An import-only stand-in; IMG_FPS read from the source.
    src = (upstream / "opensora" / "datasets" / "datasets.py").read_text()
    for name in ("opensora.datasets", "opensora.datasets.utils"):
        sys.modules[name] = stubs._Anything(name)
    sys.modules["opensora.datasets"].IMG_FPS = int(re.search(r"^IMG_FPS = (\d+)", src, re.MULTILINE).group(1))
    sys.path.insert(0, str(upstream))


def _spatial_vae_from_config(diffusers_config: dict):
    """opensora.models.vae.vae.AutoencoderKL replaced by a class whose from_pretrained builds the model from the
    case's diffusers config (what the download would have returned, with the tiny sizes)."""
    import diffusers

    class AutoencoderKL(diffusers.AutoencoderKL):
        @classmethod
        def from_pretrained(cls, *_args, **_kwargs):
            return diffusers.AutoencoderKL.from_config(copy.deepcopy(diffusers_config))

    return AutoencoderKL


def vae_config_json() -> dict:
    """vae/config.json: the real fields, the tiny VAE_Temporal as an explicit dict, plus the spatial VAE's config."""
    from opensora.models.vae.vae import VideoAutoencoderPipelineConfig

    cfg = VideoAutoencoderPipelineConfig(**copy.deepcopy(VAE_PIPELINE), vae_temporal=copy.deepcopy(VAE_TEMPORAL))
    cfg.architectures = ["VideoAutoencoderPipeline"]
    cfg.torch_dtype = "float32"
    raw = json.loads(cfg.to_json_string(use_diff=False))
    keep = {"architectures", "cal_loss", "freeze_vae_2d", "from_pretrained", "micro_frame_size", "model_type",
            "scale", "shift", "torch_dtype", "transformers_version", "vae_2d", "vae_temporal"}
    raw = {k: raw[k] for k in sorted(raw) if k in keep}
    raw["vae_2d_diffusers_config"] = copy.deepcopy(VAE_2D_DIFFUSERS)
    return raw


def build_vae(config: dict):
    """VideoAutoencoderPipeline(VideoAutoencoderPipelineConfig(**config.json)), spatial VAE from its diffusers config."""
    from opensora.models.vae.vae import (
        VideoAutoencoderPipeline,
        VideoAutoencoderPipelineConfig,
    )

    vae_mod = sys.modules["opensora.models.vae.vae"]  # (the package re-exports names that shadow the submodule)

    config = copy.deepcopy(config)
    diffusers_config = config.pop("vae_2d_diffusers_config")
    original = vae_mod.AutoencoderKL
    vae_mod.AutoencoderKL = _spatial_vae_from_config(diffusers_config)
    try:
        return VideoAutoencoderPipeline(VideoAutoencoderPipelineConfig(**config))
    finally:
        vae_mod.AutoencoderKL = original


def build_stdit():
    from opensora.models.stdit.stdit3 import STDiT3, STDiT3Config

    return STDiT3(STDiT3Config(**copy.deepcopy(STDIT3)))


def perturb_constants(models) -> list[str]:
    """Every parameter whose elements are all equal gets N(0, 0.1) ('norm' in its name) or N(0, 0.05) added
    (torch global RNG, models in order, named_parameters order); rope.freqs is never touched."""
    import torch

    touched = []
    with torch.no_grad():
        for prefix, model in models:
            for name, p in model.named_parameters():
                if name == "rope.freqs" or not p.numel():
                    continue
                if bool((p == p.reshape(-1)[0]).all()):
                    p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
                    touched.append(prefix + name)
    return touched


def write_checkpoint(out_dir: Path, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    stdit = build_stdit()
    vae_cfg = vae_config_json()
    vae = build_vae(vae_cfg)
    touched = perturb_constants([("stdit3/", stdit), ("vae/", vae)])
    with torch.no_grad():
        stdit.t_embedder.mlp[0].weight.mul_(0.1)
    (out_dir / "stdit3").mkdir(parents=True, exist_ok=True)
    (out_dir / "vae").mkdir(parents=True, exist_ok=True)
    stdit.save_pretrained(out_dir / "stdit3", safe_serialization=True)
    (out_dir / "vae" / "config.json").write_text(json.dumps(vae_cfg, indent=2) + "\n")
    state = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    save_file(state, out_dir / "vae" / "model.safetensors", metadata={"format": "pt"})
    return {"perturbed": touched, "stdit3_tensors": len(stdit.state_dict()), "vae_tensors": len(state)}


def load_models(case: Path):
    """The models rebuilt from the case's files, as a user of the case would (strict loads, eval mode)."""
    from opensora.models.stdit.stdit3 import STDiT3
    from safetensors.torch import load_file

    stdit, info = STDiT3.from_pretrained(str(case / "stdit3"), output_loading_info=True)
    assert not any(info.values()), f"STDiT3.from_pretrained is not an exact load: {info}"
    stdit = stdit.float().eval()
    vae = build_vae(json.loads((case / "vae" / "config.json").read_text()))
    vae.load_state_dict(load_file(case / "vae" / "model.safetensors"), strict=True)
    return stdit, vae.float().eval()


# ----------------------------------------------------------------------------------------------------------
# Inputs


def latent_geometry(spec: dict) -> tuple[int, int, int]:
    """(latent T, h, w): spatial x8; time per micro chunk of 17 frames, each front-padded to a multiple of 4."""
    f, chunks = spec["num_frames"], []
    while f > 0:
        n = min(f, VAE_PIPELINE["micro_frame_size"])
        chunks.append(-(-n // 4))
        f -= n
    return sum(chunks), spec["H"] // 8, spec["W"] // 8


def make_inputs(seed: int, spec: dict) -> dict[str, np.ndarray]:
    """torch.Generator().manual_seed(1000 + seed), drawn in the order below; fixed per-sample values from spec."""
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    B, H, W, F = spec["B"], spec["H"], spec["W"], spec["num_frames"]
    T, h, w = latent_geometry(spec)
    L, C = STDIT3["model_max_length"], STDIT3["caption_channels"]
    uniform = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    normal = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = {
        "image": uniform(B, 3, H, W),
        "video_latents": normal(B, 4, T, h, w),
        "noise": normal(B, 4, T, h, w),
        "t": torch.tensor(spec["t"], dtype=torch.float32),
        "y": normal(B, 1, L, C),
        "mask": torch.stack([(torch.arange(L) < n).long() for n in spec["y_lens"]]),
        "x_mask": torch.stack([torch.arange(T) >= n for n in spec["x_mask_cond_frames"]]),
        "fps": torch.tensor(spec["fps"], dtype=torch.float32),
        "height": torch.full((B,), float(H)),
        "width": torch.full((B,), float(W)),
        "num_frames": torch.full((B,), float(F)),
        "video_for_encode": uniform(B, 3, F, H, W),
        "latent_for_decode": normal(B, 4, T, h, w),
    }
    return {k: v.contiguous().numpy() for k, v in inp.items()}


# ----------------------------------------------------------------------------------------------------------
# The upstream computation


@contextlib.contextmanager
def posterior_means():
    """Both Gaussian posteriors (diffusers, opensora.models.vae.utils) return their mean from sample()."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as D1
    from opensora.models.vae.utils import DiagonalGaussianDistribution as D2

    saved = D1.sample, D2.sample
    D1.sample = lambda self, generator=None: self.mean.clone()  # upstream scales the sample in place
    D2.sample = lambda self: self.mean.clone()
    try:
        yield
    finally:
        D1.sample, D2.sample = saved


def _text_encoder(y, mask, y_embedder):
    """upstream T5Encoder with encode() returning the case's features; null() is T5Encoder.null itself."""
    from opensora.models.text_encoder.t5 import T5Encoder

    class FixtureText(T5Encoder):
        def __init__(self):  # noqa: D401  (no T5 to load)
            self.y_embedder = y_embedder

        def encode(self, prompts):
            assert len(prompts) == y.shape[0]
            return dict(y=y.clone(), mask=mask.clone())

    return FixtureText()


def compute(stdit, vae, inp: dict, settings: dict) -> tuple[dict, dict]:
    """Every output of the contract, from the upstream models. Returns (outputs, what the sampler did)."""
    import torch
    from opensora.schedulers.rf import RFLOW
    from opensora.utils.inference_utils import (
        apply_mask_strategy,
        prepare_multi_resolution_info,
    )

    dt = next(stdit.parameters()).dtype
    x = {k: torch.from_numpy(np.array(v)) for k, v in inp.items()}
    x = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in x.items()}
    B, H, W, F = x["image"].shape[0], int(x["height"][0]), int(x["width"][0]), int(x["num_frames"][0])
    out: dict = {}
    sv, tv = vae.spatial_vae.module, vae.temporal_vae
    with torch.no_grad(), posterior_means():
        # (a) image encode with taps
        mods = {"vae.spatial.enc.conv_in": sv.encoder.conv_in}
        mods.update({f"vae.spatial.enc.down_blocks.{i}": m for i, m in enumerate(sv.encoder.down_blocks)})
        mods.update({"vae.spatial.enc.mid_block": sv.encoder.mid_block, "vae.spatial.enc.conv_out": sv.encoder.conv_out,
                     "vae.spatial.quant_conv": sv.quant_conv, "vae.temporal.enc.conv_in": tv.encoder.conv_in})
        mods.update({f"vae.temporal.enc.block_res_blocks.{i}": blk[-1] for i, blk in enumerate(tv.encoder.block_res_blocks)})
        mods.update({f"vae.temporal.enc.conv_blocks.{i}": m for i, m in enumerate(tv.encoder.conv_blocks)
                     if not isinstance(m, torch.nn.Identity)})
        mods.update({"vae.temporal.enc.res_blocks": tv.encoder.res_blocks[-1], "vae.temporal.enc.conv2": tv.encoder.conv2,
                     "vae.temporal.quant_conv": tv.quant_conv})
        image = x["image"][:, :, None]
        taps: dict = {}
        with recorded(mods, taps, every_call=True):
            out["vae.image.spatial_mean"] = vae.spatial_vae.encode(image)
            out["vae.image.latent"] = vae.encode(image)
        for name in mods:  # the spatial modules ran twice (same input): keep the first call
            out[name] = taps[name][0]
        # (b) video encode, (c) decode
        out["vae.video.latent"] = vae.encode(x["video_for_encode"])
        out["vae.decode"] = vae.decode(x["latent_for_decode"], num_frames=F)

        # (d) training loss with STDiT3 taps
        rf = settings["rflow"]
        scheduler = RFLOW(num_sampling_steps=rf["num_sampling_steps"], cfg_scale=rf["cfg_scale"],
                          use_timestep_transform=rf["use_timestep_transform"])
        model_kwargs = dict(y=x["y"], mask=x["mask"], x_mask=x["x_mask"], fps=x["fps"], height=x["height"],
                            width=x["width"], num_frames=x["num_frames"])
        smods = {"stdit3.out": stdit, "stdit3.x_embedder": stdit.x_embedder, "stdit3.t_embedder": stdit.t_embedder,
                 "stdit3.fps_embedder": stdit.fps_embedder, "stdit3.t_block": stdit.t_block,
                 "stdit3.y_embedder": stdit.y_embedder}
        for i in range(len(stdit.spatial_blocks)):
            smods[f"stdit3.spatial_blocks.{i}"] = stdit.spatial_blocks[i]
            smods[f"stdit3.temporal_blocks.{i}"] = stdit.temporal_blocks[i]
        x_t_seen = []
        pre = stdit.register_forward_pre_hook(lambda _m, args: x_t_seen.append(args[0].detach().clone()))
        taps = {}
        try:
            with recorded(smods, taps, every_call=True):
                loss = scheduler.training_losses(stdit, x["video_latents"], model_kwargs=model_kwargs,
                                                 noise=x["noise"], mask=x["x_mask"], t=x["t"])["loss"]
        finally:
            pre.remove()
        assert len(x_t_seen) == 1 and all(len(v) == (2 if k in ("stdit3.t_embedder", "stdit3.t_block") else 1)
                                          for k, v in taps.items()), {k: len(v) for k, v in taps.items()}
        out["stdit3.x_t"] = x_t_seen[0]
        out["stdit3.out"] = taps.pop("stdit3.out")[0]
        out["stdit3.t0_embedder"] = taps["stdit3.t_embedder"][1]
        out["stdit3.t0_block"] = taps["stdit3.t_block"][1]
        for name, v in taps.items():
            out[name] = v[0]
        out["loss"] = loss
        out["loss.batch_mean"] = loss.mean()

        # (e) the sampler: mask strategy per sample, CFG, timestep transform
        z = x["noise"].clone()
        refs = [[out["vae.image.latent"][b]] for b in range(B)]
        masks = apply_mask_strategy(z, refs, [rf["mask_strategy"]] * B, 0, align=rf["align"])
        out["rflow.mask"] = masks.clone()
        out["rflow.z_init"] = z.clone()
        text = _text_encoder(x["y"], x["mask"], stdit.y_embedder)
        out["rflow.null_y"] = text.null(B)
        additional = prepare_multi_resolution_info("STDiT2", B, (H, W), F, float(x["fps"][0]), "cpu", dt)
        additional["fps"] = x["fps"].clone()  # each sample its own fps (the script repeats one value)
        calls = []
        pre = stdit.register_forward_pre_hook(
            lambda _m, args, kwargs: calls.append({"z": args[0][:B].clone(), "t": args[1][:B].clone(),
                                                   "x_mask": kwargs["x_mask"][:B].clone()}), with_kwargs=True)
        try:
            z_final = scheduler.sample(stdit, text, z=z, prompts=[f"prompt {b}" for b in range(B)], device="cpu",
                                       additional_args=additional, mask=masks, progress=False)
        finally:
            pre.remove()
        out["rflow.timesteps"] = torch.stack([c["t"] for c in calls])
        out["rflow.z_after_2_steps"] = calls[2]["z"]
        out["rflow.z_final"] = z_final
    visited = {"timesteps": [[float(v) for v in c["t"]] for c in calls],
               "x_mask_per_step": [c["x_mask"].int().tolist() for c in calls]}
    result = {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in out.items()}
    return result, visited


def compute_float64(stdit, vae, inp: dict, settings: dict) -> dict:
    """The same computation in float64 (weights, buffers, inputs, torch default dtype; the xformers stand-in
    keeps the dtype). Upstream's own float32 casts stay float32: the timestep/size sinusoids and the RoPE
    angles (torch.float32 frequencies), LlamaRMSNorm's variance; the sampler's timestep transform is computed in
    float32 as in the float32 run (its rounding decides whether step 0 updates anything)."""
    import torch
    import xformers.ops as xops

    original = xops.memory_efficient_attention

    def attention64(q, k, v, p=0.0, attn_bias=None, **_):
        scores = torch.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
        if attn_bias is not None:
            scores = scores + attn_bias.materialize(q.device).to(scores.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).contiguous()

    import opensora.schedulers.rf as rf_mod

    transform = rf_mod.timestep_transform

    def transform32(t, model_kwargs, **kwargs):
        # the sampler's timesteps as in the float32 run: in float64, 1000 transformed can round just above 1000
        # (32x24 pixels: 1000.0000000000002) and upstream would then skip the whole first update
        kw32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in model_kwargs.items()}
        return transform(t.float(), kw32, **kwargs).to(t.dtype)

    previous = torch.get_default_dtype()
    xops.memory_efficient_attention = attention64
    rf_mod.timestep_transform = transform32
    torch.set_default_dtype(torch.float64)
    try:
        result, _ = compute(copy.deepcopy(stdit).double(), copy.deepcopy(vae).double(), inp, settings)
    finally:
        torch.set_default_dtype(previous)
        xops.memory_efficient_attention = original
        rf_mod.timestep_transform = transform
    return result


def per_sample_runs(stdit, vae, inp: dict, out: dict, settings: dict) -> dict:
    """Each sample run alone (B = 1, its own slice of every input) through the same upstream calls, compared
    with its row of the batched outputs: how far (in units of the tolerance) batching moves each output."""
    B = inp["image"].shape[0]
    res = {}
    for b in range(B):
        single, _ = compute(stdit, vae, {k: v[b : b + 1] for k, v in inp.items()}, settings)
        for k, v in single.items():
            if k == "rflow.timesteps":
                ref = out[k][:, b : b + 1]
            elif k == "loss.batch_mean":
                continue
            else:  # (the spatial-VAE taps have N = B*T rows with T = 1: row b too)
                ref = out[k][b : b + 1]
            r = worst({k: v}, {k: ref}, TOL)[k]["max_err_over_tol"]
            res[k] = max(res.get(k, 0.0), r)
    top = sorted(res.items(), key=lambda kv: -kv[1])[:5]
    return {"method": "each sample alone (B=1) vs its row of the batch-of-2 outputs; max |diff| / (atol + rtol|ref|)",
            "worst": dict(top)}


def ablations(stdit, inp: dict) -> dict:
    """How far stdit3.out of sample 1 moves (max |delta| / (atol + rtol|ref|)) when one of its per-sample values
    is replaced by sample 0's (or its caption mask by all-valid): what a port that mixes up samples would miss by."""
    import torch

    def run(v):
        x = {k: torch.from_numpy(np.array(a)) for k, a in v.items()}
        with torch.no_grad():
            t = x["t"]
            x_t = stdit_x_t(x, t)
            return stdit(x_t, t, y=x["y"], mask=x["mask"], x_mask=x["x_mask"], fps=x["fps"], height=x["height"],
                         width=x["width"]).numpy()[1]

    def x_mask_same(v):
        v["x_mask"][1] = v["x_mask"][0]

    def mask_full(v):
        v["mask"][1] = 1

    edits = {
        "t[1] = t[0]": lambda v: v["t"].__setitem__(1, v["t"][0]),
        "fps[1] = fps[0]": lambda v: v["fps"].__setitem__(1, v["fps"][0]),
        "mask[1] all valid": mask_full,
        "x_mask[1] = x_mask[0]": x_mask_same,
    }
    base = run(inp)
    res = {}
    for name, edit in edits.items():
        v = {k: np.array(a) for k, a in inp.items()}
        edit(v)
        got = run(v)
        res[name] = float((np.abs(got - base) / (TOL["atol"] + TOL["rtol"] * np.abs(base))).max())
    return res


def stdit_x_t(x: dict, t):
    """training_losses' model input (RFlowScheduler.add_noise with x_mask), from the upstream scheduler."""
    import torch
    from opensora.schedulers.rf import RFlowScheduler

    sch = RFlowScheduler()
    x_t = sch.add_noise(x["video_latents"], x["noise"], t)
    x_t0 = sch.add_noise(x["video_latents"], x["noise"], torch.zeros_like(t))
    return torch.where(x["x_mask"][:, None, :, None, None], x_t, x_t0)


def worst(a: dict, b: dict, tol: dict) -> dict:
    res = {}
    for k in a:
        err = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
        bound = tol["atol"] + tol["rtol"] * np.abs(b[k].astype(np.float64))
        res[k] = {"max_abs_err": float(err.max()) if err.size else 0.0,
                  "max_err_over_tol": float((err / bound).max()) if err.size else 0.0}
    return res


# ----------------------------------------------------------------------------------------------------------
# case.json


def describe_inputs(spec: dict, inp: dict) -> dict:
    B, H, W, F = spec["B"], spec["H"], spec["W"], spec["num_frames"]
    T, h, w = latent_geometry(spec)
    L, C = STDIT3["model_max_length"], STDIT3["caption_channels"]
    lat = f"[{B}, 4, {T}, {h}, {w}] float32"
    chunks = []
    f = F
    while f > 0:
        chunks.append(min(f, 17))
        f -= chunks[-1]
    chunk_words = " + ".join(f"{n} frames (front-padded with {(4 - n % 4) % 4} zero frames to {n + (4 - n % 4) % 4} -> {-(-n // 4)} latent frames)" for n in chunks)
    xm = inp["x_mask"].astype(int).tolist()
    return {
        "image": f"[{B}, 3, {H}, {W}] float32: (B,3,H,W) reference images in [-1,1] (uniform random pixels), NCHW, one per sample. The VAE sees them as 1-frame videos image[:, :, None] of shape (B,3,1,H,W).",
        "video_latents": f"{lat}: z0, (B,4,T,h,w) clean latent video, N(0,1), already in the normalised latent space ((z-shift)/scale). Independent of `image`.",
        "noise": f"{lat}: epsilon N(0,1), same shape as z0; used by the loss and as the starting latent of the RFLOW sampler.",
        "t": f"[{B}] float32: = {spec['t']}: continuous rectified-flow timestep per sample in [0,1000] (1000 = pure noise), passed explicitly (so training_losses applies NO timestep transform).",
        "y": f"[{B}, 1, {L}, {C}] float32: (B,1,L,caption_channels) text-encoder features (stand-in for T5 output), N(0,1); the features past each sample's valid length are random too (they must be ignored).",
        "mask": f"[{B}, {L}] int64: (B,L) text attention mask, 1 = valid token; valid tokens per sample (y_lens) = {spec['y_lens']} (a prefix, as T5 gives). STDiT3.encode_text keeps only the valid tokens of each sample, concatenated, and cross-attention is block-diagonal: sample b attends to its own y_lens[b] tokens only.",
        "x_mask": f"[{B}, {T}] bool: (B,T) temporal mask per sample = {xm}: the first {spec['x_mask_cond_frames']} frames (per sample) False (clean conditioning frames: t=0 modulation, not noised, excluded from the loss), the others True.",
        "fps": f"[{B}] float32: = {spec['fps']}: per-sample frame rate fed to the fps embedder (SizeEmbedder).",
        "height": f"[{B}] float32: = {H} (pixels) for every sample. STDiT3 uses height[0] for the pos-emb scale; the sampler's timestep transform uses it per sample.",
        "width": f"[{B}] float32: = {W} (pixels) for every sample.",
        "num_frames": f"[{B}] float32: = {F}: pixel frame count; used only by the sampler's timestep transform (num_frames//17*5 = {F // 17 * 5}) and as num_frames of vae.decode. STDiT3 ignores it.",
        "video_for_encode": f"[{B}, 3, {F}, {H}, {W}] float32: (B,3,F,H,W) pixel videos in [-1,1] (uniform random), F = {F}: micro_frame_size=17 chunks of {chunk_words} -> {T} latent frames (the padding happens after the spatial VAE, on its (B,4,n,h,w) output, inside VAE_Temporal.encode; the zero frames take part in the temporal VAE's GroupNorm statistics).",
        "latent_for_decode": f"{lat}: (B,4,T,h,w) N(0,1) latent in the normalised space, decoded with num_frames = {F}.",
    }


def describe_outputs(spec: dict, out: dict, visited: dict) -> dict:
    F = spec["num_frames"]
    T, h, w = latent_geometry(spec)
    gh, gw = -(-h // 2), -(-w // 2)
    S = gh * gw
    shp = lambda k: str(list(out[k].shape))  # noqa: E731
    rf = spec["rflow"]
    o = {
        "vae.image.spatial_mean": f"{shp('vae.image.spatial_mean')}: vae.spatial_vae.encode(image[:, :, None]) with the posterior mean: (B,3,1,H,W) -> (B*1,3,H,W), diffusers AutoencoderKL.encode -> latent_dist.mode() (first 4 of the 8 quant_conv channels) * 0.18215, back to (B,4,1,h,w). This is what the temporal VAE receives.",
        "vae.spatial.enc.conv_in": f"{shp('vae.spatial.enc.conv_in')}: forward hook on spatial_vae.module.encoder.conv_in during the image encode; NCHW with N = B*T (T=1, b-major).",
    }
    n_down = len(VAE_2D_DIFFUSERS["block_out_channels"])
    for i in range(n_down):
        k = f"vae.spatial.enc.down_blocks.{i}"
        tail = ("1 ResnetBlock2D then Downsample2D: pad (0,1,0,1) with zeros, 3x3 stride-2 conv" if i < n_down - 1
                else "1 ResnetBlock2D, no downsampler (last block)")
        o[k] = f"{shp(k)}: forward hook on spatial_vae.module.encoder.down_blocks[{i}] (DownEncoderBlock2D: {tail}), NCHW."
    o.update({
        "vae.spatial.enc.mid_block": f"{shp('vae.spatial.enc.mid_block')}: hook on encoder.mid_block (resnet, single-head self-attention with GroupNorm, resnet), NCHW.",
        "vae.spatial.enc.conv_out": f"{shp('vae.spatial.enc.conv_out')}: hook on encoder.conv_out (after conv_norm_out GroupNorm eps 1e-6 and SiLU), NCHW, 8 = 2*latent channels (double_z).",
        "vae.spatial.quant_conv": f"{shp('vae.spatial.quant_conv')}: hook on spatial_vae.module.quant_conv (1x1 conv): the posterior moments [mean(4) | logvar(4)] before clamping; vae.image.spatial_mean = 0.18215 * moments[:, :4].",
        "vae.temporal.enc.conv_in": f"{shp('vae.temporal.enc.conv_in')}: forward hook on temporal_vae.encoder.conv_in during the image encode, (B,C,T,h,w). The temporal VAE input is vae.image.spatial_mean front-padded in time with 3 zero frames (1 -> 4 frames, pad_at_dim), so T = 4 here.",
    })
    widths = [VAE_TEMPORAL["filters"] * m for m in VAE_TEMPORAL["channel_multipliers"]]
    for i, wd in enumerate(widths):
        k = f"vae.temporal.enc.block_res_blocks.{i}"
        o[k] = f"{shp(k)}: hook on temporal_vae.encoder.block_res_blocks[{i}][-1] (the last ResBlock of encoder level {i}, width {wd}), before that level's conv_blocks[{i}] (if any)."
    for i, down in enumerate(VAE_TEMPORAL["temporal_downsample"]):
        if down:
            k = f"vae.temporal.enc.conv_blocks.{i}"
            o[k] = f"{shp(k)}: hook on temporal_vae.encoder.conv_blocks[{i}]: CausalConv3d k=3, stride (2,1,1), time pad 1 at the front (k-1+(1-stride)), space pad 1, with bias: halves T."
    o.update({
        "vae.temporal.enc.res_blocks": f"{shp('vae.temporal.enc.res_blocks')}: hook on temporal_vae.encoder.res_blocks[-1] (after the final res blocks, before norm1/SiLU/conv2).",
        "vae.temporal.enc.conv2": f"{shp('vae.temporal.enc.conv2')}: hook on temporal_vae.encoder.conv2 (1x1x1 conv after GroupNorm + SiLU): the encoder output.",
        "vae.temporal.quant_conv": f"{shp('vae.temporal.quant_conv')}: hook on temporal_vae.quant_conv (1x1x1 CausalConv3d): moments [mean(4) | logvar(4)]; the latent uses the mean.",
        "vae.image.latent": f"{shp('vae.image.latent')}: VideoAutoencoderPipeline.encode(image[:, :, None]) with posterior MEANS in both sub-VAEs (DiagonalGaussianDistribution.sample() replaced by the mean, in diffusers and in opensora.models.vae.utils): spatial mean*0.18215 -> micro_frame_size chunks of 17 (one chunk of 1 frame) -> temporal_vae.encode (3 zero frames in front) -> mean -> (z - shift)/scale per channel (shift (-0.10,0.34,0.27,0.98), scale (3.85,2.32,2.33,3.06), the real buffers).",
        "vae.video.latent": f"{shp('vae.video.latent')}: VideoAutoencoderPipeline.encode(video_for_encode), posterior means as above; chunking as described for video_for_encode (two chunks: each chunk is padded and encoded on its own, then concatenated in time); (z-shift)/scale.",
        "vae.decode": f"{shp('vae.decode')}: VideoAutoencoderPipeline.decode(latent_for_decode, num_frames={F}): z*scale+shift, then chunks of 5 latent frames -> temporal_vae.decode(chunk, num_frames=min(17, remaining)) (post_quant_conv, decoder, then drop the first (4 - n%4)%4 frames, n = that chunk's num_frames: here chunks of 5 and {T - 5} latent frames with n = 17 and {F - 17}, dropping 3 and {(4 - (F - 17) % 4) % 4} frames), concat in time, then spatial_vae.decode ((B T) C h w in micro batches of 4, / 0.18215, AutoencoderKL.decode) -> (B,3,F,H,W). Not clamped.",
        "stdit3.x_t": f"{shp('stdit3.x_t')}: the model input inside training_losses: where(x_mask, RFlowScheduler.add_noise(z0, noise, t), add_noise(z0, noise, 0) = z0), add_noise = (1 - t/1000)*z0 + (t/1000)*noise per sample (each sample its own t).",
        "stdit3.out": f"{shp('stdit3.out')}: STDiT3(x_t, t, y=y, mask=mask, x_mask=x_mask, fps=fps, height=height, width=width) (B,8,T,h,w) float32 (channels 0..3 = velocity, 4..7 = the unused sigma half). Captured by a forward hook on the model during the training_losses call below. The x_mask=False frames of each sample use the t=0 modulation everywhere, including the T2IFinalLayer quirk LN(LN(x)*(1+scale)+shift)*(1+scale0)+shift0.",
        "stdit3.x_embedder": f"{shp('stdit3.x_embedder')}: hook on model.x_embedder (PatchEmbed3D: zero-pad W then H on the right/bottom to even sizes (here h={h} -> {2 * gh}, w={w} -> {2 * gw}), Conv3d k=s=(1,2,2), flatten): [B, T*S, C] tokens before the 2D pos-emb is added.",
        "stdit3.t_embedder": f"{shp('stdit3.t_embedder')}: hook on model.t_embedder, first call: TimestepEmbedder(t) = MLP(Linear-SiLU-Linear) of [cos(t*f), sin(t*f)], f = exp(-ln(10000)*arange(128)/128), raw t (not /1000), one row per sample.",
        "stdit3.t0_embedder": f"{shp('stdit3.t0_embedder')}: hook on model.t_embedder, second call: TimestepEmbedder(zeros) (computed because x_mask is given).",
        "stdit3.fps_embedder": f"{shp('stdit3.fps_embedder')}: hook on model.fps_embedder (SizeEmbedder, same recipe as the timestep embedder, its own weights) applied to the per-sample fps; t = t_embedder + fps_embedder, t0 = t0_embedder + fps_embedder.",
        "stdit3.t_block": f"{shp('stdit3.t_block')}: hook on model.t_block (SiLU, Linear C->6C) applied to t: t_mlp shared by all blocks; rows (6, C) = shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (added to each block's scale_shift_table). The final layer uses the raw t, not t_mlp.",
        "stdit3.t0_block": f"{shp('stdit3.t0_block')}: hook on model.t_block, second call: t0_mlp = t_block(t0), used for the x_mask=False frames.",
        "stdit3.y_embedder": f"{shp('stdit3.y_embedder')}: hook on model.y_embedder (CaptionEmbedder.y_proj = timm Mlp Linear-GELU(tanh)-Linear) applied to y, BEFORE encode_text drops the masked tokens (all L tokens of every sample, the masked ones included; the valid tokens are then concatenated into [1, sum(y_lens)={sum(spec['y_lens'])}, C] and cross-attention is block-diagonal per sample).",
    })
    for i in range(STDIT3["depth"]):
        for kind in ("spatial", "temporal"):
            k = f"stdit3.{kind}_blocks.{i}"
            o[k] = f"{shp(k)}: forward hook on model.{kind}_blocks[{i}] during the same call: [B, T*S, C] tokens, T-major then padded-grid row-major (S = {gh}x{gw} = {S}). Block order S0,T0,S1,T1,..."
    o.update({
        "loss": f"{shp('loss')}: RFLOW(...).training_losses(model, video_latents, model_kwargs=dict(y=y, mask=mask, x_mask=x_mask, fps=fps, height=height, width=width, num_frames=num_frames), noise=noise, mask=x_mask, t=t)['loss'] (= RFlowScheduler.training_losses): per-sample mean_flat((out[:, :4] - (z0 - noise))^2, mask=x_mask) = sum over that sample's x_mask=True frames and all C,h,w / (n_true_frames * 4*h*w) (n_true_frames = {[int(v) for v in np.asarray(spec_x_mask(spec)).sum(1)]}).",
        "loss.batch_mean": "[]: loss.mean() over the batch (what scripts/train.py backpropagates).",
        "rflow.mask": f"{shp('rflow.mask')}: float mask from apply_mask_strategy(z, refs, ['{rf['mask_strategy']}']*B, loop_i=0, align={rf['align']}): 0.0 for frame 0 (the reference frame, edit_ratio 0), 1.0 elsewhere, every sample.",
        "rflow.z_init": f"{shp('rflow.z_init')}: the sampler's starting latent: noise with frame 0 of every sample replaced by that sample's image latent (vae.image.latent[b, :, 0]) by apply_mask_strategy.",
        "rflow.null_y": f"{shp('rflow.null_y')}: the null caption of the CFG batch: T5Encoder.null(B) = y_embedder.y_embedding[None].repeat(B,1,1)[:, None] (the checkpoint buffer). It is passed with the SAME text mask as the prompt (STDiT3.encode_text repeats `mask` for the 2B batch), so sample b's null caption keeps only its first y_lens[b] tokens.",
        "rflow.timesteps": f"{shp('rflow.timesteps')}: (steps, B) the timesteps actually fed to the model at each step = timestep_transform((1 - i/{rf['num_sampling_steps']})*1000, additional_args, num_timesteps=1000) in float32, per sample: {visited['timesteps']}.",
        "rflow.z_after_2_steps": f"{shp('rflow.z_after_2_steps')}: latent after the first 2 Euler steps of RFLOW.sample (num_sampling_steps={rf['num_sampling_steps']}), i.e. the z the sampler feeds to the model at step index 2 (first half of the CFG batch).",
        "rflow.z_final": f"{shp('rflow.z_final')}: the return value of the full {rf['num_sampling_steps']}-step RFLOW.sample (last step uses dt = t_last/1000).",
    })
    return o


def _padding_words(spec: dict) -> str:
    _, h, w = latent_geometry(spec)
    odd = [n for n, v in (("height", h), ("width", w)) if v % 2]
    if not odd:
        return "even latent height and width (no patch padding)"
    return f"odd latent {' and '.join(odd)}, so PatchEmbed3D zero-pads it and unpatchify crops it"


def spec_x_mask(spec: dict) -> np.ndarray:
    T = latent_geometry(spec)[0]
    return np.stack([np.arange(T) >= n for n in spec["x_mask_cond_frames"]])


def call_text(spec: dict, seed: int, ckpt: dict) -> str:
    import diffusers
    import torch
    import transformers

    rf = spec["rflow"]
    B = spec["B"]
    return (
        f"Upstream {UPSTREAM}, run unmodified from a checkout with torch {torch.__version__} (CPU), transformers {transformers.__version__}, diffusers {diffusers.__version__}, float32 everywhere (no bf16 casting, no autocast), eval mode, torch.no_grad(). "
        "Stubs (not upstream code paths of the maths; tools/upstream/stubs.py): xformers.ops.memory_efficient_attention + fmha.BlockDiagonalMask re-implemented exactly in torch (softmax in fp32, scale head_dim^-0.5); colossalai/av/cv2 dummy import-only modules; torchvision's fake-op registration allowed to fail; opensora.datasets replaced by an import-only module with IMG_FPS = 120 (inference_utils imports it; its own imports need torchvision video I/O); enable_flash_attn=False, enable_layernorm_kernel=False (same maths). "
        "MODELS: (1) STDiT3 = opensora.models.stdit.stdit3.STDiT3(STDiT3Config from stdit3/config.json); written with STDiT3.save_pretrained and reloaded with STDiT3.from_pretrained('<case>/stdit3') before any output is computed. "
        "(2) VAE = opensora.models.vae.vae.VideoAutoencoderPipeline(VideoAutoencoderPipelineConfig(**vae/config.json)) where, to rebuild the tiny spatial VAE, AutoencoderKL.from_pretrained(vae_2d.from_pretrained, subfolder=...) is replaced by diffusers.AutoencoderKL.from_config(vae/config.json['vae_2d_diffusers_config']) (the config a download would have returned), and vae_temporal is built by the MODELS registry from its explicit dict (type VAE_Temporal); then load_state_dict(vae/model.safetensors, strict=True). "
        f"WEIGHTS: torch.manual_seed({seed}); build STDiT3 (upstream initialize_weights) then build the VAE; then every parameter whose elements were all equal ({len(ckpt['perturbed'])} tensors: zero biases, the zero-initialised temporal attn.proj / cross_attn.proj / mlp.fc2 weights and fps_embedder.mlp.2, unit RMSNorm/GroupNorm weights, zero GroupNorm biases) got N(0,0.1) (names containing 'norm') or N(0,0.05) added (STDiT3 first, then the VAE, named_parameters order); rope.freqs untouched; then t_embedder.mlp.0.weight was multiplied by 0.1 (the timestep features at t~1000 have arguments up to 1000 rad, where one float32 ulp of a frequency moves them by ~6e-5; this keeps the case's sensitivity to such implementation noise well below the tolerance). "
        f"INPUTS: torch.Generator().manual_seed({1000 + seed}), drawn in the order of the inputs description (image U(-1,1), video_latents, noise, y N(0,1), video_for_encode U(-1,1), latent_for_decode N(0,1)); t, mask, x_mask, fps, height, width, num_frames fixed. "
        f"RUNS, in order, all with batch B = {B}: (a) vae.spatial_vae.encode(image[:, :, None]) and vae.encode(image[:, :, None]) with taps, posterior means; (b) vae.encode(video_for_encode), means; (c) vae.decode(latent_for_decode, num_frames={spec['num_frames']}); "
        f"(d) RFLOW(num_sampling_steps={rf['num_sampling_steps']}, cfg_scale={rf['cfg_scale']}, use_timestep_transform={rf['use_timestep_transform']}).training_losses(model, video_latents, dict(y, mask, x_mask, fps, height, width, num_frames), noise=noise, mask=x_mask, t=t) with forward hooks on the model and its blocks; "
        f"(e) the sampler: z = noise.clone(); masks = apply_mask_strategy(z, [[vae.image.latent[b]] for b in range(B)], ['{rf['mask_strategy']}']*B, 0, align={rf['align']}); additional_args = prepare_multi_resolution_info('STDiT2', B, (H, W), num_frames, fps[0], 'cpu', float32) (height, width, num_frames, ar, fps), then additional_args['fps'] = fps (the per-sample fps tensor; the script repeats one value); RFLOW(...same...).sample(model, text_encoder, z=z, prompts=B prompts, device='cpu', additional_args=additional_args, mask=masks, progress=False), "
        "where text_encoder.encode returns dict(y=y, mask=mask) (the case's features instead of T5) and text_encoder.null is upstream T5Encoder.null with y_embedder = model.y_embedder (as scripts/inference.py sets it). "
        f"Per step i: x_mask = (mask*1000 >= t_i) per sample (frame 0 False, others True at every step here), the CFG batch is [z_0..z_{{B-1}}; z_0..z_{{B-1}}] with y = [y; null_y], mask repeated ([m_0..m_{{B-1}}, m_0..m_{{B-1}}]), fps repeated by SizeEmbedder, t = [t_i; t_i]; v = v_null + {rf['cfg_scale']}*(v_cond - v_null) from out[:, :4]; z += v * (t_i - t_{{i+1}})/1000 (last step t_i/1000); z = where(x_mask, z, z_before_step) (resets frame 0 to the image latent). The sampler's internal randn_like (re-noising of frames whose mask is in (0,1)) is drawn but unused because the mask is 0/1."
    )


def settings_for(spec: dict, seed: int, inp: dict, visited: dict) -> dict:
    B, H, W, F = spec["B"], spec["H"], spec["W"], spec["num_frames"]
    T, h, w = latent_geometry(spec)
    gh, gw = -(-h // 2), -(-w // 2)
    rf = spec["rflow"]
    return {
        "seed": seed, "dtype": "float32", "posterior": "mode (mean) in both sub-VAEs", "B": B, "H": H, "W": W,
        "num_frames": F, "latent_T": T, "latent_hw": [h, w],
        "stdit_grid": {"T": T, "H": gh, "W": gw, "S": gh * gw, "tokens": T * gh * gw, "padded": [h % 2 == 1, w % 2 == 1]},
        "pos_emb": {"scale": float(np.sqrt(H * W) / STDIT3["input_sq_size"]), "base_size": round((gh * gw) ** 0.5)},
        "t": spec["t"], "fps": spec["fps"], "y_lens": spec["y_lens"],
        "x_mask": inp["x_mask"].astype(int).tolist(),
        "rflow": {
            "num_sampling_steps": rf["num_sampling_steps"], "cfg_scale": rf["cfg_scale"],
            "use_timestep_transform": rf["use_timestep_transform"], "num_timesteps": 1000,
            "use_discrete_timesteps": False, "mask_strategy": rf["mask_strategy"], "align": rf["align"],
            "fps": spec["fps"],
            "timesteps": visited["timesteps"],
            "timesteps_note": "t_0 is 1000 transformed in float32 (ratio*1/(1+(ratio-1)*1)*1000); the generator checks that it does not round above 1000 (upstream would then skip the whole first update).",
            "x_mask_per_step": visited["x_mask_per_step"],
            "cfg_batch": "[cond_0..cond_{B-1}, null_0..null_{B-1}]",
            "z_after_2_steps_is": "the z fed to the model at step index 2",
        },
        "vae_decode_num_frames": F, "micro_frame_size": VAE_PIPELINE["micro_frame_size"],
        "micro_batch_size": VAE_PIPELINE["vae_2d"]["micro_batch_size"],
    }


def architecture() -> dict:
    return {
        "stdit3": {k: STDIT3[k] for k in ("input_sq_size", "in_channels", "patch_size", "hidden_size", "depth",
                                          "num_heads", "mlp_ratio", "pred_sigma", "caption_channels",
                                          "model_max_length", "qk_norm")},
        "stdit3_head_dim": STDIT3["hidden_size"] // STDIT3["num_heads"],
        "vae_2d": {k: VAE_2D_DIFFUSERS[k] for k in ("block_out_channels", "layers_per_block", "norm_num_groups",
                                                    "latent_channels", "down_block_types", "up_block_types")},
        "vae_2d_notes": "diffusers AutoencoderKL: GroupNorm eps 1e-6, mid-block attention single head (head_dim = block_out_channels[-1]) with GroupNorm, Downsample2D pad (0,1,0,1) + stride-2 conv, Upsample2D nearest x2 + conv, decoder has layers_per_block+1 resnets per up block. Open-Sora multiplies latents by 0.18215 (not the config's scaling_factor).",
        "vae_temporal": {k: VAE_TEMPORAL[k] for k in ("filters", "num_res_blocks", "channel_multipliers",
                                                      "temporal_downsample", "num_groups", "latent_embed_dim")},
        "vae_temporal_widths": [VAE_TEMPORAL["filters"] * m for m in VAE_TEMPORAL["channel_multipliers"]],
        "vae_temporal_notes": "GroupNorm eps 1e-5 (torch default) with statistics over (C/groups, T, H, W); CausalConv3d pads time at the front only; time compression x4, space x1.",
    }


CHECKPOINT_FILES = {
    "stdit3/config.json": "STDiT3Config as written by STDiT3.save_pretrained (the same fields as hpcai-tech/OpenSora-STDiT-v3/config.json) with the tiny values.",
    "stdit3/model.safetensors": "the STDiT3 state_dict (save_pretrained, metadata format=pt), real key names incl. the buffer y_embedder.y_embedding [8,32] (the learned null caption) and the parameter rope.freqs [8] (= 1/10000^(arange(0,head_dim,2)/head_dim)).",
    "vae/config.json": "the real hpcai-tech/OpenSora-VAE-v1.2/config.json fields and values (micro_frame_size 17, scale, shift, vae_2d = VideoAutoencoderKL from PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers subfolder vae, micro_batch_size 4) with two changes for the tiny architecture: vae_temporal is {type: VAE_Temporal, ...all constructor arguments...} (the real file says {type: VAE_Temporal_SD, from_pretrained: null}); and the extra key vae_2d_diffusers_config holds the diffusers AutoencoderKL config of the tiny spatial VAE. A port should build the spatial VAE from vae_2d_diffusers_config when it is present, else from the SDXL defaults.",
    "vae/model.safetensors": "the VideoAutoencoderPipeline state_dict (metadata format=pt): spatial_vae.module.* (diffusers 0.27 AutoencoderKL names), temporal_vae.{encoder,decoder,quant_conv,post_quant_conv}.* (convs as ...conv.weight), scale and shift buffers [1,4,1,1,1] with the real values.",
}


# ----------------------------------------------------------------------------------------------------------


def generate(args) -> None:
    import torch
    from safetensors.numpy import save_file

    spec = CASES[args.case]
    out_dir = Path(args.out) if args.out else REPO / "tests" / "golden" / "opensora" / args.case
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(out_dir, args.seed)
    stdit, vae = load_models(out_dir)  # rebuilt from the files on disk, exactly as a user of the case would
    inp = make_inputs(args.seed, spec)
    settings = {"rflow": spec["rflow"]}
    out, visited = compute(stdit, vae, inp, settings)
    # t_0 must not round above 1000 (upstream would skip the first update: x_mask all False)
    if not all(v <= 1000.0 for v in visited["timesteps"][0]):
        raise SystemExit(f"t_0 = {visited['timesteps'][0]} rounds above 1000 for {spec['H']}x{spec['W']}; pick another size")
    assert all(row == [int(v) for v in (np.arange(len(row)) > 0)] for step in visited["x_mask_per_step"] for row in step)
    save_file({k: np.ascontiguousarray(v) for k, v in inp.items()}, out_dir / "inputs.safetensors")
    save_file(out, out_dir / "outputs.safetensors")

    noise = worst(out, compute_float64(stdit, vae, inp, settings), TOL)
    rerun, _ = compute(*load_models(out_dir), inp, settings)
    bitwise = all(np.array_equal(rerun[k], out[k]) for k in out)
    top = sorted(noise.items(), key=lambda kv: -kv[1]["max_err_over_tol"])[:5]
    if top[0][1]["max_err_over_tol"] > 0.25:
        raise SystemExit(f"float32 noise {top[0]} is too close to the tolerance {TOL}")
    alone = per_sample_runs(stdit, vae, inp, out, settings)
    ablation = ablations(stdit, inp)
    sizes = {}
    meta = {
        "backbone": "opensora",
        "component": f"Open-Sora v1.2 end to end with batch {spec['B']} and per-sample t, fps, caption length and x_mask: VideoAutoencoderPipeline (SDXL-layout AutoencoderKL + VAE_Temporal; encoder taps, image/video encode with posterior means, two-chunk decode), STDiT3 (output + per-block taps), rectified-flow training loss with per-sample image-conditioning x_mask, RFLOW sampler with CFG and mask strategy",
        "upstream": f"{UPSTREAM}; diffusers {version('diffusers')}, transformers {version('transformers')}, torch {torch.__version__}",
        "checkpoint": ".",
        "checkpoint_files": CHECKPOINT_FILES,
        "architecture": architecture(),
        "call": call_text(spec, args.seed, ckpt),
        "inputs": describe_inputs(spec, inp),
        "outputs": describe_outputs(spec, out, visited),
        "tolerance": TOL,
        "settings": settings_for(spec, args.seed, inp, visited),
        "coverage": [
            f"Batch {spec['B']} everywhere (VAE, STDiT3, loss, sampler), and per sample: t {spec['t']}, fps {spec['fps']}, valid caption tokens {spec['y_lens']} (block-diagonal cross-attention over the concatenated valid tokens; the CFG null caption is masked with each sample's own mask), x_mask with {spec['x_mask_cond_frames']} leading conditioning frames (t0 modulation per sample and frame, per-sample loss denominators), its own image latent in the sampler.",
            f"Geometry {spec['H']}x{spec['W']} pixels (portrait, H/W = {spec['H'] / spec['W']:.3g}; the public case is 32x48 landscape), {spec['num_frames']} frames: latent (T, h, w) = {latent_geometry(spec)}: " + _padding_words(spec) + f"; two micro_frame_size chunks (17 + {spec['num_frames'] - 17} frames) in encode and decode, the second one shorter than the time factor.",
            "Ablations on the upstream model, each the max |delta stdit3.out[1]| / tolerance when one per-sample value of sample 1 is replaced: " + ", ".join(f"{k}: {v:.0f}x" for k, v in ablation.items()) + ".",
            "Not exercised: the real widths, bf16, flash attention / xformers kernels, sequence parallelism, mask strategies other than '0', mask values in (0,1) (re-noising), posterior.sample(), per-sample sizes within one batch (upstream takes height[0]).",
        ],
        "layouts": "All tensors in upstream layout: images NCHW, videos and latents (B,C,T,H,W), spatial-VAE taps NCHW with N = B*T (b-major), temporal-VAE taps (B,C,T,H,W), STDiT3 taps [B, T*S, C] (T-major, then the padded patch grid row-major). Flax NHWC / NTHWC ports must transpose.",
        "float32_noise": {
            "method": "the same upstream run in float64 (weights, buffers, inputs, torch default dtype; the xformers stand-in keeping float64) compared with these float32 outputs; upstream's own float32 casts (timestep/size sinusoids, RoPE frequencies, RMSNorm variance) stay float32, and the sampler's timestep_transform is evaluated in float32 as in the float32 run (in float64 1000 transforms to 1000.0000000000002 at 32x24 and upstream would skip the first update), so this is a lower bound of the float32 noise",
            "worst_err_over_tolerance": top[0][1]["max_err_over_tol"],
            "worst_output": top[0][0],
            "largest": dict(top),
            "run_to_run": ("a rerun from the files on disk reproduces every output bit for bit (CPU)" if bitwise
                           else "a rerun from the files on disk does NOT reproduce every output bit for bit"),
        },
        "per_sample_runs": alone,
        "generator": f"tools/golden/opensora.py --case {args.case} --seed {args.seed} (--upstream <Open-Sora v1.2.0 checkout>)",
    }
    assert set(meta["outputs"]) == set(out), set(meta["outputs"]) ^ set(out)
    meta["outputs"] = {k: meta["outputs"][k] for k in out}
    assert set(meta["inputs"]) == set(inp), set(meta["inputs"]) ^ set(inp)
    total = 0
    for name in ("inputs.safetensors", "outputs.safetensors", "stdit3/config.json", "stdit3/model.safetensors",
                 "vae/config.json", "vae/model.safetensors"):
        sizes[name] = (out_dir / name).stat().st_size
        total += sizes[name]
    sizes["total_without_case_json"] = total
    meta["sizes_bytes"] = sizes
    (out_dir / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in out_dir.rglob("*"):  # safetensors writes 0600 files
        if f.is_file():
            f.chmod(0o644)
    print(json.dumps({"dir": str(out_dir), "sizes": sizes, "noise_top": top, "bitwise_rerun": bitwise,
                      "outputs": len(out), "timesteps": visited["timesteps"]}, indent=1))


def check(args) -> None:
    """Recompute a case from its own stdit3/, vae/, inputs and settings; compare with its outputs."""
    from safetensors.numpy import load_file

    case = Path(args.check)
    meta = json.loads((case / "case.json").read_text())
    inp = load_file(case / "inputs.safetensors")
    expected = load_file(case / "outputs.safetensors")
    got, visited = compute(*load_models(case), inp, {"rflow": meta["settings"]["rflow"]})
    print(f"missing {sorted(set(expected) - set(got))} extra {sorted(set(got) - set(expected))}")
    worst_name, worst_val = None, -1.0
    for k in expected:
        if k in got:
            d = float(np.abs(got[k].astype(np.float64) - expected[k]).max()) if expected[k].size else 0.0
            print(f"{k:38s} {list(expected[k].shape)!s:24s} max|diff| {d:.3e}")
            if d > worst_val:
                worst_name, worst_val = k, d
    print(f"worst {worst_name} {worst_val:.3e}; timesteps {visited['timesteps']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default=str(DEFAULT_UPSTREAM), help="a checkout of hpcaitech/Open-Sora v1.2.0")
    ap.add_argument("--case", choices=sorted(CASES), help="case name: writes tests/golden/opensora/<case>/ (or --out)")
    ap.add_argument("--out", help="output folder (default tests/golden/opensora/<case>)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", help="recompute this case folder and compare with its outputs.safetensors")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    import_upstream(Path(args.upstream))
    if args.check:
        check(args)
    elif args.case:
        generate(args)
    else:
        ap.error("--case or --check is required")


if __name__ == "__main__":
    main()
