"""The OpenCLIP transformer's scanned execution (nn/clip.py ``scan``): one compiled block over stacked parameters,
the same values and taps as the looped blocks the checkpoints hold; DynamiCrafter's real-size layout."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anti_i2v_jax.nn.clip import Transformer, stack_resblocks


def test_scanned_blocks_equal_the_looped_ones():
    x = jax.random.normal(jax.random.key(1), (2, 7, 32))
    mask = jnp.triu(jnp.full((7, 7), -jnp.inf), 1)  # a causal additive mask, as the text tower's
    looped = Transformer(32, 3, 4, taps=(0, 2))
    params = looped.init(jax.random.key(0), x, mask)["params"]
    out, state = looped.apply({"params": params}, x, mask, mutable=["intermediates"])
    scanned = Transformer(32, 3, 4, taps=(0, 2), scan=True)
    stacked = stack_resblocks(params, 3)
    shapes = jax.tree.map(lambda a: a.shape, jax.eval_shape(scanned.init, jax.random.key(0), x, mask)["params"])
    assert shapes == jax.tree.map(lambda a: a.shape, stacked)  # init gives the stacked layout
    got, got_state = scanned.apply({"params": stacked}, x, mask, mutable=["intermediates"])
    np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)
    assert set(got_state["intermediates"]) == {"tap:0", "tap:2"}
    for k in ("tap:0", "tap:2"):
        np.testing.assert_allclose(got_state["intermediates"][k][0], state["intermediates"][k][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="runs all its 3 layers"):
        scanned.apply({"params": stacked}, x, mask, run=2)


def test_dynamicrafter_real_size_runs_its_clip_tower_scanned():
    """Real-size execution scans the CLIP image tower; converted (looped) weights are restacked on load."""
    from anti_i2v_jax.backbones.dynamicrafter import (
        abstract_backbone,
        real_size_execution,
        scan_layout,
    )
    from anti_i2v_jax.backbones.dynamicrafter.backbone import abstract_params
    from anti_i2v_jax.backbones.dynamicrafter.config import tiny

    config = tiny()
    assert not config.vision.scan_layers and real_size_execution(config).vision.scan_layers
    looped = abstract_params(config)
    stacked = scan_layout(looped, real_size_execution(config))
    assert stacked["clip_image"]["transformer"]["resblocks"]["block"]["ln_1"]["scale"].shape == (
        config.vision.layers, config.vision.width)
    want = abstract_backbone(dataclasses.replace(config), "dynamicrafter-tiny").params["clip_image"]
    assert jax.tree.map(lambda a: a.shape, want) == jax.tree.map(lambda a: a.shape, stacked["clip_image"])
    assert scan_layout(looped, config) is looped  # looped execution keeps the checkpoint's layout
