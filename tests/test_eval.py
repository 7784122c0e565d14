"""anti_i2v_jax.eval: each metric against its reference implementation, and the suite's missing-metric rule."""

import json

import numpy as np
import pytest
from skimage import color, data, metrics

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.eval import Missing, image, qalign
from anti_i2v_jax.eval.suite import (
    OFFLINE_METRICS,
    PAPER_METRICS,
    EvalSettings,
    Evaluator,
)


def _noisy(img, levels, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(int) + rng.integers(-levels, levels + 1, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


def _cat():
    """scikit-image's cat photo at the astronaut's size: a frame without a human face."""
    from PIL import Image

    return np.asarray(Image.fromarray(data.chelsea()).resize((512, 512)))


# ------------------------------------------------------------------------------------------ imperceptibility


def test_lab_and_ciede2000_match_scikit_image(astronaut):
    np.testing.assert_allclose(image.rgb_to_lab(astronaut), color.rgb2lab(astronaut), atol=1e-10)
    rng = np.random.default_rng(0)
    lab1 = rng.uniform([0, -128, -128], [100, 128, 128], (20000, 3))
    lab2 = rng.uniform([0, -128, -128], [100, 128, 128], (20000, 3))
    lab1[:300, 1:] = 0.0  # colourless on one side: the hue conventions' special cases
    lab2[200:400, 1:] = 0.0
    lab2[1000:2000] = lab1[1000:2000] + rng.normal(0, 1.0, (1000, 3))  # small differences, as a protection makes
    np.testing.assert_allclose(image.ciede2000(lab1, lab2), color.deltaE_ciede2000(lab1, lab2), atol=1e-9)


def test_imperceptibility_matches_scikit_image(astronaut):
    protected = _noisy(astronaut, 8)
    got = image.imperceptibility(astronaut, protected)
    assert got["linf"] == 8
    assert got["psnr_db"] == pytest.approx(metrics.peak_signal_noise_ratio(astronaut, protected), rel=1e-12)
    ssim = metrics.structural_similarity(astronaut, protected, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
    assert got["ssim"] == pytest.approx(ssim, rel=1e-9)
    de = color.deltaE_ciede2000(color.rgb2lab(astronaut), color.rgb2lab(protected))
    assert got["ciede2000_mean"] == pytest.approx(de.mean(), rel=1e-9)
    assert got["ciede2000_p95"] == pytest.approx(np.percentile(de, 95), rel=1e-9)
    same = image.imperceptibility(astronaut, astronaut)
    assert same["psnr_db"] is None and same["ciede2000_mean"] == 0.0 and same["linf"] == 0


# ------------------------------------------------------------------------------------------ BRISQUE


def test_brisque_is_the_packages_score(astronaut):
    pytest.importorskip("cv2")
    brisque_pkg = pytest.importorskip("brisque")
    from anti_i2v_jax.eval.quality import brisque

    reference = brisque_pkg.BRISQUE(url=False)
    # The package's own score(), with only its numpy-2 failure shimmed (1-element arrays to floats).
    unshimmed = reference.scale_features
    reference.scale_features = lambda f: unshimmed(np.array([np.ravel(np.asarray(x, float))[0] for x in f], dtype=object))
    noisy = _noisy(astronaut, 16)
    for img in (astronaut, noisy):
        assert brisque(img) == pytest.approx(reference.score(img), rel=1e-9)
    assert brisque(astronaut) == pytest.approx(10.79, abs=0.01)  # the package's published scale: clean is low,
    assert brisque(noisy) > 30  # noise is high


# ------------------------------------------------------------------------------------------ dlib identity


@pytest.fixture(scope="module")
def faces():
    pytest.importorskip("dlib")
    from anti_i2v_jax.eval.identity import DlibFaces

    return DlibFaces()


def test_dlib_embedding_is_the_dlib_api(faces, astronaut):
    import dlib

    from anti_i2v_jax.eval.identity import _models_dir

    detector = dlib.get_frontal_face_detector()
    box = detector(astronaut, 1)[0]
    shape = dlib.shape_predictor(str(_models_dir() / "shape_predictor_5_face_landmarks.dat"))(astronaut, box)
    net = dlib.face_recognition_model_v1(str(_models_dir() / "dlib_face_recognition_resnet_model_v1.dat"))
    np.testing.assert_allclose(faces.embed(astronaut), np.asarray(net.compute_face_descriptor(astronaut, shape)),
                               atol=1e-6)


def test_identity_scores_count_faces_and_similarity(faces, astronaut):
    from anti_i2v_jax.eval.identity import identity_scores, reference_embedding

    ref = reference_embedding(faces, [astronaut])
    no_face = [data.chelsea(), np.repeat(data.camera()[..., None], 3, -1)]
    got = identity_scores(faces, ref, [astronaut, _noisy(astronaut, 16), *no_face])
    assert got["fdfr_dlib"] == pytest.approx(0.5)
    assert got["ism_dlib"] > 0.99 and got["match_dlib"] == 1.0 and got["l2_dlib"] < 0.2
    flipped = identity_scores(faces, ref, [astronaut[:, ::-1].copy()])  # the same face, mirrored: still a match
    assert flipped["match_dlib"] == 1.0
    assert identity_scores(faces, ref, no_face) == {"ism_dlib": None, "l2_dlib": None, "match_dlib": None,
                                                     "fdfr_dlib": 1.0}
    assert reference_embedding(faces, no_face) is None


# ------------------------------------------------------------------------------------------ DINO ViT


def _write_vit(folder, seed=0, **overrides):
    """A small random Hugging Face ViTModel folder, every tensor randomised (LayerNorms too)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=32,
                  patch_size=8, layer_norm_eps=1e-6, qkv_bias=True)
    config.update(overrides)
    torch.manual_seed(seed)
    model = transformers.ViTModel(transformers.ViTConfig(**config), add_pooling_layer=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == config["hidden_size"] else 0.0))
    model.save_pretrained(folder)
    return model


def test_dino_vit_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")  # the torch extra; the README's test install has only test and eval

    from anti_i2v_jax.eval import dino

    model = _write_vit(tmp_path / "vit")
    cfg, params = dino.load(tmp_path / "vit")
    assert (cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.patch, cfg.eps) == (48, 3, 4, 96, 8, 1e-6)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    got = np.asarray(dino.ViT(cfg).apply({"params": params}, x))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    scorer = dino.Dino(tmp_path / "vit")
    frames = np.stack([data.astronaut(), _cat()])
    pre = torch.from_numpy(dino.preprocess(frames, 32).transpose(0, 3, 1, 2))
    with torch.no_grad():
        cls = model(pixel_values=pre).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(scorer.features(frames), cls, atol=1e-4, rtol=1e-4)
    assert scorer.similarity(frames, frames) == pytest.approx(1.0, abs=1e-6)
    cos = cls[0] @ cls[1] / np.linalg.norm(cls[0]) / np.linalg.norm(cls[1])
    assert scorer.similarity(frames[:1], frames[1]) == pytest.approx(cos, abs=1e-5)  # one photo as the reference


def test_dino_checkpoint_problems_are_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    from anti_i2v_jax.eval import dino

    _write_vit(tmp_path / "vit")
    tensors = load_file(tmp_path / "vit" / "model.safetensors")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "config.json").write_bytes((tmp_path / "vit" / "config.json").read_bytes())
    save_file({**tensors, "encoder.layer.0.extra.weight": np.zeros(3, np.float32)},
              tmp_path / "extra" / "model.safetensors")
    with pytest.raises(UserError, match="extra.weight"):
        dino.load(tmp_path / "extra")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_bytes((tmp_path / "vit" / "config.json").read_bytes())
    save_file({k: v for k, v in tensors.items() if not k.startswith("layernorm.")}, tmp_path / "short" / "model.safetensors")
    with pytest.raises(UserError, match="norm/scale"):
        dino.load(tmp_path / "short")
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**config, "use_swiglu": True}))
    with pytest.raises(UserError, match="use_swiglu"):
        dino.load(tmp_path / "vit")
    with pytest.raises(UserError, match="no config.json"):
        dino.load(tmp_path)


# ------------------------------------------------------------------------------------------ Q-Align rules


def test_qalign_scoring_rules():
    assert qalign.score_from_logits(np.zeros(5)) == pytest.approx(0.5)
    logits = np.full((5, 5), -1e4) + np.eye(5) * 2e4  # each row certain of one level
    np.testing.assert_allclose(qalign.score_from_logits(logits), [1.0, 0.75, 0.5, 0.25, 0.0])
    z = np.array([2.0, 1.0, 0.5, -1.0, -3.0])
    p = np.exp(z) / np.exp(z).sum()
    assert qalign.score_from_logits(z + 100.0) == pytest.approx(p @ [1, 0.75, 0.5, 0.25, 0])  # stable, shift-free
    assert qalign.sample_1fps(49, 8) == [0, 8, 16, 24, 32, 40]  # CogVideoX: 49 frames at 8 fps -> 6 s
    assert qalign.sample_1fps(51, 24) == [0, 24]
    assert qalign.sample_1fps(16, 24) == [0]  # under a second: the first frame, not nothing
    # The model's own 1-5 score (softmax weighted 5..1) maps onto the same [0, 1] value.
    five = p @ [5, 4, 3, 2, 1]
    assert qalign.from_five_point(five) == pytest.approx(qalign.score_from_logits(z))
    assert [qalign.playback_fps(b) for b in ("cogvideox-5b-i2v", "opensora-1.2", "dynamicrafter-512")] == [8, 24, 8]
    img = np.full((2, 4, 3), 200, np.uint8)
    sq = qalign.pad_to_square(img)
    assert sq.shape == (4, 4, 3) and (sq[1:3] == 200).all()
    assert (sq[0] == qalign.PAD_COLOUR).all() and (sq[3] == qalign.PAD_COLOUR).all()


# ------------------------------------------------------------------------------------------ the suite


def test_missing_metrics_say_why_and_nothing_stands_in(astronaut):
    ev = Evaluator(EvalSettings())
    video = np.stack([astronaut, _noisy(astronaut, 4), _cat()])
    scores = ev.video(astronaut, video, video)
    assert set(scores) == set(PAPER_METRICS) | {k for k in OFFLINE_METRICS if k in scores}
    for key in PAPER_METRICS:  # no weights given: every paper metric is missing, with its reason
        assert isinstance(scores[key], Missing) and scores[key].reason
    assert "--dino" in scores["dino"].reason and "--qalign-csv" in scores["qalign_video"].reason
    assert scores["fdfr_dlib"] == pytest.approx(1 / 3) and scores["ism_dlib"] > 0.99
    photo = ev.photo(astronaut, astronaut)
    assert isinstance(photo["psnr_db"], Missing) and photo["id_photo_dlib"] == pytest.approx(1.0)


def test_suite_uses_the_given_models(tmp_path, astronaut):
    _write_vit(tmp_path / "vit")
    qa = {"m/a/x_video.npz": {"qalign_frame": 0.25, "qalign_video": 0.5}}
    ev = Evaluator(EvalSettings(dino=tmp_path / "vit", qalign=qa))
    video = np.stack([astronaut, astronaut[::-1].copy()])
    scores = ev.video(astronaut, video, video, video_name="m/a/x_video.npz")
    assert scores["dino"] == pytest.approx(1.0, abs=1e-6)  # against the clean video, frame by frame
    assert (scores["qalign_frame"], scores["qalign_video"]) == (0.25, 0.5)
    by_photo = Evaluator(EvalSettings(dino=tmp_path / "vit", dino_reference="clean-photo"))
    assert by_photo.video(astronaut, video, video)["dino"] < 1.0 - 1e-4  # the flipped frame differs from the photo


# ------------------------------------------------------------------------------------------ purification


def test_purifications_and_survival(astronaut):
    from scipy import ndimage

    from anti_i2v_jax.eval.purify import PURIFICATIONS, gaussian_blur, survival

    want = np.rint(ndimage.gaussian_filter(astronaut.astype(np.float64), sigma=(1, 1, 0), truncate=2.0, mode="mirror"))
    np.testing.assert_array_equal(gaussian_blur(astronaut), want.astype(np.uint8))
    for name, fn in PURIFICATIONS.items():
        out = fn(astronaut)
        assert out.shape == astronaut.shape and out.dtype == np.uint8, name
    noisy = _noisy(astronaut, 8)
    assert survival(astronaut, noisy, PURIFICATIONS["none"]) == {"kept": 1.0, "energy": 1.0}
    assert survival(astronaut, noisy, lambda x: astronaut) == {"kept": 0.0, "energy": 0.0}
    assert 0.0 < survival(astronaut, noisy, PURIFICATIONS["jpeg50"])["kept"] < 0.5  # white noise mostly goes
    with pytest.raises(ValueError, match="no perturbation"):
        survival(astronaut, astronaut, PURIFICATIONS["blur"])


def test_directional_perturbations_live_in_their_space(astronaut):
    from anti_i2v_jax.eval.purify import (
        PURIFICATIONS,
        directional_perturbation,
        survival,
    )

    photo = astronaut[128:384, 128:384]
    made = {s: directional_perturbation(photo, s, steps=24, eps=8 / 255) for s in ("rgb", "lab", "dct")}
    for space, p in made.items():
        assert np.abs(p.astype(int) - photo.astype(int)).max() == 8, space  # the budget, exactly
    dlab = image.rgb_to_lab(made["lab"]) - image.rgb_to_lab(photo)
    assert np.abs(dlab[..., 0]).mean() < 0.2 * np.abs(dlab[..., 1:]).mean()  # a*/b* moved, L* barely
    spectrum = lambda d: np.abs(np.fft.fft2(d.astype(float) - 0, axes=(0, 1)))  # noqa: E731
    high = lambda p: spectrum(p.astype(int) - photo.astype(int))[64:192, 64:192].sum() / spectrum(  # noqa: E731
        p.astype(int) - photo.astype(int)).sum()
    assert high(made["dct"]) < 0.5 * high(made["rgb"])  # the DCT band is low frequency
    blur = PURIFICATIONS["blur"]
    assert survival(photo, made["dct"], blur)["kept"] > 2 * survival(photo, made["rgb"], blur)["kept"]
