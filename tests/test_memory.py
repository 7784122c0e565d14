"""Full-size execution: every real backbone has an abstract (weight-free) form with the real-size switches,
and the memory report compiles a real step from it and prints every field it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from anti_i2v_jax.backbones import registry

pytestmark = pytest.mark.slow  # not in the quick tier; the full suite (CI) runs it

ROOT = Path(__file__).resolve().parents[1]
REAL = [s.name for s in registry.specs() if s.needs_weights]


@pytest.mark.parametrize("name", REAL)
def test_every_real_backbone_has_an_abstract_real_size_form(name):
    bb = registry.get(name).abstract()
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(bb.params))
    stack = getattr(bb.config, "transformer", None) or getattr(bb.config, "stdit", None) or bb.config.unet
    assert stack.remat
    if hasattr(stack, "scan_layers"):
        assert stack.scan_layers
    assert bb.configured(remat=False, precision="bf16").config != bb.config


def test_released_dynamicrafter_presets_equal_the_yaml_files():
    import yaml
    from headers import KEYS

    from anti_i2v_jax.backbones.dynamicrafter import from_yaml, released

    if not KEYS.is_dir():
        pytest.skip(f"no reference key folder at {KEYS}")
    for r in (256, 512, 1024):
        raw = yaml.safe_load((KEYS / f"dynamicrafter_inference_{r}_v1.0.yaml").read_text())
        assert released(r) == from_yaml(raw)


@pytest.mark.heavy
def test_memory_report_prints_every_field():
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "memory_report.py"), "--backbones", "opensora-1.2", "--json"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    for key in ("name", "geometry", "params", "argument_bytes", "temp_bytes", "total_bytes", "flops_per_step",
                "compile_seconds"):
        assert key in row, key
    assert row["name"] == "opensora-1.2" and row["geometry"] == "51x480x848"
    assert 1e9 < row["params"] < 2e9  # STDiT3-XL (1.1B) + the VAE encoders
    assert row["total_bytes"] == row["argument_bytes"] + row["temp_bytes"] > 0
    assert row["flops_per_step"] > row["flops_per_step_no_remat"]  # remat recomputes...
    assert row["flops_per_step"] < 1.4 * row["flops_per_step_no_remat"]  # ...at most one forward per block
    assert "| opensora-1.2 | 51x480x848 |" in out.stdout
