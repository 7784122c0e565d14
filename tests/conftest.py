"""Test set-up: two host devices for the data-parallel tests, exact float32 matmuls, the test double."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from double import TinyBackbone  # noqa: E402
from fixtures import ENV, env_roots  # noqa: E402


def pytest_configure(config):
    missing = [str(r) for r in env_roots() if not r.is_dir()]
    if missing:
        raise pytest.UsageError(f"{ENV} names folders that do not exist: {missing}; fix the path or unset {ENV}")


@pytest.fixture(scope="session")
def backbone():
    return TinyBackbone.create(seed=0)


@pytest.fixture(scope="session")
def image():
    rng = np.random.default_rng(1)
    # A smooth image with some texture, at a size that is not the model size (40x48 -> 32x32).
    yy, xx = np.mgrid[0:40, 0:48] / 48.0
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.4 * xx * yy], -1)
    noisy = base + 0.05 * rng.standard_normal(base.shape)
    return np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8)
