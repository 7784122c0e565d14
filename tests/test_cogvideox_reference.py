"""Live parity against diffusers: tiny random models (5b-I2V and 1.5 layouts) saved with save_pretrained,
converted by the real converter, run on both sides. Needs the torch extra; run alone with ``-m reference``."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the live reference tests need the torch extra")
diffusers = pytest.importorskip("diffusers", reason="the live reference tests need diffusers")

pytestmark = [pytest.mark.reference, pytest.mark.slow]  # slow: not in the quick tier

TINY_VAE = dict(
    block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
    sample_height=32, sample_width=48,
)
V10 = dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=32,
           text_embed_dim=24, num_layers=2, sample_height=4, sample_width=6, sample_frames=9,
           max_text_seq_length=5, use_learned_positional_embeddings=True, use_rotary_positional_embeddings=True)
V15 = dict(V10, patch_size_t=2, ofs_embed_dim=32, patch_bias=False, use_learned_positional_embeddings=False,
           sample_height=12, sample_width=12, sample_frames=13)


def _perturb_norms(module):
    """Non-trivial norm affines (weights 1 + noise, biases noise) so a missing or swapped one is caught."""
    for m in module.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))


@pytest.fixture(scope="module", params=["v1.0", "v1.5"])
def pipeline(request, tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    tr = CogVideoXTransformer3DModel(**(V10 if request.param == "v1.0" else V15)).eval()
    vae = AutoencoderKLCogVideoX(**TINY_VAE).eval()
    _perturb_norms(tr)
    _perturb_norms(vae)
    tr.save_pretrained(folder / "transformer", max_shard_size="200KB")  # sharded, with an index.json
    vae.save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXImageToVideoPipeline"}))
    from weights_convert.cogvideox import load_diffusers

    config, _, params, _ = load_diffusers(folder, with_text=False)
    return request.param, tr, vae, config, params


def test_transformer_and_taps_match(pipeline):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import (
        get_resize_crop_region_for_grid,
    )

    from anti_i2v_jax.backbones.cogvideox.transformer import (
        CogVideoXTransformer3DModel,
        block_taps,
        rotary_embedding,
    )

    variant, tr, _, config, params = pipeline
    cfg = config.transformer
    f = 4 if variant == "v1.5" else 3
    gh, gw = (cfg.sample_height // 2, cfg.sample_width // 2) if variant == "v1.0" else (3, 5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, f, cfg.in_channels, gh * 2, gw * 2, generator=g)
    text = torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.tensor([321])
    if variant == "v1.0":
        crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // 2, cfg.sample_height // 2)
        rope = get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), f)
        ofs = None
    else:
        rope = get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (gh, gw), (f + 1) // 2, grid_type="slice",
                                       max_size=(cfg.sample_height // 2, cfg.sample_width // 2))
        ofs = torch.full((1,), 2.0)
    hooks, taps = [], {}
    for i, block in enumerate(tr.transformer_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out[0].numpy())))
    with torch.no_grad():
        ref = tr(x, text, t, image_rotary_emb=rope, ofs=ofs, return_dict=False)[0].numpy()
    for h in hooks:
        h.remove()

    ours_rope = rotary_embedding(cfg, f, gh, gw)
    np.testing.assert_allclose(ours_rope[0], rope[0].numpy(), atol=1e-6)
    model = CogVideoXTransformer3DModel(cfg, taps=tuple(range(cfg.num_layers)))
    out, state = model.apply(
        {"params": params["transformer"]}, jnp.asarray(x.numpy().transpose(0, 1, 3, 4, 2)), jnp.asarray(text.numpy()),
        jnp.asarray([321]), None, None if ofs is None else jnp.asarray([2.0]), mutable=["intermediates"],
    )
    np.testing.assert_allclose(np.asarray(out).transpose(0, 1, 4, 2, 3), ref, atol=1e-4, rtol=1e-4)
    video, _ = block_taps(state, range(cfg.num_layers))
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(video[i]), taps[i], atol=1e-4, rtol=1e-4)


def test_vae_image_and_video_encode_match(pipeline):
    from anti_i2v_jax.backbones.cogvideox.vae import AutoencoderKLCogVideoX

    _, _, vae, config, params = pipeline
    g = torch.Generator().manual_seed(2)
    model = AutoencoderKLCogVideoX(config.vae)
    for frames in (1, 9):
        x = torch.rand(1, 3, frames, 32, 48, generator=g) * 2 - 1
        with torch.no_grad():
            ref = vae.encode(x).latent_dist.mean.numpy()
        mean, _ = model.apply({"params": params["vae"]}, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)), method=model.encode)
        np.testing.assert_allclose(np.asarray(mean).transpose(0, 4, 1, 2, 3), ref, atol=1e-4, rtol=1e-4)
