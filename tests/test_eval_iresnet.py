"""The Flax iResNet (C-FIQA) against CR-FIQA's PyTorch iResNet: the golden case, and loading a backbone.pth."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.eval import iresnet

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / "tests" / "golden" / "crfiqa" / "tiny-r18"
sys.path.insert(0, str(REPO / "tools" / "golden"))
from seeded import seeded_weights  # noqa: E402


@pytest.fixture(scope="module")
def case():
    meta = json.loads((CASE / "case.json").read_text())
    return meta, seeded_weights(meta["keys"], meta["seed"])


def _config(meta):
    return iresnet.IResNetConfig(layers=tuple(meta["layers"]), num_features=meta["num_features"])


def test_iresnet_reproduces_the_upstream_case(case):
    from weights_convert.core import DictSource

    meta, weights = case
    params = iresnet.from_source(DictSource(weights), _config(meta))
    x = load_file(CASE / "inputs.safetensors")["images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    want = load_file(CASE / "outputs.safetensors")
    emb, quality = jax.jit(iresnet.IResNet(_config(meta)).apply)({"params": params}, x)
    np.testing.assert_allclose(emb, want["embedding"], **meta["tolerance"])
    np.testing.assert_allclose(quality, want["quality"], **meta["tolerance"])


def test_a_backbone_pth_loads_with_every_key_checked(case, tmp_path):
    torch = pytest.importorskip("torch")
    meta, weights = case
    path = tmp_path / "backbone.pth"
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    config, params = iresnet.load(path, _config(meta))
    assert config.quality_head
    x = load_file(CASE / "inputs.safetensors")["images"].transpose(0, 2, 3, 1)
    _, quality = iresnet.IResNet(config).apply({"params": params}, x)
    np.testing.assert_allclose(quality, load_file(CASE / "outputs.safetensors")["quality"], **meta["tolerance"])

    torch.save({k: torch.from_numpy(v) for k, v in weights.items() if k != "layer3.1.bn2.running_var"}, path)
    with pytest.raises(UserError, match="layer3_1/bn2/running_var"):
        iresnet.load(path, _config(meta))
    with pytest.raises(UserError, match="iresnet50, iresnet100"):
        iresnet.load(path, "iresnet200")
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    assert iresnet.load(path, "iresnet18")[0].layers == tuple(meta["layers"])  # the case is an iResNet-18
    with pytest.raises(UserError, match="no such checkpoint"):
        iresnet.load(tmp_path / "missing.pth")


def test_preprocess_is_bgr_in_minus_one_one():
    face = np.zeros((1, 112, 112, 3), np.uint8)
    face[..., 0] = 255  # pure red
    x = iresnet.preprocess(face)
    assert x[0, 0, 0].tolist() == [-1.0, -1.0, 1.0]  # B, G, R


def test_cfiqa_column_scores_aligned_faces(case, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("dlib")
    from PIL import Image
    from skimage import data

    from anti_i2v_jax.eval import Missing, align
    from anti_i2v_jax.eval.face_quality import CrFiqa
    from anti_i2v_jax.eval.identity import DlibFaces
    from anti_i2v_jax.eval.suite import EvalSettings, Evaluator

    meta, weights = case
    path = tmp_path / "backbone.pth"
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    photo = data.astronaut()
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((512, 512)))
    model = CrFiqa(path, _config(meta), faces=DlibFaces())
    scores = model.frame_scores(np.stack([photo, cat, photo[:, ::-1].copy()]))
    assert scores[1] is None and scores[0] is not None and scores[2] is not None
    # The score is the network on the aligned crop: recompute it by hand.
    face = align.align(photo, align.five_points(model.faces.landmarks(photo)))
    _, q = iresnet.IResNet(model.config).apply({"params": model.params}, iresnet.preprocess(face[None]))
    assert scores[0] == pytest.approx(float(q[0]), abs=1e-4)  # batched and jitted vs alone: the model tolerance
    assert model.score(np.stack([cat])) is None

    settings = EvalSettings(cfiqa=path, cfiqa_arch="iresnet50")
    with pytest.raises(UserError, match="checkpoint does not match"):  # the tiny case is not an iResNet-50
        Evaluator(settings).video(photo, photo[None], photo[None])
    assert isinstance(Evaluator(EvalSettings()).video(photo, photo[None], photo[None])["cfiqa"], Missing)


def test_alignment_puts_the_landmarks_on_the_template():
    pytest.importorskip("cv2")
    from anti_i2v_jax.eval import align

    rng = np.random.default_rng(0)
    angle, scale, shift = 0.3, 1.7, np.array([40.0, -12.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = align.ARCFACE_TEMPLATE @ rot.T + shift  # a face: the template moved by a similarity
    m = align.similarity(points, align.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(points @ m[:, :2].T + m[:, 2], align.ARCFACE_TEMPLATE, atol=1e-9)
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    assert align.align(image, points).shape == (112, 112, 3)
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48], lm[30], lm[48], lm[54] = [10, 20], [30, 20], [20, 30], [12, 40], [28, 40]
    np.testing.assert_array_equal(align.five_points(lm), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])


def test_arcface_ism_on_aligned_faces(case, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("dlib")
    from PIL import Image
    from skimage import data

    from anti_i2v_jax.eval import align
    from anti_i2v_jax.eval.arcface import ArcFace
    from anti_i2v_jax.eval.identity import DlibFaces
    from anti_i2v_jax.eval.suite import EvalSettings, Evaluator

    meta, weights = case
    path = tmp_path / "arcface.pth"
    torch.save({k: torch.from_numpy(v) for k, v in weights.items() if not k.startswith("qs.")}, path)  # no head
    photo = data.astronaut()
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((512, 512)))
    model = ArcFace(path, _config(meta), faces=DlibFaces())
    assert not model.config.quality_head
    got = model.ism([photo], [photo, cat])
    assert got == {"ism": pytest.approx(1.0, abs=1e-5), "fdfr_arcface": 0.5}
    rng = np.random.default_rng(0)
    noisy = np.clip(photo.astype(int) + rng.integers(-40, 41, photo.shape), 0, 255).astype(np.uint8)
    emb = model.embed([photo, noisy])
    face = align.align(noisy, align.five_points(model.faces.landmarks(noisy)))
    want, _ = iresnet.IResNet(model.config).apply({"params": model.params}, iresnet.preprocess(face[None], "rgb"))
    np.testing.assert_allclose(emb[1], np.asarray(want[0]), rtol=1e-4, atol=1e-4)  # RGB input, as arcface_torch
    cos = emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1])
    assert model.ism([photo], [noisy])["ism"] == pytest.approx(cos, abs=1e-6) and cos < 1.0
    with pytest.raises(UserError, match="no quality head"):
        from anti_i2v_jax.eval.face_quality import CrFiqa

        CrFiqa(path, _config(meta), faces=model.faces)
    ev = Evaluator(EvalSettings(arcface=path, arcface_arch="iresnet50"))
    with pytest.raises(UserError, match="checkpoint does not match"):  # not an iResNet-50
        ev.video(photo, photo[None], photo[None])
