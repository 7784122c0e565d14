"""LPIPS-VGG in Flax against the ``lpips`` package (golden case tests/golden/lpips/tiny-vgg, seeded weights), and
loading it from the files users have (torchvision's vgg16 .pth + lpips' heads, or one LPIPS state dict)."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.nn import lpips

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / "tests" / "golden" / "lpips" / "tiny-vgg"
sys.path.insert(0, str(REPO / "tools" / "golden"))
from seeded import seeded_weights  # noqa: E402


@pytest.fixture(scope="module")
def case():
    meta = json.loads((CASE / "case.json").read_text())
    weights = seeded_weights(meta["keys"], meta["seed"])
    for k in meta["keys"]:  # as the generator: the lins.K alias holds linK's tensor
        if k.startswith("lins."):
            weights[k] = weights[f"lin{k.split('.')[1]}.model.1.weight"]
    return meta, weights


def _params(weights):
    from weights_convert.core import DictSource, convert
    from weights_convert.lpips import LPIPS_IGNORE, LPIPS_RULES

    params, _ = convert(DictSource(weights), LPIPS_RULES, lpips.abstract_params(), ignore=LPIPS_IGNORE)
    return params


def test_lpips_reproduces_the_upstream_case(case):
    """Distances and per-stage shares in float32; the input gradient in float64, as the case was computed: in
    float32 a max-pool window whose two largest values are within rounding routes its gradient either way, so a
    float32 gradient is right only up to those discrete choices (seen on this case: 0.5% of pixels)."""
    meta, weights = case
    params = _params(weights)
    inputs, want = load_file(CASE / "inputs.safetensors"), load_file(CASE / "outputs.safetensors")
    nhwc = lambda a, dtype=jnp.float32: jnp.asarray(a.transpose(0, 2, 3, 1), dtype)  # noqa: E731
    apply = lambda p, x, y: lpips.LPIPS().apply({"params": p}, x, y)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        for name in ("pair", "odd"):
            shares = jax.jit(apply)(params, nhwc(inputs[f"{name}.x"]), nhwc(inputs[f"{name}.y"]))
            np.testing.assert_allclose(np.sum(shares, -1), want[f"{name}.distance"], **meta["tolerance"])
            for k in range(5):
                np.testing.assert_allclose(shares[:, k], want[f"{name}.layer.{k}"], **meta["tolerance"])
    with jax.enable_x64(True):  # the odd-sized pair (its pools floor); the even one is the same code path
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        for name in ("odd",):
            y = nhwc(inputs[f"{name}.y"], jnp.float64)
            grad = jax.jit(jax.grad(lambda x: jnp.sum(apply(p64, x, y))))(nhwc(inputs[f"{name}.x"], jnp.float64))
            np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2), want[f"{name}.grad_x"],
                                       **meta["tolerance"])


def test_lpips_model_of_single_images_and_identity(case):
    model = lpips.LPIPSModel(_params(case[1]), "case")
    x = jnp.asarray(load_file(CASE / "inputs.safetensors")["odd.x"][0].transpose(1, 2, 0))
    value, g = jax.jit(jax.value_and_grad(lambda a: model(model.params, a, x)))(x + 0.0)
    assert abs(float(value)) < 1e-9  # zero up to the batched convolution's rounding of identical halves
    assert np.all(np.isfinite(g))  # zero distance and all-zero ReLU positions keep a finite gradient
    y = jnp.asarray(load_file(CASE / "inputs.safetensors")["odd.y"][0].transpose(1, 2, 0))
    split = jax.jit(lambda a, b: model.distance_to(model.params, a, model.features(model.params, b)))(x, y)
    np.testing.assert_allclose(split, jax.jit(lambda a, b: model(model.params, a, b))(x, y), rtol=1e-5)


def test_lpips_loads_from_torchvision_and_lpips_files(case, tmp_path):
    torch = pytest.importorskip("torch")
    meta, weights = case
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    # torchvision's vgg16 state dict: features.N (the slices' global indices) and the unused classifier
    vgg = {"features." + k.split(".", 2)[2]: t(v)
           for k, v in weights.items() if k.startswith("net.slice")}
    vgg["classifier.0.weight"] = torch.zeros(4096, 25088)
    vgg["classifier.0.bias"] = torch.zeros(4096)
    heads = {k: t(v) for k, v in weights.items() if k.startswith("lin") and not k.startswith("lins")}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    x = load_file(CASE / "inputs.safetensors")
    want = load_file(CASE / "outputs.safetensors")["pair.distance"]
    for model in (lpips.load(tmp_path / "vgg16.pth", tmp_path / "vgg.pth"),):
        d = model(model.params, jnp.asarray(x["pair.x"].transpose(0, 2, 3, 1)), jnp.asarray(x["pair.y"].transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-6)
    # one whole LPIPS state dict (net.sliceK.N, linK, lins.K, scaling_layer) in one file
    whole = {k: t(v) for k, v in weights.items()}
    whole["scaling_layer.shift"] = torch.tensor(lpips.SHIFT).reshape(1, 3, 1, 1)
    whole["scaling_layer.scale"] = torch.tensor(lpips.SCALE).reshape(1, 3, 1, 1)
    torch.save(whole, tmp_path / "lpips_whole.pth")
    model = lpips.load(tmp_path / "lpips_whole.pth")
    np.testing.assert_allclose(
        model(model.params, jnp.asarray(x["pair.x"].transpose(0, 2, 3, 1)), jnp.asarray(x["pair.y"].transpose(0, 2, 3, 1))),
        want, rtol=1e-4, atol=1e-6)

    # every tensor is checked: a missing head, a head given twice, a missing file
    torch.save({k: v for k, v in heads.items() if not k.startswith("lin4")}, tmp_path / "three.pth")
    with pytest.raises(UserError, match="lin4"):
        lpips.load(tmp_path / "vgg16.pth", tmp_path / "three.pth")
    with pytest.raises(UserError, match="in both"):
        lpips.load(tmp_path / "lpips_whole.pth", tmp_path / "vgg.pth")
    with pytest.raises(UserError, match="no such file"):
        lpips.load(tmp_path / "vgg16.pth", tmp_path / "absent.pth")
    whole["lins.2.model.1.weight"] = whole["lins.2.model.1.weight"] * 2
    torch.save(whole, tmp_path / "bad_alias.pth")
    with pytest.raises(UserError, match="differ"):
        lpips.load(tmp_path / "bad_alias.pth")


# ------------------------------------------------------------------------------ in the attack


@pytest.fixture(scope="module")
def random_lpips():
    return lpips.LPIPSModel(lpips.init_params(0), "random LPIPS-VGG (test)")


def test_lpips_terms_follow_the_weights(random_lpips):
    """Without LPIPS weights VGMShield's LPIPS term is off and Anti-I2V's aux is CLIP only (or off where there is no
    CLIP either); with them both run, and the notes say which half of aux is missing."""
    from anti_i2v_jax import AttackConfig, resolve_terms
    from anti_i2v_jax.backbones.registry import load

    cog, dc = load("cogvideox-tiny"), load("dynamicrafter-tiny")
    vgm, anti = AttackConfig.for_method("vgmshield"), AttackConfig()
    config, notes = resolve_terms(dc, vgm)
    assert config.term_names == ("vgm_vae", "vgm_clip") and "--lpips" in notes["vgm_lpips"]
    assert "CLIP image distance only" in resolve_terms(dc, anti)[1]["aux"]
    assert "aux" not in resolve_terms(cog, anti)[0].term_names
    config, notes = resolve_terms(dc.with_lpips(random_lpips), vgm)
    assert config.term_names == ("vgm_vae", "vgm_clip", "vgm_lpips") and notes == {}
    assert resolve_terms(dc.with_lpips(random_lpips), anti)[1] == {}
    config, notes = resolve_terms(cog.with_lpips(random_lpips), anti)
    assert "aux" in config.term_names and "LPIPS only" in notes["aux"] and "no CLIP" in notes["aux"]
    with_lpips = cog.with_lpips(random_lpips)
    assert "lpips" in with_lpips.attack_params and "lpips" not in cog.attack_params
    assert with_lpips.configured(precision="bf16").lpips is random_lpips


def test_vgmshield_lpips_term_moves_the_right_way(random_lpips):
    """Undirected VGMShield ascends LPIPS to the clean image (from 0, growing every step). Directed VGMShield descends
    it: the run that also has the LPIPS term ends perceptually closer to the clean image than the same directed run
    without it, although the VAE term pulls both towards the target."""
    from double import TinyBackbone

    from anti_i2v_jax import AttackConfig, Protector

    bb = TinyBackbone.create().with_lpips(random_lpips)
    image = (np.random.default_rng(3).uniform(size=(32, 32, 3)) * 255).astype(np.uint8)
    run = dict(steps=4, chunk_size=4, checkpoint_every=4, eps=8 / 255)

    undirected = Protector(bb, AttackConfig.for_method("vgmshield", **run)).protect([image])[0].history["vgm_lpips"]
    assert undirected[0] == pytest.approx(0.0, abs=1e-7) and np.all(np.diff(undirected) > 0)

    distance = jax.jit(lambda a, b: random_lpips(random_lpips.params, a, b))

    def directed(weights):
        config = AttackConfig.for_method("vgmshield-directed", weights=weights, **run)
        out = Protector(bb, config).protect([image])[0]
        return float(distance(jnp.asarray(out.image / 255.0, jnp.float32), jnp.asarray(image / 255.0, jnp.float32)))

    # with the LPIPS term weighted to dominate, the pull towards the clean image shows clearly
    assert directed((("vgm_vae", 1.0), ("vgm_lpips", 100.0))) < 0.5 * directed((("vgm_vae", 1.0),))


def test_anti_i2v_aux_ascends_lpips(random_lpips):
    """aux alone (weight -1: maximised) on the double, whose aux is LPIPS only: the image moves and aux grows."""
    from double import TinyBackbone

    from anti_i2v_jax import AttackConfig, Protector

    bb = TinyBackbone.create().with_lpips(random_lpips)
    image = (np.random.default_rng(4).uniform(size=(32, 32, 3)) * 255).astype(np.uint8)
    config = AttackConfig(weights=(("aux", -1.0),), schedule="rgb", steps=3, chunk_size=3, checkpoint_every=3,
                          normalize_terms=False)
    result = Protector(bb, config).protect([image])[0]
    assert np.abs(result.image.astype(int) - image.astype(int)).max() > 0
    assert np.all(np.diff(result.history["aux"]) > 0)
