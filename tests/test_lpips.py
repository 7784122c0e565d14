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
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        for name in ("pair", "odd"):
            y = nhwc(inputs[f"{name}.y"], jnp.float64)
            grad = jax.jit(jax.grad(lambda x: jnp.sum(apply(p64, x, y))))(nhwc(inputs[f"{name}.x"], jnp.float64))
            np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2), want[f"{name}.grad_x"],
                                       **meta["tolerance"])


def test_lpips_model_of_single_images_and_identity(case):
    model = lpips.LPIPSModel(_params(case[1]), "case")
    x = load_file(CASE / "inputs.safetensors")["odd.x"][0].transpose(1, 2, 0)
    assert float(model(model.params, jnp.asarray(x), jnp.asarray(x))) == 0.0
    g = jax.grad(lambda a: model(model.params, a, jnp.asarray(x)))(jnp.asarray(x) + 0.0)
    assert np.all(np.isfinite(g))  # zero distance and all-zero ReLU positions keep a finite gradient


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
