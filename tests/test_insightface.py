"""The insightface ONNX face pipeline (anti_i2v_jax/eval/insightface.py) against insightface 0.7.3 itself, on the
golden case tests/golden/insightface/tiny (two tiny random ONNX models with the interfaces of insightface's
buffalo_l pack; outputs computed by insightface's SCRFD.detect, norm_crop and ArcFaceONNX.get)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the insightface ONNX path needs the eval extra (onnxruntime)")
pytest.importorskip("onnx", reason="the insightface ONNX path needs the eval extra (onnx)")

from anti_i2v_jax.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / "tests" / "golden" / "insightface" / "tiny"


@pytest.fixture(scope="module")
def case():
    from PIL import Image
    from safetensors.numpy import load_file

    from anti_i2v_jax.eval.insightface import InsightFace

    images = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted((REPO / "examples").glob("*.png"))}
    images["grey"] = np.full((320, 320, 3), 128, np.uint8)
    return InsightFace(CASE), images, load_file(CASE / "outputs.safetensors"), json.loads((CASE / "case.json").read_text())


def test_detections_equal_insightface(case):
    """Boxes, scores and keypoints after decoding, rescaling and NMS, every face of every image (hundreds on the
    portraits: the random detector fires often), and none on a flat grey image."""
    face, images, expected, meta = case
    tol = meta["tolerance"]
    for name in meta["faces_found"]:
        det, kps = face.detect(images[name])
        assert det.shape == expected[f"{name}.det"].shape, name
        np.testing.assert_allclose(det, expected[f"{name}.det"], **tol, err_msg=name)
        np.testing.assert_allclose(kps, expected[f"{name}.kps"], **tol, err_msg=name)
    assert meta["faces_found"]["grey"] == 0 and min(meta["faces_found"][n] for n in ("astronaut", "grace_hopper")) > 0


def test_alignment_and_embedding_equal_insightface(case):
    face, images, expected, meta = case
    for name in ("astronaut", "grace_hopper"):
        det, kps = face.detect(images[name])
        crop = face.crop(images[name], kps[0])
        assert np.abs(crop.astype(int) - expected[f"{name}.crop"]).max() <= 1, name  # cv2's fixed-point warp
        np.testing.assert_allclose(face.embedding(expected[f"{name}.crop"]), expected[f"{name}.embedding"],
                                   rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(face.embed([images[name]])[0], expected[f"{name}.embedding"], rtol=1e-4, atol=1e-4)


def test_ism_and_fdfr(case):
    """The photo against itself is 1; a frame without a face counts in FDFR and not in ISM."""
    face, images, _, _ = case
    photo = images["astronaut"]
    out = face.ism([photo], [photo, images["grey"]])
    assert out["ism"] == pytest.approx(1.0, abs=1e-6) and out["fdfr_arcface"] == 0.5
    assert face.ism([images["grey"]], [photo])["ism"] is None


def test_a_folder_without_the_models_is_one_clear_error(tmp_path):
    from anti_i2v_jax.eval.insightface import InsightFace

    with pytest.raises(UserError, match="no such folder"):
        InsightFace(tmp_path / "missing")
    (tmp_path / "det.onnx").write_bytes((CASE / "det.onnx").read_bytes())
    with pytest.raises(UserError, match="recogniser"):
        InsightFace(tmp_path)


def test_the_evaluator_takes_a_model_pack_folder_for_ism(case):
    """--arcface FOLDER (an ONNX pack) gives ISM with the pack's own detector; a .pth keeps the dlib route."""
    from anti_i2v_jax.eval.insightface import InsightFace
    from anti_i2v_jax.eval.suite import EvalSettings, Evaluator

    _, images, _, _ = case
    model = Evaluator(EvalSettings(arcface=CASE)).arcface
    assert isinstance(model, InsightFace)
    assert model.ism([images["grace_hopper"]], [images["grace_hopper"]])["ism"] == pytest.approx(1.0, abs=1e-6)
