"""Golden cases for CogVideoX image-to-video, computed by diffusers (the installed package: the upstream PyTorch
code) on tiny, randomly initialised models. Format: tests/golden/README.md; same input/output names, layouts and
conventions as the public case shared/fixtures/cogvideox/tiny-5b-i2v.

Runs in the project venv (torch CPU + diffusers 0.42.1):

    python tools/golden/cogvideox.py --case tiny-1.5-odd
    python tools/golden/cogvideox.py --case tiny-1.0-frames
    # recompute an existing case from its own files (from_pretrained) and compare with its outputs.safetensors
    python tools/golden/cogvideox.py --check tests/golden/cogvideox/tiny-1.5-odd [--seed-check]

Nothing from diffusers is copied here: the VAE, transformer, scheduler, ``prepare_latents``,
``_prepare_rotary_positional_embeddings`` and ``__call__`` are the upstream objects, driven through forward hooks.
The only change to upstream behaviour: while the image latents are built, the pipeline module's
``retrieve_latents`` returns ``latent_dist.mode()`` (the posterior mean) instead of ``latent_dist.sample()``.
MKL_CBWR=COMPATIBLE is set before torch is imported (float32 summation order; see the case notes).
"""

from __future__ import annotations

import os

os.environ["MKL_CBWR"] = "COMPATIBLE"  # before torch (MKL reads it at load time)

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "upstream"))
from hooks import recorded  # noqa: E402  (shared by the generators)

TOL = {"atol": 1e-4, "rtol": 1e-4}
TEXT_LEN = 8
TEXT_DIM = 32
LATENT_C = 4
OFS = 2.0  # what CogVideoXImageToVideoPipeline.__call__ passes as ofs (latents.new_full((1,), 2.0))
SAMPLER = {"num_inference_steps": 5, "stop_after": 2, "guidance_scale": 6.0, "use_dynamic_cfg": False, "eta": 0.0}

# The real hub settings of THUDM/CogVideoX-5b-I2V (and what diffusers' conversion script writes for 5B models).
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
    "prediction_type": "v_prediction", "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "snr_shift_scale": 1.0,
}

# ----------------------------------------------------------------------------------------------------------
# Cases: geometry of the run and the shape of the released checkpoint they mirror.

CASES = {
    # CogVideoX1.5-5B-I2V: patch_size_t 2, ofs embedding, patch_bias False, no learned positional table, RoPE
    # 'slice' grid with max size sample_{height,width}/patch (here 8x8 > the 3x5 grid of the run), VAE
    # invert_scale_latents. Odd latent frame count (17 pixel frames -> 5 latent) padded by the pipeline to 6.
    "tiny-1.5-odd": {
        "version": "1.5", "layout": "CogVideoX1.5-5B-I2V", "image_hw": (48, 80), "num_frames": 17, "batch": 2, "t": [437, 81],
        "sample_hw": (16, 16), "sample_frames": 81, "video_for_encode": (1, 25, 16, 24), "latent_for_decode": (1, 7, 2, 3),
        "shard": True,
    },
    # CogVideoX-5b-I2V (v1.0): learned positional table sized for 9 pixel frames (3 latent) at the run's latent
    # size, but run at 17 pixel frames (5 latent): diffusers silently recomputes a sincos table instead.
    "tiny-1.0-frames": {
        "version": "1.0", "layout": "CogVideoX-5b-I2V", "image_hw": (48, 64), "num_frames": 17, "batch": 2, "t": [903, 250],
        "sample_hw": None, "sample_frames": 9, "video_for_encode": (2, 9, 16, 24), "latent_for_decode": (2, 3, 2, 3),
        "shard": False,
    },
}


def transformer_config(spec: dict) -> dict:
    h, w = spec["image_hw"]
    lh, lw = h // 8, w // 8
    sh, sw = spec["sample_hw"] or (lh, lw)
    v15 = spec["version"] == "1.5"
    return {
        "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 2 * LATENT_C, "out_channels": LATENT_C,
        "flip_sin_to_cos": True, "freq_shift": 0, "time_embed_dim": 32,
        "ofs_embed_dim": 32 if v15 else None,  # must equal time_embed_dim (the two embeddings are summed)
        "text_embed_dim": TEXT_DIM, "num_layers": 2, "dropout": 0.0, "attention_bias": True,
        "sample_width": sw, "sample_height": sh, "sample_frames": spec["sample_frames"],
        "patch_size": 2, "patch_size_t": 2 if v15 else None, "temporal_compression_ratio": 4,
        "max_text_seq_length": TEXT_LEN, "activation_fn": "gelu-approximate", "timestep_activation_fn": "silu",
        "norm_elementwise_affine": True, "norm_eps": 1e-5, "spatial_interpolation_scale": 1.875,
        "temporal_interpolation_scale": 1.0, "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": not v15, "patch_bias": not v15,
    }


def vae_config(spec: dict) -> dict:
    h, w = spec["image_hw"]
    return {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["CogVideoXDownBlock3D"] * 4,
        "up_block_types": ["CogVideoXUpBlock3D"] * 4, "block_out_channels": [8, 16, 16, 16],
        "latent_channels": LATENT_C, "layers_per_block": 1, "act_fn": "silu", "norm_eps": 1e-6,
        "norm_num_groups": 4, "temporal_compression_ratio": 4, "sample_height": h, "sample_width": w,
        "scaling_factor": 0.7, "shift_factor": None, "latents_mean": None, "latents_std": None,
        "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
        "invert_scale_latents": spec["version"] == "1.5",
    }


def geometry(spec: dict, transformer_cfg: dict) -> dict:
    """The pipeline's frame arithmetic (CogVideoXImageToVideoPipeline.__call__, step 5)."""
    h, w = spec["image_hw"]
    latent_frames = (spec["num_frames"] - 1) // 4 + 1
    p_t = transformer_cfg["patch_size_t"]
    additional = p_t - latent_frames % p_t if p_t is not None and latent_frames % p_t else 0
    frames_padded = latent_frames + additional
    p = transformer_cfg["patch_size"]
    tokens_t = frames_padded // (p_t or 1)
    return {
        "height": h, "width": w, "batch": spec["batch"], "pipeline_num_frames": spec["num_frames"],
        "latent_frames": latent_frames, "additional_frames_1_5": additional,
        "num_frames_after_padding": spec["num_frames"] + 4 * additional, "transformer_frames": frames_padded,
        "latent_h": h // 8, "latent_w": w // 8, "grid_h": h // 8 // p, "grid_w": w // 8 // p, "grid_t": tokens_t,
        "video_tokens": tokens_t * (h // 8 // p) * (w // 8 // p),
    }


# ----------------------------------------------------------------------------------------------------------
# Upstream model


def build(spec: dict, seed: int):
    """torch.manual_seed(seed); VAE, transformer, scheduler; norms perturbed; learned table perturbed (v1.0)."""
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(**vae_config(spec))
    transformer = CogVideoXTransformer3DModel(**transformer_config(spec))
    scheduler = CogVideoXDDIMScheduler(**SCHEDULER)
    counts = {}
    with torch.no_grad():
        for name, model in (("vae", vae), ("transformer", transformer)):
            n = 0
            for m in model.modules():
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                    m.weight.copy_(1.0 + 0.1 * torch.randn_like(m.weight))
                    if m.bias is not None:
                        m.bias.copy_(0.1 * torch.randn_like(m.bias))
                    n += 1
            counts[name] = n
        pe = transformer.patch_embed
        if transformer.config.use_learned_positional_embeddings:
            pe.pos_embedding.copy_(pe.pos_embedding + 0.2 * torch.randn(pe.pos_embedding.shape, dtype=torch.float32))
    vae = vae.float().eval()
    transformer = transformer.float().eval()
    return vae, transformer, scheduler, counts


def make_pipeline(vae, transformer, scheduler):
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                         scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(case: Path):
    import torch
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(case, text_encoder=None, tokenizer=None)
    assert all(p.dtype == torch.float32 for p in [*pipe.vae.parameters(), *pipe.transformer.parameters()])
    pipe.vae.eval()
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_inputs(spec: dict, geo: dict) -> dict:
    """Drawn from the torch global RNG right after build() (same seeded stream)."""
    import torch

    B, F = spec["batch"], geo["transformer_frames"]
    h, w = spec["image_hw"]
    lh, lw = geo["latent_h"], geo["latent_w"]
    vb, vt, vh, vw = spec["video_for_encode"]
    db, dt, dh, dw = spec["latent_for_decode"]
    inp = {
        "image": torch.rand(B, 3, h, w) * 2 - 1,
        "video_latents": torch.randn(B, F, LATENT_C, lh, lw),
        "noise": torch.randn(B, F, LATENT_C, lh, lw),
        "t": torch.tensor(spec["t"], dtype=torch.int64),
        "prompt_embeds": torch.randn(B, TEXT_LEN, TEXT_DIM),
        "negative_prompt_embeds": torch.randn(B, TEXT_LEN, TEXT_DIM),
        "latent_for_decode": torch.randn(db, LATENT_C, dt, dh, dw),
        "video_for_encode": torch.rand(vb, 3, vt, vh, vw) * 2 - 1,
    }
    assert len(inp["t"]) == B and len(set(spec["t"])) == B, "one distinct training timestep per sample"
    return {k: v.numpy() for k, v in inp.items()}


# ----------------------------------------------------------------------------------------------------------
# The upstream computation


@contextlib.contextmanager
def posterior_mean():
    """The I2V pipeline's retrieve_latents returns latent_dist.mode() (= mean) instead of a sample."""
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as mod

    original = mod.retrieve_latents
    mod.retrieve_latents = lambda encoder_output, generator=None, sample_mode="sample": encoder_output.latent_dist.mode()
    try:
        yield
    finally:
        mod.retrieve_latents = original


def compute(pipe, inp: dict, geo: dict, dtype=None) -> tuple[dict, dict]:
    """Every output of the contract, from the upstream pipeline pieces. Returns (outputs, facts)."""
    import torch

    dtype = dtype or torch.float32
    if dtype != torch.float32:
        pipe = pipe.to(dtype)
    vae, tr, sch = pipe.vae, pipe.transformer, pipe.scheduler
    x = {k: torch.from_numpy(np.array(v)) for k, v in inp.items()}
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in x.items()}
    H, W, B = geo["height"], geo["width"], geo["batch"]
    out: dict = {}
    facts: dict = {}
    with torch.no_grad():
        # (1) VAE image encode (both images in one call), encoder taps
        enc = vae.encoder
        mods = {"vae.enc.conv_in": enc.conv_in}
        mods.update({f"vae.enc.down_blocks.{i}": m for i, m in enumerate(enc.down_blocks)})
        mods.update({"vae.enc.mid_block": enc.mid_block, "vae.enc.conv_out": enc.conv_out})
        taps: dict = {}
        with recorded(mods, taps, keep=lambda _n, o: o[0] if isinstance(o, tuple) else o):
            dist = vae.encode(x["image"].unsqueeze(2)).latent_dist
        out["vae.image.posterior_mean"], out["vae.image.posterior_logvar"] = dist.mean, dist.logvar
        out.update(taps)
        # (2) multi-frame encode, (3) raw decode
        out["vae.video.posterior_mean"] = vae.encode(x["video_for_encode"]).latent_dist.mean
        out["vae.decode"] = vae.decode(x["latent_for_decode"]).sample
        # (4) image latents through the pipeline's own preprocessing and prepare_latents, with the frame count
        # __call__ passes (num_frames + additional_frames * 4)
        image = pipe.video_processor.preprocess(x["image"], height=H, width=W).to(dtype=dtype)
        facts["preprocess_identity"] = bool(torch.equal(image, x["image"]))
        with posterior_mean():
            latents0, image_latents = pipe.prepare_latents(
                image, B, tr.config.in_channels // 2, geo["num_frames_after_padding"], H, W, dtype,
                torch.device("cpu"), None, x["noise"])
            if geo["additional_frames_1_5"]:
                # what prepare_latents does when handed the UNPADDED frame count (not what __call__ does)
                with torch.random.fork_rng():  # latents=None draws fresh noise: keep the global RNG untouched
                    unpadded_lat, unpadded_img = pipe.prepare_latents(
                        image, B, tr.config.in_channels // 2, geo["pipeline_num_frames"], H, W, dtype,
                        torch.device("cpu"), None, None)
                facts["prepare_latents_unpadded"] = {
                    "latents_shape": list(unpadded_lat.shape), "image_latents_shape": list(unpadded_img.shape),
                    "nonzero_frames": [int(i) for i in torch.nonzero(unpadded_img.abs().flatten(2).amax(2)[0]).flatten()],
                    "frame0_equals_frame1": bool(torch.equal(unpadded_img[:, 0], unpadded_img[:, 1])),
                }
        facts["latents_is_noise"] = bool(torch.equal(latents0, x["noise"] * sch.init_noise_sigma))
        facts["image_latents_nonzero_frames"] = [
            int(i) for i in torch.nonzero(image_latents.abs().flatten(2).amax(2)[0]).flatten()]
        out["image_latents"] = image_latents
        # (5) rotary, as __call__ builds it (latents.size(1) = the padded frame count)
        cos, sin = pipe._prepare_rotary_positional_embeddings(H, W, x["noise"].shape[1], torch.device("cpu"))
        out["rotary.cos"], out["rotary.sin"] = cos, sin
        rotary = (cos, sin)
        # (6) training pieces at the per-sample t
        t = x["t"]
        out["x_t"] = sch.add_noise(x["video_latents"], x["noise"], t)
        out["v_target"] = sch.get_velocity(x["video_latents"], x["noise"], t)
        ofs = None if tr.config.ofs_embed_dim is None else x["noise"].new_full((1,), OFS)
        blocks = {}
        for i, blk in enumerate(tr.transformer_blocks):
            blocks[f"transformer.block_hidden_states.{i}"] = blk
        taps = {}
        enc_taps = {}
        with recorded(blocks, taps, keep=lambda _n, o: o[0]), \
                recorded({k.replace("block_hidden", "block_encoder_hidden"): m for k, m in blocks.items()}, enc_taps,
                         keep=lambda _n, o: o[1]):
            sample = tr(hidden_states=torch.cat([out["x_t"], image_latents], dim=2),
                        encoder_hidden_states=x["prompt_embeds"], timestep=t, ofs=ofs, image_rotary_emb=rotary,
                        return_dict=False)[0]
        out["transformer.sample"] = sample
        for i in range(len(tr.transformer_blocks)):
            out[f"transformer.block_hidden_states.{i}"] = taps[f"transformer.block_hidden_states.{i}"]
            out[f"transformer.block_encoder_hidden_states.{i}"] = enc_taps[f"transformer.block_encoder_hidden_states.{i}"]
        out["loss"] = ((sample - out["v_target"]) ** 2).mean()
        # (7) the real pipeline call, stopped after SAMPLER["stop_after"] steps
        visited = []

        def stop(p, i, tt, kwargs):
            visited.append(int(tt))
            if i + 1 >= SAMPLER["stop_after"]:
                p._interrupt = True
            return kwargs

        with posterior_mean():
            lat = pipe(image=x["image"], prompt_embeds=x["prompt_embeds"],
                       negative_prompt_embeds=x["negative_prompt_embeds"], height=H, width=W,
                       num_frames=geo["pipeline_num_frames"], num_inference_steps=SAMPLER["num_inference_steps"],
                       guidance_scale=SAMPLER["guidance_scale"], use_dynamic_cfg=SAMPLER["use_dynamic_cfg"],
                       eta=SAMPLER["eta"], latents=x["noise"], output_type="latent", return_dict=False,
                       callback_on_step_end=stop)[0]
        out[f"sampler.latents_after_{SAMPLER['stop_after']}_steps"] = lat
        facts["sampler_visited"] = visited
        facts["sampler_timesteps"] = [int(v) for v in sch.timesteps]
        # the same 2 steps by hand, from the pieces above
        lat_h = x["noise"] * sch.init_noise_sigma
        ctx = torch.cat([x["negative_prompt_embeds"], x["prompt_embeds"]])
        for tt in sch.timesteps[: SAMPLER["stop_after"]]:
            model_in = torch.cat([torch.cat([lat_h] * 2), torch.cat([image_latents] * 2)], dim=2)
            pred = tr(hidden_states=model_in, encoder_hidden_states=ctx, timestep=tt.expand(2 * B), ofs=ofs,
                      image_rotary_emb=rotary, return_dict=False)[0].float()  # as __call__ (noise_pred.float())
            u, c = pred.chunk(2)
            v = u + SAMPLER["guidance_scale"] * (c - u)
            lat_h = sch.step(v, tt, lat_h, eta=0.0, return_dict=False)[0]
        facts["sampler_by_hand_max_diff"] = float((lat_h - lat).abs().max())
    result = {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in out.items()}
    return result, facts


def probes(pipe, inp: dict, geo: dict, base: dict) -> dict:
    """Upstream behaviours the case relies on, measured (each as max |delta transformer.sample|)."""
    import torch

    tr = pipe.transformer
    x = {k: torch.from_numpy(np.array(v)) for k, v in inp.items()}
    rotary = (torch.from_numpy(base["rotary.cos"]), torch.from_numpy(base["rotary.sin"]))
    hs = torch.cat([torch.from_numpy(base["x_t"]), torch.from_numpy(base["image_latents"])], dim=2)
    ref = torch.from_numpy(base["transformer.sample"])
    ofs = None if tr.config.ofs_embed_dim is None else hs.new_full((1,), OFS)
    res = {}

    def run(**kw):
        args = {"hidden_states": hs, "encoder_hidden_states": x["prompt_embeds"], "timestep": x["t"], "ofs": ofs,
                    "image_rotary_emb": rotary, "return_dict": False}
        args.update(kw)
        with torch.no_grad():
            return tr(**args)[0]

    pe = tr.patch_embed
    calls = []
    original = pe._get_positional_embeddings

    def spy(h, w, f, device=None):
        table = original(h, w, f, device=device)
        calls.append({"sample_height": h, "sample_width": w, "pixel_frames": f, "shape": list(table.shape),
                      "dtype": str(table.dtype).replace("torch.", ""),
                      "text_rows_zero": bool((table[:, :TEXT_LEN] == 0).all())})
        return table

    pe._get_positional_embeddings = spy
    try:
        run()
    finally:
        del pe._get_positional_embeddings
    res["pos_table_recomputed_calls"] = calls
    res["t_reversed_delta"] = float((run(timestep=x["t"].flip(0)) - ref).abs().max())
    res["t_first_for_all_delta"] = float((run(timestep=x["t"][:1].expand(len(x["t"]))) - ref).abs().max())
    if tr.config.use_learned_positional_embeddings:
        saved = pe.pos_embedding.detach().clone()
        with torch.no_grad():
            pe.pos_embedding.zero_()
        try:
            res["zeroed_learned_table_delta"] = float((run() - ref).abs().max())
        finally:
            with torch.no_grad():
                pe.pos_embedding.copy_(saved)
        # contrast: at the native frame count the stored table IS used
        nf = (tr.config.sample_frames - 1) // tr.config.temporal_compression_ratio + 1
        rot_n = pipe._prepare_rotary_positional_embeddings(geo["height"], geo["width"], nf, torch.device("cpu"))
        native = {"hidden_states": hs[:, :nf].contiguous(), "image_rotary_emb": rot_n}
        ref_n = run(**native)
        with torch.no_grad():
            pe.pos_embedding.zero_()
        try:
            res["native_frames_zeroed_table_delta"] = float((run(**native) - ref_n).abs().max())
        finally:
            with torch.no_grad():
                pe.pos_embedding.copy_(saved)
        res["native_latent_frames"] = nf
        res["stored_table_shape"] = list(pe.pos_embedding.shape)
        res["stored_table_dtype_after_load"] = str(pe.pos_embedding.dtype).replace("torch.", "")
    if ofs is not None:
        res["ofs_plus_1_delta"] = float((run(ofs=ofs + 1.0) - ref).abs().max())
        res["patch_embed_proj"] = f"{type(pe.proj).__name__}(bias={pe.proj.bias is not None})"
        # RoPE 'slice' grid: positions are arange indices; max_size only bounds them
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        c2, s2 = get_3d_rotary_pos_embed(embed_dim=tr.config.attention_head_dim, crops_coords=None,
                                         grid_size=(geo["grid_h"], geo["grid_w"]), temporal_size=geo["grid_t"],
                                         grid_type="slice", max_size=(geo["grid_h"], geo["grid_w"]))
        res["rope_same_with_max_size_equal_grid"] = bool(torch.equal(c2, rotary[0]) and torch.equal(s2, rotary[1]))
    return res


def worst(a: dict, b: dict, tol: dict) -> dict:
    res = {}
    for k, av in a.items():
        err = np.abs(av.astype(np.float64) - b[k].astype(np.float64))
        bound = tol["atol"] + tol["rtol"] * np.abs(b[k].astype(np.float64))
        res[k] = {"max_abs_err": float(err.max()) if err.size else 0.0,
                  "max_err_over_tol": float((err / bound).max()) if err.size else 0.0}
    return res


# ----------------------------------------------------------------------------------------------------------
# Writing


def save(out_dir: Path, pipe, spec: dict) -> dict:
    """diffusers layout: model_index.json, scheduler/, vae/, transformer/ (optionally 2 shards + index)."""
    pipe.save_pretrained(out_dir, safe_serialization=True)
    layout = {}
    tdir = out_dir / "transformer"
    if spec["shard"]:
        total = sum(v.numel() * v.element_size() for v in pipe.transformer.state_dict().values())
        max_shard = total * 6 // 10
        for f in tdir.glob("diffusion_pytorch_model*"):
            f.unlink()
        pipe.transformer.save_pretrained(tdir, safe_serialization=True, max_shard_size=max_shard)
        shards = sorted(p.name for p in tdir.glob("diffusion_pytorch_model-*.safetensors"))
        assert len(shards) == 2, shards
        layout["transformer"] = (f"transformer/config.json + {' + '.join(shards)} + diffusion_pytorch_model.safetensors."
                                 f"index.json (save_pretrained, max_shard_size={max_shard} bytes)")
    else:
        layout["transformer"] = "transformer/config.json + transformer/diffusion_pytorch_model.safetensors"
    layout["vae"] = "vae/config.json + vae/diffusion_pytorch_model.safetensors"
    layout["scheduler"] = "scheduler/scheduler_config.json (CogVideoXDDIMScheduler)"
    layout["pipeline"] = ("model_index.json (CogVideoXImageToVideoPipeline; text_encoder and tokenizer are null: load with "
                          "CogVideoXImageToVideoPipeline.from_pretrained(case_dir, text_encoder=None, tokenizer=None))")
    # every stored tensor is float32
    from safetensors import safe_open

    for f in out_dir.rglob("*.safetensors"):
        with safe_open(f, "pt") as s:
            for k in s.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert s.get_slice(k).get_dtype() == "F32", (f, k)
    return layout


def fmt(v: float) -> str:
    return f"{v:.10f}"


def describe(spec, geo, inp, out, facts, probe, counts, layout, pipe, seed, noise_top, bitwise) -> dict:
    import diffusers
    import torch

    tc = dict(pipe.transformer.config)
    vc = dict(pipe.vae.config)
    v15 = spec["version"] == "1.5"
    B, H, W = geo["batch"], geo["height"], geo["width"]
    F, lh, lw = geo["transformer_frames"], geo["latent_h"], geo["latent_w"]
    gh, gw, gt, N = geo["grid_h"], geo["grid_w"], geo["grid_t"], geo["video_tokens"]
    p, p_t = tc["patch_size"], tc["patch_size_t"]
    sch = pipe.scheduler
    ac = sch.alphas_cumprod.double()
    ts = [int(v) for v in np.asarray(inp["t"])]
    shp = lambda k: str(list(out[k].shape))
    sf = vc["scaling_factor"]
    D = tc["num_attention_heads"] * tc["attention_head_dim"]
    hd = tc["attention_head_dim"]
    step = 1000 // SAMPLER["num_inference_steps"]
    timesteps = facts["sampler_timesteps"]
    taken = [{"t": t, "prev_t": t - step, "alpha_cumprod_t": float(ac[t]),
              "alpha_cumprod_prev": float(ac[t - step]) if t - step >= 0 else 1.0}
             for t in timesteps[: SAMPLER["stop_after"]]]
    sched_words = (
        f"Scheduler ({SAMPLER['num_inference_steps']} inference steps): CogVideoXDDIMScheduler(**scheduler/scheduler_config.json); "
        f"set_timesteps({SAMPLER['num_inference_steps']}) gives timesteps {timesteps} ('trailing' spacing: round(arange(1000, 0, -1000/N)) - 1). "
        f"scheduler.step(model_output, t, sample, eta=0.0) uses prev_t = t - 1000 // N (NOT the next entry of the timestep list): steps taken "
        + ", ".join(f"t={s['t']}->prev {s['prev_t']}" for s in taken)
        + ". With alpha = alphas_cumprod[t], alpha_prev = alphas_cumprod[prev_t] (final_alpha_cumprod = 1.0 if prev_t < 0): "
        "x0_hat = sqrt(alpha)*x - sqrt(1-alpha)*v; x_prev = a*x + b*x0_hat with a = sqrt((1-alpha_prev)/(1-alpha)), "
        "b = sqrt(alpha_prev) - sqrt(alpha)*a (alphas_cumprod is float64 inside the scheduler; a, b computed in float64, "
        "then applied to float32 tensors). eta is ignored. No extra scheduler state is carried between DDIM steps."
    )
    t_words = ", ".join(f"alphas_cumprod[{t}] = {fmt(float(ac[t]))}" for t in ts)
    ofs_words = (f"ofs = torch.full((1,), {OFS}) (what __call__ passes: latents.new_full((1,), fill_value=2.0); shape [1], "
                 f"NOT per sample: ofs_embedding(ofs_proj(ofs)) [1, {tc['time_embed_dim']}] is broadcast-added to the time "
                 f"embedding [B, {tc['time_embed_dim']}]; ofs_proj = Timesteps({tc['ofs_embed_dim']}, flip_sin_to_cos=True, shift 0) "
                 f"on the float 2.0, ofs_embedding = TimestepEmbedding({tc['ofs_embed_dim']}, {tc['ofs_embed_dim']}, silu))"
                 if v15 else "ofs = None (no ofs embedding in v1.0)")
    # ---- geometry / positional words
    if v15:
        pad_words = (
            f"Frame padding (CogVideoX 1.5, patch_size_t={p_t}): __call__ computes latent_frames = (num_frames-1)//4+1 = "
            f"({geo['pipeline_num_frames']}-1)//4+1 = {geo['latent_frames']}; since {geo['latent_frames']} % {p_t} != 0, "
            f"additional_frames = {p_t} - {geo['latent_frames']} % {p_t} = {geo['additional_frames_1_5']} and num_frames += "
            f"additional_frames*4 -> {geo['num_frames_after_padding']}; prepare_latents then gets num_frames={geo['num_frames_after_padding']} "
            f"-> (21-1)//4+1 = {F} latent frames (its own 'shape[1] + shape[1] % patch_size_t' padding adds 0 because {F} is even), "
            f"image_latents = cat([encoded image frame, {F - 1} zero frames]) and its 'first_frame = image_latents[:, :F % p_t]' "
            f"prepend is empty (F % p_t = 0). So the image condition is [image, 0, 0, 0, 0, 0] (frame 0 only non-zero: "
            f"{facts['image_latents_nonzero_frames']}), latents/noise have {F} frames, and the transformer sees {F} frames = "
            f"{gt} temporal patches. With output_type='latent' all {F} frames are returned (the 'latents[:, additional_frames:]' "
            f"trim, which drops the FIRST {geo['additional_frames_1_5']} frame(s), only happens before decoding). "
            "(Calling prepare_latents directly with the UNPADDED num_frames=17 gives something else: "
            f"latents shape {facts['prepare_latents_unpadded']['latents_shape']}, image_latents shape "
            f"{facts['prepare_latents_unpadded']['image_latents_shape']} with non-zero frames "
            f"{facts['prepare_latents_unpadded']['nonzero_frames']} (the image frame duplicated at the front); "
            "__call__ never does that.)"
        )
        pos_words = (
            f"No absolute positional table (use_learned_positional_embeddings False; use_positional_embeddings = not use_rotary = False: "
            f"patch_embed has no pos_embedding buffer; checked: _get_positional_embeddings was called "
            f"{len(probe['pos_table_recomputed_calls'])} times during transformer.sample). Patch embedding (1.5): "
            f"hidden_states [B, F, C, h, w] -> permute to [B, F, h, w, C] -> reshape [B, F/{p_t}, {p_t}, h/{p}, {p}, w/{p}, {p}, C] "
            f"-> permute (0,1,3,5,7,2,4,6) -> flatten to [B, (F/{p_t})*(h/{p})*(w/{p}), C*{p_t}*{p}*{p}] (feature order "
            f"(c, pt, ph, pw)) -> patch_embed.proj = {probe['patch_embed_proj']}: NOTE patch_bias=False in the config but "
            f"diffusers' 1.5 branch builds nn.Linear(in*p*p*p_t, D) with its default bias, so the checkpoint HAS "
            f"patch_embed.proj.bias and it is used. Unpatchify: proj_out -> reshape [B, F/{p_t}, h/{p}, w/{p}, C, {p_t}, {p}, {p}] "
            f"-> permute (0,1,5,4,2,6,3,7) -> [B, F, C, h, w]."
        )
        rope_words = (
            f"pipeline._prepare_rotary_positional_embeddings(height={H}, width={W}, num_frames={F}) (the 1.5 branch) = "
            f"get_3d_rotary_pos_embed(embed_dim={hd}, crops_coords=None, grid_size=({gh},{gw}), temporal_size=(F+p_t-1)//p_t = {gt}, "
            f"grid_type='slice', max_size=(sample_height//{p}, sample_width//{p}) = ({tc['sample_height'] // p},{tc['sample_width'] // p})) "
            f"-> positions t = 0..{gt - 1}, h = 0..{gh - 1}, w = 0..{gw - 1} (integer arange indices; max_size only sets how many rows "
            f"are computed before slicing, so it must be >= the grid; checked: max_size = the grid gives bit-identical tables: "
            f"{probe['rope_same_with_max_size_equal_grid']})"
        )
    else:
        calls = probe["pos_table_recomputed_calls"]
        c0 = calls[0] if calls else {}
        native = (tc["sample_frames"] - 1) // 4 + 1
        pad_words = (f"No frame padding (v1.0: patch_size_t None): latent frames = ({geo['pipeline_num_frames']}-1)//4+1 = {F}; "
                     f"image_latents = cat([encoded image frame, {F - 1} zero frames]).")
        pos_words = (
            f"Positional table: the checkpoint stores the learned patch_embed.pos_embedding {probe['stored_table_shape']} "
            f"(sized for sample_frames={tc['sample_frames']} -> {native} latent frames: {TEXT_LEN} text rows + {native}*{lh // p}*{lw // p} video rows; "
            f"sincos init + 0.2*N(0,1)), but this run has {F} latent frames, so CogVideoXPatchEmbed.forward finds "
            f"sample_frames ({tc['sample_frames']}) != (F-1)*4+1 = {(F - 1) * 4 + 1} and SILENTLY recomputes "
            f"_get_positional_embeddings(height={lh}, width={lw}, frames={(F - 1) * 4 + 1}) instead of using the stored table "
            f"(no warning; the ValueError only fires for a different height/width). Checked: that recompute was called "
            f"{len(calls)} time(s) during transformer.sample, returned {c0.get('shape')} ({c0.get('dtype')}; text rows all zero: "
            f"{c0.get('text_rows_zero')}), and zeroing the stored table changes transformer.sample by "
            f"{probe['zeroed_learned_table_delta']:.1e} (i.e. the learned table is NOT used). The recomputed table is "
            f"get_3d_sincos_pos_embed(D={D}, spatial (w={lw // p}, h={lh // p}), temporal {F}, spatial_interpolation_scale "
            f"{tc['spatial_interpolation_scale']}, temporal_interpolation_scale {tc['temporal_interpolation_scale']}) flattened "
            f"(t, h, w) and placed after {TEXT_LEN} zero text rows: [1, {TEXT_LEN}+{N}, {D}], built in {c0.get('dtype')} (numpy-style sincos), cast to float32 and added to "
            f"cat([text_proj(prompt_embeds), video patches]). Patch embedding (1.0): Conv2d k=s={p} (bias) per frame."
        )
        gh_, gw_ = gh, gw
        bw, bh = tc["sample_width"] // p, tc["sample_height"] // p
        from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import (
            get_resize_crop_region_for_grid,
        )

        crop = get_resize_crop_region_for_grid((gh_, gw_), bw, bh)
        rope_words = (
            f"pipeline._prepare_rotary_positional_embeddings(height={H}, width={W}, num_frames={F}) (the 1.0 branch) = "
            f"get_3d_rotary_pos_embed(embed_dim={hd}, crops_coords=get_resize_crop_region_for_grid(({gh},{gw}), {bw}, {bh}) = {crop}, "
            f"grid_size=({gh},{gw}), temporal_size={F}, grid_type='linspace') -> positions t = 0..{F - 1}, h = 0..{gh - 1}, w = 0..{gw - 1}"
        )
    dt, dh_, dw_ = hd // 4, hd // 8 * 3, hd // 8 * 3
    rope_words += (f"; rows ordered (t, h, w) row-major over the {N} video tokens; columns = [t: {dt} | h: {dh_} | w: {dw_}], "
                   "each frequency repeated twice (interleaved pairs)")
    tok_order = f"(f/{p_t}, h/{p}, w/{p})" if v15 else f"(f, h/{p}, w/{p})"
    # ---- VAE chunking words
    vt = spec["video_for_encode"][1]
    nb = max(vt // 8, 1)
    rem = vt % 8
    chunks = [(8 * i + (0 if i == 0 else rem), 8 * (i + 1) + rem) for i in range(nb)]
    dtf = spec["latent_for_decode"][1]
    nbd = max(dtf // 2, 1)
    remd = dtf % 2
    dchunks = [(2 * i + (0 if i == 0 else remd), 2 * (i + 1) + remd) for i in range(nbd)]
    ch_words = ", ".join(f"[{a}:{b}]" for a, b in chunks)
    dch_words = ", ".join(f"[{a}:{b}]" for a, b in dchunks)
    scale_words = (f"MULTIPLIED by 1/scaling_factor (invert_scale_latents=True: image_latents = (1/{sf}) * z, "
                   "the 1.5 quirk 'the CogVideoX team forgot to multiply the scaling factor during training')"
                   if vc["invert_scale_latents"] else f"MULTIPLIED by scaling_factor ({sf} * z)")
    sampler_call = (
        f"CogVideoXImageToVideoPipeline.__call__(image=image, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, "
        f"height={H}, width={W}, num_frames={geo['pipeline_num_frames']}, num_inference_steps={SAMPLER['num_inference_steps']}, "
        f"guidance_scale={SAMPLER['guidance_scale']}, use_dynamic_cfg=False, latents=noise, output_type='latent')"
    )
    inputs = {
        "image": f"{list(inp['image'].shape)} float32 in [-1,1] (torch.rand*2-1): the {B} conditioning images (different), as the pipeline has them after VideoProcessor.preprocess (which leaves a [-1,1] tensor of the right size unchanged; checked: {facts['preprocess_identity']}).",
        "video_latents": f"{list(inp['video_latents'].shape)} float32 N(0,1): clean latent video x0 in the diffusers transformer layout B F C H W (random, not an encoding); F = {F}" + (f" = the PADDED latent frame count ({geo['latent_frames']} + {geo['additional_frames_1_5']})." if v15 else "."),
        "noise": f"{list(inp['noise'].shape)} float32 N(0,1): epsilon for add_noise/get_velocity AND the initial latents of the sampler (pipeline `latents=` argument; init_noise_sigma = 1; prepare_latents returns it unchanged: {facts['latents_is_noise']}).",
        "t": f"[{B}] int64 = {ts}: one DIFFERENT training timestep per sample ({t_words}).",
        "prompt_embeds": f"{list(inp['prompt_embeds'].shape)} float32 N(0,1): stands in for the T5 last_hidden_state of the {B} prompts (different per sample).",
        "negative_prompt_embeds": f"{list(inp['negative_prompt_embeds'].shape)} float32 N(0,1): stands in for the T5 encodings of the negative prompts; used only by the CFG sampler.",
        "latent_for_decode": f"{list(inp['latent_for_decode'].shape)} float32 N(0,1): VAE layout B C T H W, for the decode check.",
        "video_for_encode": f"{list(inp['video_for_encode'].shape)} float32 in [-1,1]: VAE layout B C T H W, pixel video for the multi-frame encode check.",
    }
    outputs = {
        "vae.image.posterior_mean": f"{shp('vae.image.posterior_mean')}: vae.encode(image.unsqueeze(2)).latent_dist.mean (the {B} images as 1-frame videos {[B, 3, 1, H, W]} in ONE encode call; channels-first B C T H W; = first 4 channels of the encoder output).",
        "vae.image.posterior_logvar": f"{shp('vae.image.posterior_logvar')}: .latent_dist.logvar of the same call (last 4 channels of the encoder output, clamped to [-30, 20]).",
        "vae.enc.conv_in": f"{shp('vae.enc.conv_in')}: forward-hook output (tensor part of the (out, conv_cache) tuple) of vae.encoder.conv_in during the image encode.",
    }
    for i in range(len(vc["block_out_channels"])):
        k = f"vae.enc.down_blocks.{i}"
        outputs[k] = f"{shp(k)}: output of vae.encoder.down_blocks[{i}] (after its resnets and downsampler if any) during the image encode."
    outputs.update({
        "vae.enc.mid_block": f"{shp('vae.enc.mid_block')}: output of vae.encoder.mid_block during the image encode.",
        "vae.enc.conv_out": f"{shp('vae.enc.conv_out')}: output of vae.encoder.conv_out (after norm_out + SiLU) during the image encode = the 2*4 posterior moments [mean | logvar before clamp].",
        "vae.video.posterior_mean": f"{shp('vae.video.posterior_mean')}: vae.encode(video_for_encode).latent_dist.mean, one vae.encode call, tiling and slicing off. Frame batching: AutoencoderKLCogVideoX._encode splits the {vt} frames into {nb} chunk(s) (num_sample_frames_batch_size 8, num_batches = max(T//8, 1), the first chunk also takes the T % 8 remainder: frames {ch_words}) and runs the encoder once per chunk, carrying the causal-conv cache (conv_cache dict) from chunk to chunk; GroupNorm statistics are per chunk and per sample. Outputs are concatenated along T.",
        "vae.decode": f"{shp('vae.decode')}: vae.decode(latent_for_decode).sample. The latents are decoded RAW: NOT divided by scaling_factor. Tiling off. AutoencoderKLCogVideoX._decode splits the {dtf} latent frames into {nbd} chunk(s) (num_latent_frames_batch_size 2, first chunk takes the remainder: {dch_words}) and runs the decoder once per chunk, carrying the conv cache; outputs concatenated along T.",
        "image_latents": f"{shp('image_latents')}: the I2V image condition exactly as CogVideoXImageToVideoPipeline.prepare_latents builds it (that function was called, with the num_frames that __call__ passes it: {geo['num_frames_after_padding']}), except that retrieve_latents was patched to return latent_dist.mode() = the posterior MEAN instead of latent_dist.sample(generator). Steps: each image is encoded SEPARATELY (prepare_latents loops over the batch: vae.encode(img.unsqueeze(0)) on [1,3,1,{H},{W}]) -> mean [1,4,1,{lh},{lw}], concatenated -> permute to B F C H W [{B},1,4,{lh},{lw}] -> {scale_words} -> concatenate {F - 1} all-zero frames after it along dim 1 -> {shp('image_latents')}. Only frame 0 is non-zero. {pad_words}",
        "rotary.cos": f"{shp('rotary.cos')}: cos half of image_rotary_emb from {rope_words}.",
        "rotary.sin": f"{shp('rotary.sin')}: sin half of the same image_rotary_emb.",
        "x_t": f"{shp('x_t')}: scheduler.add_noise(video_latents, noise, t) = sqrt(a_t)*x0 + sqrt(1-a_t)*noise, a_t = alphas_cumprod[t[b]] per sample b.",
        "v_target": f"{shp('v_target')}: scheduler.get_velocity(video_latents, noise, t) = sqrt(a_t)*noise - sqrt(1-a_t)*x0, per sample.",
        "transformer.sample": f"{shp('transformer.sample')}: transformer(hidden_states=cat([x_t, image_latents], dim=2) {[B, F, 2 * LATENT_C, lh, lw]} (noisy channels first, image channels second), encoder_hidden_states=prompt_embeds, timestep=t (int64 [{B}], one per sample), {ofs_words}, image_rotary_emb=(rotary.cos, rotary.sin), return_dict=False)[0]: the v-prediction, B F C H W.",
    })
    for i in range(tc["num_layers"]):
        outputs[f"transformer.block_hidden_states.{i}"] = f"{shp(f'transformer.block_hidden_states.{i}')}: first element (video tokens) of the output of transformer.transformer_blocks[{i}] (forward hook) during the transformer.sample call; tokens ordered {tok_order}."
        outputs[f"transformer.block_encoder_hidden_states.{i}"] = f"{shp(f'transformer.block_encoder_hidden_states.{i}')}: second element (text tokens) of the output of transformer.transformer_blocks[{i}] during the same call."
    outputs["loss"] = "[] (scalar): ((transformer.sample - v_target)**2).mean() over ALL elements of both samples (one scalar, not per sample)."
    k = f"sampler.latents_after_{SAMPLER['stop_after']}_steps"
    outputs[k] = (
        f"{shp(k)}: latents after the first {SAMPLER['stop_after']} denoising steps of {sampler_call}, stopped after step index "
        f"{SAMPLER['stop_after'] - 1} (callback_on_step_end sets pipe._interrupt, the remaining steps are skipped), with the image latents "
        f"built from the posterior MEAN (= image_latents above). Each step: model_in = cat([cat([latents]*2), cat([image_latents]*2)], dim=2) "
        f"(batch order [uncond x{B}, cond x{B}]); noise_pred = transformer(model_in, encoder_hidden_states=cat([negative_prompt_embeds, prompt_embeds]), "
        f"timestep=t.expand({2 * B}), ofs={'full((1,), 2.0)' if v15 else 'None'}, image_rotary_emb=rotary); u, c = noise_pred.chunk(2); "
        f"v = u + {SAMPLER['guidance_scale']}*(c - u); latents = scheduler.step(v, t, latents)[0]. {sched_words} "
        f"Written out by hand and checked against the real pipeline call (max diff {facts['sampler_by_hand_max_diff']:.1e})."
        + (f" All {F} latent frames (incl. the padding frame) are returned: output_type='latent' skips the pipeline's trim." if v15 else "")
    )
    assert set(outputs) == set(out), set(outputs) ^ set(out)
    outputs = {k: outputs[k] for k in out}
    # ---- call / details
    vae_norms, tr_norms = counts["vae"], counts["transformer"]
    call = (
        f"Tiny random {spec['layout']} image-to-video stack: AutoencoderKLCogVideoX (vae/), CogVideoXTransformer3DModel (transformer/"
        + (", weights sharded into 2 safetensors files with an index" if spec["shard"] else "")
        + "), CogVideoXDDIMScheduler (scheduler/, the real hub settings), model_index.json (text_encoder/tokenizer null). "
        f"Built with torch.manual_seed({seed}) (VAE first, then transformer); then every LayerNorm/GroupNorm got weight = 1 + 0.1*N(0,1) and bias = 0.1*N(0,1) "
        f"({vae_norms} VAE + {tr_norms} transformer norms, module order)"
        + (", and the persistent learned positional table patch_embed.pos_embedding (text rows included) = its sincos init + 0.2*N(0,1)" if not v15 else "")
        + f"; model.eval(), float32, torch.no_grad(), MKL_CBWR=COMPATIBLE. Inputs drawn after the models from the same seeded torch RNG. "
        f"All outputs computed from the pipeline RELOADED from this folder (CogVideoXImageToVideoPipeline.from_pretrained). "
        f"BATCH {B}: two different images, prompt embeddings, negative prompt embeddings and training timesteps. "
        f"Latent geometry: image {H}x{W} -> latent {lh}x{lw} (VAE spatial factor 8, temporal 4), transformer patch grid {gh}x{gw}"
        + (f" with temporal patch {p_t}" if v15 else "")
        + f"; pipeline num_frames {geo['pipeline_num_frames']} -> {geo['latent_frames']} latent frames"
        + (f", padded to F = {F} (additional_frames = {geo['additional_frames_1_5']})" if v15 else f"; F = {F}")
        + f"; {N} video tokens + {TEXT_LEN} text tokens. {pad_words} {pos_words} Transformer: {ofs_words}. "
        f"Sampler: {sched_words}"
    )
    tcfg = {k: v for k, v in tc.items() if not k.startswith("_")}
    vcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vc.items() if not k.startswith("_")}
    details = {
        "layout_mirrored": spec["layout"],
        "height": H, "width": W, "batch": B,
        "pipeline_num_frames": geo["pipeline_num_frames"], "latent_frames": geo["latent_frames"],
        "additional_frames_1_5": geo["additional_frames_1_5"], "transformer_frames": F,
        "latent_hw": [lh, lw], "patch_grid": [gt, gh, gw], "video_tokens": N, "text_tokens": TEXT_LEN,
        "ofs": OFS if v15 else None,
        "transformer_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in tcfg.items()},
        "vae_config": vcfg,
        "scheduler_config": dict(SCHEDULER),
        "scheduler_class": "CogVideoXDDIMScheduler",
        "scheduler_note": "THUDM/CogVideoX-5b-I2V ships CogVideoXDDIMScheduler with these settings; the 1.5 case uses the same class/settings (what diffusers' conversion script writes for 5B models). The official CogVideo CLI demo swaps in CogVideoXDPMScheduler with use_dynamic_cfg=True; that is NOT what is tested here.",
        "sampler": {
            "num_inference_steps": SAMPLER["num_inference_steps"], "timesteps": timesteps, "steps_taken": taken,
            "visited_by_callback": facts["sampler_visited"], "guidance_scale": SAMPLER["guidance_scale"],
            "use_dynamic_cfg": False, "eta": 0.0, "init_noise_sigma": float(sch.init_noise_sigma),
            "extra_state": "none (DDIM is stateless between steps; scale_model_input is the identity)",
            "image_latents": "posterior mean (not a sample), see outputs.image_latents",
            "by_hand_max_diff": facts["sampler_by_hand_max_diff"],
        },
        "alphas_cumprod_t": [float(ac[t]) for t in ts],
        "vae_video_encode_chunks": nb, "vae_decode_chunks": nbd,
        "seed": seed,
        "norm_perturbation": "weight = 1 + 0.1*N(0,1), bias = 0.1*N(0,1) on every LayerNorm/GroupNorm",
        "dtypes": "all checkpoint tensors and all float inputs/outputs are float32; t is int64",
        "checks": {**probe, **{k: v for k, v in facts.items() if k not in ("sampler_timesteps",)}},
        "shapes": {"inputs": {k: list(v.shape) for k, v in inp.items()},
                   "outputs": {k: list(v.shape) for k, v in out.items()}},
        "float32_noise": {
            "method": "the same upstream computation in float64 (pipeline.to(float64), float64 inputs; RoPE tables stay float32 as diffusers builds them, and apply_rotary_emb computes in float32) compared with these float32 outputs, in units of the tolerance",
            "worst_err_over_tolerance": noise_top[0][1]["max_err_over_tol"], "worst_output": noise_top[0][0],
            "largest": dict(noise_top),
        },
        "run_to_run": ("reloading with from_pretrained and recomputing reproduces every output bit for bit (CPU)" if bitwise
                       else "reloading and recomputing does NOT reproduce every output bit for bit"),
        "notes": [
            "Reference float32 noise: running with and without MKL_CBWR=COMPATIBLE changes outputs by up to ~1e-6 (summation order inside MKL/oneDNN); these fixtures were produced with MKL_CBWR=COMPATIBLE.",
            "VAE GroupNorm statistics are taken over (C/G, T, H, W) of the current encoder/decoder chunk, per sample; the causal 3D convs pad time by repeating frame 0 (k-1 = 2 copies) on the first chunk and use the previous chunk's last 2 frames (conv_cache) on later chunks; spatial padding is zero padding 1.",
            "vae.image.* come from ONE batched encode of both images; image_latents from prepare_latents, which encodes each image on its own (batch 1): the two agree up to float32 noise, not necessarily bit for bit.",
            "All transformer block taps are the block outputs (after both gated residual adds), before norm_final.",
            f"t differs per sample: the time embedding (and so every block's AdaLN modulation) differs per sample (checked: feeding t reversed moves transformer.sample by {probe['t_reversed_delta']:.2e}, feeding t[0] to both samples by {probe['t_first_for_all_delta']:.2e}); the sampler uses one t for the whole (CFG-doubled) batch.",
            "VideoProcessor.preprocess emits a FutureWarning for torch tensors in [-1,1] (it expects [0,1]) but passes them through unchanged (checked bit for bit); the [-1,1] convention of the public case is kept.",
        ] + ([
            "patch_bias=False is what the real CogVideoX1.5 config says, but diffusers' 1.5 patch embedding is nn.Linear(C*p*p*p_t, D) with a bias regardless; the bias is in the checkpoint and is applied.",
            f"ofs matters: changing it from 2.0 to 3.0 moves transformer.sample by {probe.get('ofs_plus_1_delta', 0):.2e}.",
            f"sample_height/sample_width = {tc['sample_height']}/{tc['sample_width']} (latent units) are LARGER than the run's latent {lh}x{lw} and unequal to it; for 1.5 they only set the RoPE max grid ({tc['sample_height'] // p}x{tc['sample_width'] // p}) and __call__'s default height/width; nothing else depends on them.",
        ] if v15 else [
            "diffusers' from_pretrained keeps patch_embed.pos_embedding in the float64 dtype it was created with, copying the stored float32 values into it (here unused anyway: see call).",
            f"At the native frame count ((F-1)*4+1 == sample_frames = {tc['sample_frames']}, i.e. F = {probe['native_latent_frames']}) the stored learned table IS added (checked: there, zeroing it moves transformer.sample by {probe['native_frames_zeroed_table_delta']:.2e}); this case deliberately runs at {geo['pipeline_num_frames']} pixel frames (F = {F}), where it is ignored.",
        ]),
    }
    return {
        "backbone": "cogvideox",
        "component": "vae + transformer + scheduler (CogVideoXImageToVideoPipeline pieces)",
        "upstream": f"diffusers {diffusers.__version__} (torch {torch.__version__}, CPU, float32)",
        "checkpoint": ".",
        "checkpoint_layout": layout,
        "call": call,
        "inputs": inputs,
        "outputs": outputs,
        "tolerance": dict(TOL),
        "details": details,
        "generator": f"tools/golden/cogvideox.py --case {spec['name']} --seed {seed}",
    }


def generate(args) -> None:
    import torch
    from safetensors.numpy import save_file

    spec = dict(CASES[args.case], name=args.case)
    out_dir = Path(args.out) if args.out else REPO / "tests" / "golden" / "cogvideox" / args.case
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        vae, transformer, scheduler, counts = build(spec, args.seed)
        geo = geometry(spec, dict(transformer.config))
        inp = make_inputs(spec, geo)
        pipe_mem = make_pipeline(vae, transformer, scheduler)
        layout = save(tmp, pipe_mem, spec)
        save_file({k: np.ascontiguousarray(v) for k, v in inp.items()}, tmp / "inputs.safetensors")
        # outputs from the files on disk, exactly as a user of the case would load them
        pipe = load_pipeline(tmp)
        out, facts = compute(pipe, inp, geo)
        save_file(out, tmp / "outputs.safetensors")
        mem, _ = compute(pipe_mem, inp, geo)
        same_as_memory = all(np.array_equal(mem[k], out[k]) for k in out)
        rerun, _ = compute(load_pipeline(tmp), inp, geo)
        bitwise = all(np.array_equal(rerun[k], out[k]) for k in out)
        probe = probes(load_pipeline(tmp), inp, geo, out)
        ref64, _ = compute(load_pipeline(tmp), inp, geo, dtype=torch.float64)
        noise = worst(out, ref64, TOL)
        top = sorted(noise.items(), key=lambda kv: -kv[1]["max_err_over_tol"])[:5]
        if top[0][1]["max_err_over_tol"] > 0.25:
            raise SystemExit(f"float32 noise {top[0]} is too close to the tolerance {TOL}")
        if facts["sampler_by_hand_max_diff"] != 0.0:
            print(f"note: by-hand sampler differs from the pipeline call by {facts['sampler_by_hand_max_diff']:.3e}")
        meta = describe(spec, geo, inp, out, facts, probe, counts, layout, pipe, args.seed, top, bitwise)
        meta["details"]["checks"]["in_memory_model_equals_reloaded"] = same_as_memory
        (tmp / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({"dir": str(out_dir), "total_bytes": sum(sizes.values()), "sizes": sizes,
                      "noise_top": top, "bitwise_rerun": bitwise, "same_as_memory": same_as_memory,
                      "probes": probe, "facts": facts}, indent=1))


def check(args) -> None:
    """Recompute a case from its own folder (from_pretrained) and inputs; compare with its outputs."""
    from safetensors.numpy import load_file

    case = Path(args.check)
    meta = json.loads((case / "case.json").read_text())
    d = meta["details"]
    pipe = load_pipeline(case)
    inp = load_file(case / "inputs.safetensors")
    expected = load_file(case / "outputs.safetensors")
    spec = {"image_hw": (d["height"], d["width"]), "num_frames": d["pipeline_num_frames"], "batch": d["batch"]}
    geo = geometry(spec, dict(pipe.transformer.config))
    got, facts = compute(pipe, inp, geo)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    print(f"missing {missing} extra {extra}")
    worst_name, worst_val = None, -1.0
    for k in expected:
        if k not in got:
            continue
        dd = float(np.abs(got[k].astype(np.float64) - expected[k]).max()) if expected[k].size else 0.0
        print(f"{k:44s} {list(expected[k].shape)!s:22s} max|diff| {dd:.3e}")
        if dd > worst_val:
            worst_name, worst_val = k, dd
    print(f"worst {worst_name} {worst_val:.3e}; sampler visited {facts['sampler_visited']}")
    if args.seed_check:
        name = meta["generator"].split("--case ")[1].split()[0]
        vae, tr, _, _ = build(dict(CASES[name], name=name), d["seed"])
        bad = []
        for mine, ref in ((vae, pipe.vae), (tr, pipe.transformer)):
            rs = ref.state_dict()
            for k, v in mine.state_dict().items():
                if not torch_equal(v, rs[k]):
                    bad.append(k)
        fresh_inp = make_inputs(dict(CASES[name], name=name), geo)
        bad += [f"input {k}" for k in inp if not np.array_equal(fresh_inp[k], inp[k])]
        print("weights and inputs rebuilt from the seed: " + ("bit for bit" if not bad else f"{len(bad)} differ: {bad[:5]}"))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a.double() == b.double()).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), help="which case to write (tests/golden/cogvideox/<case>/ or --out)")
    ap.add_argument("--out", help="output folder (default tests/golden/cogvideox/<case>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", help="recompute this case folder and compare with its outputs.safetensors")
    ap.add_argument("--seed-check", action="store_true", help="with --check: also rebuild weights and inputs from the seed")
    args = ap.parse_args()
    import warnings

    import torch
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    # VideoProcessor.preprocess warns that [-1,1] tensors are deprecated (it still passes them through unchanged)
    warnings.filterwarnings("ignore", message="Passing `image` as torch tensor with value range in \\[-1,1\\]")

    torch.set_num_threads(2)
    if args.check:
        check(args)
    elif args.case:
        generate(args)
    else:
        ap.error("--case or --check is required")


if __name__ == "__main__":
    sys.exit(main())
