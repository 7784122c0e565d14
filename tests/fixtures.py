"""Discovery of the golden upstream cases under the roots in ANTI_I2V_FIXTURES (see shared/fixtures/README.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ENV = "ANTI_I2V_FIXTURES"


def roots() -> list[Path]:
    return [Path(p) for p in os.environ.get(ENV, "").split(":") if p]


def case_dirs(backbone: str) -> list[Path]:
    """Every ``<root>/<backbone>/<case>/case.json`` folder, sorted."""
    return sorted(p.parent for r in roots() for p in (r / backbone).glob("*/case.json"))


def output_params(backbone: str) -> list:
    """pytest params (case dir, output name), one per listed output, ids ``<case>:<output>``.

    With no root (or no case) a single param that skips and names the variable: never a silent pass.
    """
    params = []
    for case in case_dirs(backbone):
        outputs = json.loads((case / "case.json").read_text())["outputs"]
        params += [pytest.param(case, name, id=f"{case.name}:{name}") for name in outputs]
    if not params:
        why = f"no {backbone} cases: set {ENV} to the fixtures root(s), e.g. {ENV}=../shared/fixtures"
        params = [pytest.param(None, None, id="no-fixtures", marks=pytest.mark.skip(reason=why))]
    return params


def load_case(case: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    meta = json.loads((case / "case.json").read_text())
    return meta, load_file(case / "inputs.safetensors"), load_file(case / "outputs.safetensors")


def assert_close(actual, expected, tolerance: dict, what: str) -> None:
    actual = np.asarray(actual, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, atol=tolerance["atol"], rtol=tolerance["rtol"], err_msg=what)
