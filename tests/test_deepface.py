"""The paper's ISM pipeline in its Keras form (anti_i2v_jax/eval/deepface.py: DeepFace's ArcFace on RetinaFace
detections, from arcface_weights.h5 + retinaface.h5) against the reference code itself, on the golden case
tests/golden/deepface/tiny (Anti-DreamBooth's patched deepface 0.0.79 with retina-face 0.0.17, on tiny random Keras
models saved in the released files' layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("h5py", reason="DeepFace's .h5 weights need the eval extra (h5py)")
pytest.importorskip("cv2", reason="the DeepFace pipeline needs the eval extra (OpenCV)")

from anti_i2v_jax.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / "tests" / "golden" / "deepface" / "tiny"


def _images() -> dict[str, np.ndarray]:
    """The case's inputs, RGB (case.json ``inputs.images``)."""
    from PIL import Image

    out = {n: np.asarray(Image.open(REPO / "examples" / f"{n}.png").convert("RGB")) for n in ("astronaut", "grace_hopper")}
    out["crop"] = out["grace_hopper"][40:340, 60:280]
    out["strip"] = out["astronaut"][100:190, :]
    out["grey"] = np.full((200, 260, 3), 128, np.uint8)
    return out


@pytest.fixture(scope="module")
def case():
    import jax
    from safetensors.numpy import load_file

    from anti_i2v_jax.eval.deepface import DeepFace

    jax.config.update("jax_default_matmul_precision", "highest")
    return DeepFace(CASE), _images(), load_file(CASE / "outputs.safetensors"), json.loads((CASE / "case.json").read_text())


def test_detections_equal_retinaface(case):
    """Every face retina-face finds, in its order: score, integer box and five landmarks; on upscaled portraits,
    a small non-square crop, a strip whose long side hits the 1980-pixel cap, and none on a flat grey image."""
    model, images, expected, meta = case
    tol = meta["tolerance"]
    for name, count in meta["faces_found"].items():
        faces = model.detect(images[name])
        assert len(faces) == count, name
        if not count:
            continue
        np.testing.assert_allclose([f.score for f in faces], expected[f"{name}.score"], **tol, err_msg=name)
        np.testing.assert_array_equal([f.area for f in faces], expected[f"{name}.area"], err_msg=name)
        np.testing.assert_allclose(np.stack([f.landmarks for f in faces]), expected[f"{name}.landmarks"], **tol,
                                   err_msg=name)
    assert meta["faces_found"]["grey"] == 0 and min(meta["faces_found"][n] for n in ("astronaut", "strip")) > 0


def test_network_inputs_equal_extract_faces(case):
    """Crop, eye-levelling rotation, aspect-keeping resize and padding, BGR / 255: the first faces' inputs."""
    model, images, expected, _ = case
    for name in ("astronaut", "crop"):
        faces = model.detect(images[name])[: len(expected[f"{name}.crops"])]
        got = np.stack([model.face_input(images[name], f) for f in faces])
        np.testing.assert_allclose(got, expected[f"{name}.crops"], atol=1e-6, rtol=0, err_msg=name)


def test_embeddings_equal_deepface_represent(case):
    """Every face's ArcFace embedding and region as DeepFace.represent gives them, and the largest face's (the one
    Anti-DreamBooth keeps) through ``embed``."""
    model, images, expected, meta = case
    tol = meta["tolerance_embeddings"]
    for name, count in meta["faces_found"].items():
        if not count:
            assert model.embed([images[name]]) == [None]
            continue
        reps = model.represent(images[name])
        np.testing.assert_array_equal([r[1] for r in reps], expected[f"{name}.regions"], err_msg=name)
        np.testing.assert_allclose(np.stack([r[0] for r in reps]), expected[f"{name}.embeddings"], **tol, err_msg=name)
        np.testing.assert_allclose(model.embed([images[name]])[0], expected[f"{name}.embedding"], **tol, err_msg=name)


def test_ism_and_fdfr(case):
    """The photo against itself is 1; a frame without a face counts in FDFR and not in ISM."""
    model, images, _, _ = case
    photo = images["astronaut"]
    out = model.ism([photo], [photo, images["grey"]])
    assert out["ism"] == pytest.approx(1.0, abs=1e-6) and out["fdfr_arcface"] == 0.5
    assert model.ism([images["grey"]], [photo])["ism"] is None


def test_eye_levelling_follows_the_eyes():
    """A face whose eyes slope is rotated so that they are level: the rotation's sign follows the slope."""
    from anti_i2v_jax.eval.deepface import _level_eyes

    crop = np.zeros((41, 41, 3), np.uint8)
    crop[20, 5:36] = 255  # a horizontal bar through the centre
    right, left = np.array([10.0, 10.0]), np.array([30.0, 30.0])  # 45 degrees down to the image's right
    rotated = _level_eyes(crop, right, left)
    ys, xs = np.nonzero(rotated[..., 0])
    assert np.corrcoef(xs, ys)[0, 1] < -0.9  # PIL turns it counter-clockwise by 45 degrees
    ys, xs = np.nonzero(_level_eyes(crop, np.array([10.0, 30.0]), np.array([30.0, 10.0]))[..., 0])
    assert np.corrcoef(xs, ys)[0, 1] > 0.9  # eyes rising to the right: turned clockwise
    assert np.array_equal(_level_eyes(crop, right, right), crop)  # coincident eyes: unchanged


def test_missing_or_foreign_files_are_clear_errors(tmp_path):
    from anti_i2v_jax.eval.deepface import DeepFace

    with pytest.raises(UserError, match="arcface_weights.h5 or retinaface.h5"):
        DeepFace(tmp_path)
    shutil.copy(CASE / "retinaface.h5", tmp_path / "retinaface.h5")
    (tmp_path / "arcface_weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not an HDF5 file"):
        DeepFace(tmp_path)
    shutil.copy(CASE / "retinaface.h5", tmp_path / "arcface_weights.h5")  # the files swapped
    with pytest.raises(UserError, match="no weight conv2_block1_1_conv/kernel"):
        DeepFace(tmp_path)


def test_an_unused_weight_is_an_error(tmp_path):
    """The converter's contract: a weight the model does not use fails the load, naming it."""
    import h5py

    from anti_i2v_jax.eval.deepface import DeepFace

    shutil.copy(CASE / "arcface_weights.h5", tmp_path / "arcface_weights.h5")
    shutil.copy(CASE / "retinaface.h5", tmp_path / "retinaface.h5")
    with h5py.File(tmp_path / "retinaface.h5", "r+") as f:
        group = f.create_group("extra_conv")
        group.create_dataset("extra_conv/kernel:0", data=np.zeros((1, 1, 4, 4), np.float32))
        group.attrs["weight_names"] = [b"extra_conv/kernel:0"]
        names = [n if isinstance(n, bytes) else n.encode() for n in f.attrs["layer_names"]]
        f.attrs["layer_names"] = np.array([*names, b"extra_conv"], dtype="S")
    with pytest.raises(UserError, match="extra_conv/kernel"):
        DeepFace(tmp_path)


def test_the_evaluator_takes_a_deepface_folder_for_ism(case):
    """--arcface FOLDER holding DeepFace's two .h5 files runs the paper's pipeline."""
    from anti_i2v_jax.eval.deepface import DeepFace
    from anti_i2v_jax.eval.suite import EvalSettings, Evaluator

    _, images, _, _ = case
    model = Evaluator(EvalSettings(arcface=CASE)).arcface
    assert isinstance(model, DeepFace)
    assert model.ism([images["crop"]], [images["crop"]])["ism"] == pytest.approx(1.0, abs=1e-6)
