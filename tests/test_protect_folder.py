"""experiments/protect_folder.py: a folder tree in, the mirrored tree of protected images and a CSV out; restartable."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import anti_i2v_jax as ai
from anti_i2v_jax.backbones import registry
from anti_i2v_jax.io import load_image, save_image

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "protect_folder.py"


@pytest.fixture
def protect_folder():
    spec = importlib.util.spec_from_file_location("protect_folder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def double_registered(backbone):
    registry.register(registry.BackboneSpec(name="test-double", summary="tests only", needs_weights=False,
                                            load=lambda weights: backbone))
    yield "test-double"
    registry.unregister("test-double")


def test_a_folder_tree_is_protected_once_and_reported(tmp_path, image, backbone, protect_folder, double_registered):
    src = tmp_path / "in"
    save_image(src / "a.png", image)
    save_image(src / "sub" / "b.png", image[::-1].copy())
    save_image(src / "sub" / "small.png", image[:32, :40].copy())  # another size: its own group
    (src / "sub" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = [str(src), "--out", str(out), "--backbone", double_registered, "--steps", "4", "--chunk-size", "2",
            "--devices", "2"]
    assert protect_folder(args) == 0
    for rel in ("a_protected.png", "sub/b_protected.png", "sub/small_protected.png"):
        assert (out / rel).is_file(), rel
    with (out / "results.csv").open() as f:
        rows = {r["input"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"a.png", "sub/b.png", "sub/small.png", "sub/broken.jpg"}
    assert rows["sub/broken.jpg"]["error"] and not rows["a.png"]["error"]
    assert 0 < int(rows["a.png"]["linf_levels"]) <= 16 and float(rows["a.png"]["psnr_db"]) > 20
    # Two images per round, one per device: each image's bytes are its run alone.
    alone = ai.protect(backbone, image, ai.AttackConfig.for_method("anti-i2v", steps=4, chunk_size=2))
    np.testing.assert_array_equal(load_image(out / "a_protected.png"), alone.image)
    # A second run finds everything done and rewrites no image.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert protect_folder(args) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}


def test_output_inside_the_input_is_refused(tmp_path, image, protect_folder, double_registered, capsys):
    save_image(tmp_path / "a.png", image)
    assert protect_folder([str(tmp_path), "--out", str(tmp_path / "out"), "--backbone", double_registered]) == 2
    assert "inside the input folder" in capsys.readouterr().err


@pytest.mark.heavy  # CI time: tests/test_attack.py checks several images per device on the same executor
def test_several_images_per_device(tmp_path, image, backbone, protect_folder, double_registered):
    src = tmp_path / "in"
    flips = [image, image[::-1].copy(), image[:, ::-1].copy()]
    for i, im in enumerate(flips):
        save_image(src / f"{i}.png", im)
    out = tmp_path / "out"
    assert protect_folder([str(src), "--out", str(out), "--backbone", double_registered, "--steps", "2",
                           "--chunk-size", "2", "--devices", "2", "--per-device", "2"]) == 0
    protector = ai.Protector(backbone, ai.AttackConfig.for_method("anti-i2v", steps=2, chunk_size=2))
    for i, im in enumerate(flips):  # 2 + 1 on two devices; each image's bytes are its run alone
        np.testing.assert_array_equal(load_image(out / f"{i}_protected.png"), protector.protect([im])[0].image)
    assert protect_folder([str(src), "--out", str(tmp_path / "o2"), "--per-device", "0"]) == 2
