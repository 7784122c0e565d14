"""Image loading from every common mode, clear errors, atomic and input-safe writes, report metrics."""

import io as pyio

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from anti_i2v_jax import ImageError, UserError, metrics
from anti_i2v_jax.io import atomic_write, load_image, save_image


def _rgb(h=12, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trip(tmp_path):
    a = _rgb()
    save_image(tmp_path / "a.png", a)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), a)


def test_exif_orientation_is_applied(tmp_path):
    a = _rgb(10, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (30, 10, 3)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red, bottom fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])


def test_palette_greyscale_cmyk_and_16_bit(tmp_path):
    a = _rgb()
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (12, 20, 3)
    grey = a[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert load_image(tmp_path / "c.jpg").dtype == np.uint8
    g16 = (grey.astype(np.uint16) * 257)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out16 = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out16[..., 1], grey)


def test_max_side_downscales(tmp_path):
    save_image(tmp_path / "big.png", _rgb(100, 300))
    assert load_image(tmp_path / "big.png", max_side=150).shape == (50, 150, 3)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.png", b"this is text, not a picture", "not an image"),
        ("missing.png", None, "no such file"),
    ],
)
def test_unreadable_files_give_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as e:
        load_image(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_truncated_file_is_an_error(tmp_path):
    buf = pyio.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "cut.png")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"], "no temporary file left behind"


def test_never_writes_over_an_input(tmp_path):
    src = tmp_path / "in.png"
    save_image(src, _rgb())
    before = src.read_bytes()
    with pytest.raises(UserError, match="input file"):
        save_image(src, _rgb(seed=1), protect=[src])
    link = tmp_path / "alias.png"
    link.hardlink_to(src)
    with pytest.raises(UserError, match="input file"):
        save_image(link, _rgb(seed=1), protect=[src])
    assert src.read_bytes() == before


def test_metrics_match_scikit_image():
    a = _rgb(40, 50, seed=2)
    b = np.clip(a.astype(int) + np.random.default_rng(3).integers(-16, 17, a.shape), 0, 255).astype(np.uint8)
    assert metrics.linf(a, b) == 16
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-10)
    ref = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=255
    )
    assert metrics.ssim(a, b) == pytest.approx(ref, rel=1e-10)
    assert metrics.psnr(a, a) == float("inf") and metrics.ssim(a, a) == pytest.approx(1.0)


def test_alpha_is_read_and_resized(tmp_path):
    from anti_i2v_jax.io import load_alpha

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:2, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    alpha = load_alpha(tmp_path / "t.png")
    assert alpha.shape == (4, 6) and alpha[0, 0] == 255 and alpha[3, 0] == 0
    assert load_alpha(tmp_path / "t.png", (8, 12)).shape == (8, 12)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "o.png")
    assert load_alpha(tmp_path / "o.png") is None
