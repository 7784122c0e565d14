"""LPIPS-VGG (Zhang et al. 2018, ``lpips`` v0.1) in Flax: the perceptual distance of Anti-I2V's auxiliary
term and of VGMShield.

The network: the ``lpips`` input scaling (``(x - shift) / scale`` on [-1, 1] images), the 13 convolutions of
torchvision's VGG16 ``features`` (ReLU after each, 2x2 max-pooling between stages), the five stage outputs
(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), each unit-normalised over channels (``x / (|x| + 1e-10)``), their
squared difference weighted per channel by a learned 1x1 head (``lin0..lin4``), averaged over the image and
summed over the stages.

Weights come from files the user already has, never downloaded:

* the VGG16 trunk: torchvision's ImageNet state dict (``vgg16-397923af.pth``: ``features.N.weight/bias``; the
  ``classifier`` is not used), or a whole LPIPS state dict (``net.sliceK.N.*`` keys);
* the heads: the ``lpips`` package's ``weights/v0.1/vgg.pth`` (``lin0.model.1.weight`` ...), which the
  wheel ships, or the same whole LPIPS state dict.

Module names follow torchvision's indices (``features_0`` ... ``features_28``), so the rule table in
:mod:`weights_convert.lpips` is a rename.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.errors import UserError
from anti_i2v_jax.nn.conv import Conv

# torchvision VGG16 ("configuration D"): channels of each 3x3 convolution, "M" a 2x2 max-pool. The
# index of each layer in ``features`` (conv, ReLU and pool each take one) names its module.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The five stages LPIPS reads: the ReLU outputs just before each pool (and the last one).
STAGE_CHANNELS = (64, 128, 256, 512, 512)
# ``lpips.ScalingLayer``: ImageNet statistics moved to the [-1, 1] range.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor


def conv_indices() -> tuple[int, ...]:
    """The ``features`` indices of VGG16's convolutions (0, 2, 5, ..., 28)."""
    out, index = [], 0
    for item in VGG16:
        if item == "M":
            index += 1
        else:
            out.append(index)
            index += 2  # conv, ReLU
    return tuple(out)


class VGG16Features(nn.Module):
    """VGG16 ``features`` up to relu5_3; returns the five stage outputs, (N, H, W, 3) -> list of (N, h, w, C)."""

    @nn.compact
    def __call__(self, x):
        stages, index = [], 0
        for item in VGG16:
            if item == "M":
                stages.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
                index += 1
                continue
            x = nn.relu(Conv(item, (3, 3), padding=((1, 1), (1, 1)), name=f"features_{index}")(x))
            index += 2
        stages.append(x)
        return stages


class LPIPS(nn.Module):
    """``LPIPS(x, y)``: two batches (N, H, W, 3) in [0, 1] -> (N, 5), each stage's share of the distance (the
    distance is their sum). ``features`` and ``shares`` split it, so that a fixed reference image's features
    are computed once (the attack compares every step's image with the same clean photo)."""

    def setup(self):
        self.vgg = VGG16Features()
        self.heads = [self.param(f"lin{k}", nn.initializers.ones, (c,), jnp.float32)
                      for k, c in enumerate(STAGE_CHANNELS)]

    def features(self, x):
        """The five stages of ``x`` (N, H, W, 3) in [0, 1], unit-normalised over channels (float32)."""
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        out = []
        for f in self.vgg((((2.0 * x.astype(jnp.float32) - 1.0) - shift) / scale).astype(x.dtype)):
            f = f.astype(jnp.float32)
            sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
            # |f| with a finite gradient where a position's features are all zero (ReLU), same values
            norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
            out.append(f / (norm + NORM_EPS))
        return out

    def shares(self, fx, fy):
        """(N, 5): each stage's head-weighted mean squared difference of two ``features`` results."""
        return jnp.stack([jnp.mean(jnp.einsum("nhwc,c->nhw", jnp.square(a - b), w), axis=(1, 2))
                          for a, b, w in zip(fx, fy, self.heads)], axis=-1)

    def __call__(self, x, y):
        n = x.shape[0]
        feats = self.features(jnp.concatenate([x, y], axis=0))  # one pass over both
        return self.shares([f[:n] for f in feats], [f[n:] for f in feats])


@dataclasses.dataclass(frozen=True)
class LPIPSModel:
    """Loaded LPIPS-VGG parameters and where they came from (for reports)."""

    params: Any
    source: str

    def __call__(self, params, x, y):
        """Distance of single images (H, W, 3) in [0, 1] (or batches (N, H, W, 3) -> (N,))."""
        single = x.ndim == 3
        if single:
            x, y = x[None], y[None]
        d = jnp.sum(LPIPS().apply({"params": params}, x, y), axis=-1)
        return d[0] if single else d

    def features(self, params, y):
        """The features of one image (H, W, 3) in [0, 1], to compare many images with (:meth:`distance_to`)."""
        return LPIPS().apply({"params": params}, y[None], method=LPIPS.features)

    def distance_to(self, params, x, y_features):
        """LPIPS between one image (H, W, 3) and an image whose :meth:`features` are ``y_features``."""
        fx = LPIPS().apply({"params": params}, x[None], method=LPIPS.features)
        return jnp.sum(LPIPS().apply({"params": params}, fx, y_features, method=LPIPS.shares), axis=-1)[0]


def abstract_params() -> dict:
    """The parameter tree as ShapeDtypeStructs (any image size: convolutions and heads only)."""
    from weights_convert.core import abstract_params as abstract

    z = jnp.zeros((1, 32, 32, 3))
    return abstract(lambda: LPIPS().init(jax.random.key(0), z, z))


def init_params(seed: int = 0) -> dict:
    """Random parameters (tests): He-scaled convolutions, small biases, positive heads (as trained heads are)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params()):
        names = [p.key for p in path]
        shape = tuple(leaf.shape)
        if names[-1] == "kernel":
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif names[-1] == "bias":
            value = rng.standard_normal(shape) * 0.01
        else:  # a head
            value = rng.uniform(0.0, 1.0, shape)
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = np.asarray(value, np.float32)
    return out


def load(vgg: str | Path, lin: str | Path | None = None) -> LPIPSModel:
    """LPIPS-VGG from local files: ``vgg`` torchvision's VGG16 state dict (or a whole LPIPS state dict, which
    holds the heads too), ``lin`` the heads (the ``lpips`` package's ``weights/v0.1/vgg.pth``). Every tensor is
    mapped and shape-checked; unknown keys are errors."""
    from weights_convert.core import TorchCheckpointSource, convert
    from weights_convert.lpips import LPIPS_IGNORE, LPIPS_RULES, MergedSource

    files = [Path(vgg).expanduser()] + ([Path(lin).expanduser()] if lin is not None else [])
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: no such file (LPIPS-VGG needs torchvision's vgg16 .pth and the lpips "
                            f"package's weights/v0.1/vgg.pth, or one whole LPIPS state dict)")
    source = MergedSource([TorchCheckpointSource(f) for f in files])
    what = "LPIPS-VGG from " + " + ".join(str(f) for f in files)
    for key, want in (("scaling_layer.shift", SHIFT), ("scaling_layer.scale", SCALE)):
        if key in source.keys() and not np.allclose(np.ravel(source.load(key)), want, atol=1e-6):
            raise UserError(f"{what}: {key} is {np.ravel(source.load(key)).tolist()}, not lpips v0.1's {list(want)}")
    for k in range(len(STAGE_CHANNELS)):  # lpips saves each head twice (linK and the alias lins.K)
        alias, head = f"lins.{k}.model.1.weight", f"lin{k}.model.1.weight"
        if alias in source.keys() and head in source.keys() and not np.array_equal(source.load(alias), source.load(head)):
            raise UserError(f"{what}: {alias} and {head} differ; lpips saves one head under both names")
    params, _ = convert(source, LPIPS_RULES, abstract_params(), ignore=LPIPS_IGNORE, dtype=np.float32, what=what)
    return LPIPSModel(params=params, source=" + ".join(str(f) for f in files))
