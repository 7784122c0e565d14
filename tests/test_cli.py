"""The anti-i2v command end to end on the test double (registered only for these tests)."""

import json

import numpy as np
import pytest

from anti_i2v_jax import cli
from anti_i2v_jax.backbones import registry
from anti_i2v_jax.io import load_image, save_image


@pytest.fixture
def double_registered(backbone):
    spec = registry.BackboneSpec(
        name="test-double", summary="tests only", needs_weights=False, load=lambda weights: backbone
    )
    registry.register(spec)
    yield "test-double"
    registry.unregister("test-double")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--steps", "4", "--chunk-size", "2", "--checkpoint-every", "2", "--quiet"]


def test_protect_writes_image_report_and_plot(tmp_path, image, capsys, double_registered):
    src = tmp_path / "face.png"
    save_image(src, image)
    before = src.read_bytes()
    code, out, err = _run(capsys, "protect", str(src), "--backbone", double_registered, "--out", str(tmp_path / "o"),
                          "--prompt", "a person smiling", "--eps", "8", *FAST)
    assert code == 0, err
    protected = load_image(tmp_path / "o" / "face_protected.png")
    assert protected.shape == image.shape
    report = json.loads((tmp_path / "o" / "face_report.json").read_text())
    assert report["linf_levels"] == np.abs(protected.astype(int) - image.astype(int)).max() <= 8
    assert report["backbone"] == "test-double" and report["prompt"] == "a person smiling"
    assert report["settings"]["steps"] == 4 and report["settings"]["eps"] == pytest.approx(8 / 255)
    assert set(report["history"]) == {"irc", "ira", "ira_vae", "dm", "total"}
    assert all(len(v) == 4 for v in report["history"].values())
    assert 20 < report["psnr_db"] < 100 and 0 < report["ssim"] <= 1
    assert (tmp_path / "o" / "face_loss.png").stat().st_size > 1000
    assert src.read_bytes() == before
    assert not list((tmp_path / "o").glob("*.state")), "no checkpoint left after success"
    assert "face_protected.png" in out


@pytest.mark.slow
def test_two_images_on_two_devices(tmp_path, image, capsys, double_registered):
    for name, im in [("a", image), ("b", image[::-1].copy())]:
        save_image(tmp_path / f"{name}.png", im)
    code, _, err = _run(capsys, "protect", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--backbone",
                        double_registered, "--out", str(tmp_path / "o"), "--devices", "2", *FAST)
    assert code == 0, err
    assert (tmp_path / "o" / "a_protected.png").exists() and (tmp_path / "o" / "b_protected.png").exists()


@pytest.mark.parametrize("content, message", [(b"not an image", "not an image"), (None, "no such file")])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, message, double_registered):
    src = tmp_path / "x.png"
    if content is not None:
        src.write_bytes(content)
    code, _, err = _run(capsys, "protect", str(src), "--backbone", double_registered, "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_too_small_image_is_refused_before_any_work(tmp_path, image, capsys, double_registered):
    save_image(tmp_path / "tiny.png", image[:8, :8])
    code, _, err = _run(capsys, "protect", str(tmp_path / "tiny.png"), "--backbone", double_registered,
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "too small" in err and "tiny.png" in err


def test_refuses_to_write_over_an_input(tmp_path, image, capsys, double_registered):
    save_image(tmp_path / "a.png", image)
    save_image(tmp_path / "a_protected.png", image)
    before = (tmp_path / "a_protected.png").read_bytes()
    code, _, err = _run(capsys, "protect", str(tmp_path / "a.png"), str(tmp_path / "a_protected.png"),
                        "--backbone", double_registered, "--out", str(tmp_path), *FAST)
    assert code == 2 and "overwrite an input" in err
    assert (tmp_path / "a_protected.png").read_bytes() == before


def test_unknown_backbone_and_missing_weights(tmp_path, image, capsys, double_registered):
    save_image(tmp_path / "a.png", image)
    code, _, err = _run(capsys, "protect", str(tmp_path / "a.png"), "--backbone", "nope")
    assert code == 2 and "unknown backbone 'nope'" in err and "test-double" in err
    registry.register(registry.BackboneSpec(name="needs-w", summary="", needs_weights=True, load=lambda w: None))
    try:
        code, _, err = _run(capsys, "protect", str(tmp_path / "a.png"), "--backbone", "needs-w")
        assert code == 2 and "--weights" in err
    finally:
        registry.unregister("needs-w")


def test_backbones_lists_the_registry(capsys, double_registered):
    code, out, _ = _run(capsys, "backbones")
    assert code == 0 and "test-double" in out and "built in" in out


@pytest.mark.heavy  # CI time: precision and remat are tested on each backbone's own step
def test_precision_and_remat_reach_a_real_backbone_and_the_report(tmp_path, image, capsys):
    src = tmp_path / "face.png"
    save_image(src, image)
    code, _, err = _run(capsys, "protect", str(src), "--backbone", "cogvideox-tiny", "--out", str(tmp_path / "o"),
                        "--precision", "bf16", "--remat", "--steps", "2", "--chunk-size", "1",
                        "--checkpoint-every", "1", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "face_report.json").read_text())
    assert report["precision"] == "bf16" and report["remat"] is True
    assert report["linf_levels"] > 0


def test_precision_on_a_backbone_without_settings_is_one_clear_line(tmp_path, image, capsys, double_registered):
    src = tmp_path / "face.png"
    save_image(src, image)
    code, _, err = _run(capsys, "protect", str(src), "--backbone", double_registered, "--out", str(tmp_path / "o"),
                        "--precision", "bf16", *FAST)
    assert code == 2 and err.count("\n") == 1 and "--precision" in err
    assert not (tmp_path / "o" / "face_protected.png").exists()


@pytest.mark.slow
def test_sds_with_a_reference_video_still_moves_the_image(tmp_path, image, capsys):
    """With a reference video the video latents come from the clip, and frame 0 from the image: SDS, whose
    gradient reaches the image only through the video latents, still changes it."""
    from PIL import Image

    src = tmp_path / "face.png"
    save_image(src, image)
    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.uniform(size=(48, 64, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    clip = tmp_path / "clip.gif"
    frames[0].save(clip, save_all=True, append_images=frames[1:])
    code, _, err = _run(capsys, "protect", str(src), "--backbone", "cogvideox-tiny", "--method", "sds",
                        "--reference-video", str(clip), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "face_report.json").read_text())
    assert report["reference_video"] == str(clip) and report["linf_levels"] > 0
    assert report["terms_off"] == {}


def test_reference_video_errors_are_one_line(tmp_path, image, capsys, double_registered):
    src = tmp_path / "face.png"
    save_image(src, image)
    code, _, err = _run(capsys, "protect", str(src), "--backbone", double_registered, "--reference-video",
                        str(tmp_path / "missing.gif"), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "cannot take a reference video" in err and "Traceback" not in err
    code, _, err = _run(capsys, "protect", str(src), "--backbone", "cogvideox-tiny", "--reference-video",
                        str(tmp_path / "missing.gif"), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "missing.gif" in err and "no such file" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--out", str(d / "afile")], "is a file"),
    (lambda d: ["--out", str(d / "afile" / "sub")], "is under the file"),
    (lambda d: ["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (lambda d: ["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    (lambda d: ["--eps", "300"], "--eps is in 8-bit levels and must be in [1, 255], got 300"),
    (lambda d: ["--eps", "0.5"], "below one level"),
    (lambda d: ["--steps", "0"], "--steps must be at least 1"),
    (lambda d: ["--schedule", "foo"], "invalid settings"),
])
def test_bad_settings_are_one_line_in_cli_words(tmp_path, image, capsys, make_args, message):
    src = tmp_path / "face.png"
    save_image(src, image)
    (tmp_path / "afile").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, "protect", str(src), "--quiet", *(["--out", str(tmp_path / "o")]), *make_args(tmp_path))
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "AttackConfig" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing is written"


def test_generate_steps_zero_is_one_line(tmp_path, capsys):
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"
    code, _, err = _run(capsys, "generate", str(src), "--prompt", "x", "--steps", "0",
                        "--out", str(tmp_path / "g"))
    assert code == 2 and "--steps must be at least 1" in err and not (tmp_path / "g").exists()


def test_rgba_input_keeps_its_transparency(tmp_path, image, capsys, double_registered):
    from PIL import Image

    alpha = np.full(image.shape[:2], 255, np.uint8)
    alpha[:, : image.shape[1] // 3] = 0  # a transparent left third
    Image.fromarray(np.concatenate([image, alpha[..., None]], -1), "RGBA").save(tmp_path / "cut.png")
    code, _, err = _run(capsys, "protect", str(tmp_path / "cut.png"), "--backbone", double_registered,
                        "--out", str(tmp_path / "o"), *FAST)
    assert code == 0 and "transparency is put back" in err
    with Image.open(tmp_path / "o" / "cut_protected.png") as out:
        assert out.mode == "RGBA"
        saved = np.asarray(out)
    np.testing.assert_array_equal(saved[..., 3], alpha)
    flat = load_image(tmp_path / "cut.png")  # the RGB the run protected (composited on white)
    assert 0 < np.abs(saved[..., :3].astype(int) - flat).max() <= 16
    report = json.loads((tmp_path / "o" / "cut_report.json").read_text())
    assert report["alpha"] is not None


def test_lpips_files_reach_the_objective_and_the_report(tmp_path, image, capsys, double_registered):
    """--lpips (one whole LPIPS state dict here) turns on anti-i2v's LPIPS half of aux on the double (which has no
    CLIP): the history has aux and the report names the file; --lpips-heads alone is one line."""
    torch = pytest.importorskip("torch")
    from anti_i2v_jax.nn import lpips

    flat = {}
    for path, leaf in __import__("jax").tree_util.tree_leaves_with_path(lpips.init_params(0)):
        names = [p.key for p in path]
        if names[0] == "vgg":  # torchvision layout: (out, in, kh, kw) kernels
            layer, kind = names[1].split("_")[1], names[2]
            flat[f"net.slice1.{layer}.{'weight' if kind == 'kernel' else 'bias'}"] = (
                torch.from_numpy(np.ascontiguousarray(leaf.transpose(3, 2, 0, 1) if kind == "kernel" else leaf)))
        else:
            flat[f"{names[0]}.model.1.weight"] = torch.from_numpy(leaf.reshape(1, -1, 1, 1).copy())
    torch.save(flat, tmp_path / "lpips.pth")
    src = tmp_path / "face.png"
    save_image(src, image)
    code, _, err = _run(capsys, "protect", str(src), "--backbone", double_registered, "--out", str(tmp_path / "o"),
                        "--lpips", str(tmp_path / "lpips.pth"), *FAST)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "face_report.json").read_text())
    assert "aux" in report["history"] and report["lpips"] == str(tmp_path / "lpips.pth")
    assert "LPIPS only" in report["terms_off"]["aux"]
    code, _, err = _run(capsys, "protect", str(src), "--backbone", double_registered, "--out", str(tmp_path / "p"),
                        "--lpips-heads", str(tmp_path / "lpips.pth"), *FAST)
    assert code == 2 and "--lpips-heads goes with --lpips" in err and "Traceback" not in err
