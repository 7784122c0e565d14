"""The face iResNet of insightface's ``arcface_torch`` and of CR-FIQA (``fdbtrs/CR-FIQA``
``backbones/iresnet.py``), in Flax, for face-image quality (C-FIQA) from a local checkpoint.

Stem ``conv 3x3 -> BN -> PReLU``; four stages of ``IBasicBlock`` (``BN -> conv 3x3 -> BN -> PReLU -> conv 3x3
(stride 2 in a stage's first block) -> BN``, plus a ``conv 1x1 -> BN`` shortcut where the shape changes) at
widths 64/128/256/512; ``BN -> flatten (channel-major, as PyTorch's NCHW) -> Linear -> BatchNorm1d`` gives the
512-d embedding; CR-FIQA adds ``qs``, a Linear to one value, its quality score (higher: better). Input: a
112x112 face aligned to the ArcFace 5-point template, BGR as OpenCV reads it, ``(x / 255 - 0.5) / 0.5``.
BatchNorm runs on its stored statistics (eps 1e-5). Parameter names mirror PyTorch's, so conversion is a rename.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anti_i2v_jax.errors import UserError

WIDTHS = (64, 128, 256, 512)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IResNetConfig:
    """Blocks per stage; ``quality_head``: CR-FIQA's ``qs`` output. ``widths``, ``bn_eps`` and ``flatten`` are
    PyTorch's by default; DeepFace's Keras ArcFace (the same network) has eps 2e-5 and flattens channel-last."""

    layers: tuple[int, int, int, int]
    num_features: int = 512
    quality_head: bool = True
    input_size: int = 112
    widths: tuple[int, int, int, int] = WIDTHS
    bn_eps: float = 1e-5
    flatten: str = "chw"  # "chw": PyTorch's NCHW order before the Linear; "hwc": Keras' NHWC order


def iresnet18(**kw) -> IResNetConfig:
    """iResNet-18 (insightface's smallest ArcFace backbone)."""
    return IResNetConfig(layers=(2, 2, 2, 2), **kw)


def iresnet34(**kw) -> IResNetConfig:
    """iResNet-34."""
    return IResNetConfig(layers=(3, 4, 6, 3), **kw)


def iresnet50(**kw) -> IResNetConfig:
    """CR-FIQA (S): iResNet-50."""
    return IResNetConfig(layers=(3, 4, 14, 3), **kw)


def iresnet100(**kw) -> IResNetConfig:
    """CR-FIQA (L): iResNet-100."""
    return IResNetConfig(layers=(3, 13, 30, 3), **kw)


ARCHS = {"iresnet18": iresnet18, "iresnet34": iresnet34, "iresnet50": iresnet50, "iresnet100": iresnet100}


class BatchNorm(nn.Module):
    """Inference BatchNorm over the last axis with PyTorch's parameter names (weight -> scale)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (scale / jnp.sqrt(var + self.eps)) + bias


class PReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.constant(0.25), (x.shape[-1],))
        return jnp.where(x >= 0, x, w * x)


def _conv(features, kernel, stride, name):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                   name=name)


class IBasicBlock(nn.Module):
    planes: int
    stride: int
    shortcut: bool
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        bn = lambda name: BatchNorm(self.eps, name=name)  # noqa: E731
        out = bn("bn1")(x)
        out = _conv(self.planes, 3, 1, "conv1")(out)
        out = PReLU(name="prelu")(bn("bn2")(out))
        out = bn("bn3")(_conv(self.planes, 3, self.stride, "conv2")(out))
        if self.shortcut:
            x = bn("downsample_1")(_conv(self.planes, 1, self.stride, "downsample_0")(x))
        return out + x


class IResNet(nn.Module):
    config: IResNetConfig

    @nn.compact
    def __call__(self, x):  # (B, 112, 112, 3) normalised BGR -> (embedding (B, F), quality (B,) or None)
        cfg = self.config
        if cfg.flatten not in ("chw", "hwc"):
            raise ValueError(f"flatten must be 'chw' or 'hwc', got {cfg.flatten!r}")
        x = PReLU(name="prelu")(BatchNorm(cfg.bn_eps, name="bn1")(_conv(cfg.widths[0], 3, 1, "conv1")(x)))
        inplanes = cfg.widths[0]
        for stage, (planes, blocks) in enumerate(zip(cfg.widths, cfg.layers), start=1):
            for i in range(blocks):
                stride = 2 if i == 0 else 1
                shortcut = i == 0 and (stride != 1 or inplanes != planes)
                x = IBasicBlock(planes, stride, shortcut, cfg.bn_eps, name=f"layer{stage}_{i}")(x)
                inplanes = planes
        x = BatchNorm(cfg.bn_eps, name="bn2")(x)
        if cfg.flatten == "chw":  # (B, H, W, C) -> (B, C*H*W), PyTorch's order
            x = jnp.transpose(x, (0, 3, 1, 2))
        x = x.reshape(x.shape[0], -1)
        x = BatchNorm(cfg.bn_eps, name="features")(nn.Dense(cfg.num_features, name="fc")(x))
        quality = nn.Dense(1, name="qs")(x)[:, 0] if cfg.quality_head else None
        return x, quality


def load(path: str | Path, arch: str | IResNetConfig = "iresnet50") -> tuple[IResNetConfig, dict]:
    """An iResNet from a PyTorch ``backbone.pth`` state dict (read with ``weights_only=True``); every key checked.
    ``arch``: "iresnet50" (CR-FIQA S), "iresnet100" (CR-FIQA L), "iresnet18"/"iresnet34" (smaller ArcFace
    backbones) or a config; the quality head is used when the
    checkpoint has one."""
    from weights_convert.core import TorchCheckpointSource

    if isinstance(arch, str) and arch not in ARCHS:
        raise UserError(f"unknown iResNet {arch!r}; choose from {', '.join(ARCHS)}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file (a CR-FIQA backbone.pth)")
    source = TorchCheckpointSource(path)
    has_head = "qs.weight" in source.keys()
    config = ARCHS[arch](quality_head=has_head) if isinstance(arch, str) else dataclasses.replace(arch, quality_head=has_head)
    return config, from_source(source, config, str(path))


def from_source(source, config: IResNetConfig, what: str = "iresnet") -> dict:
    """Parameters for ``config`` from a key source (PyTorch names) through the rule table."""
    from weights_convert.core import abstract_params, convert
    from weights_convert.iresnet import IRESNET_IGNORE, IRESNET_RULES

    size = config.input_size
    abstract = abstract_params(lambda: IResNet(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    params, _ = convert(source, IRESNET_RULES, abstract, ignore=IRESNET_IGNORE, dtype=np.float32, what=what)
    return params


def preprocess(faces_rgb: np.ndarray, channels: str = "bgr") -> np.ndarray:
    """Aligned uint8 RGB faces (N, 112, 112, 3) -> the network input ``(x / 255 - 0.5) / 0.5`` in ``channels``
    order: "bgr" for CR-FIQA (OpenCV's order, as its evaluation reads images), "rgb" for insightface's
    arcface_torch (its inference converts to RGB)."""
    x = np.asarray(faces_rgb, np.float32)
    if channels == "bgr":
        x = x[..., ::-1]
    elif channels != "rgb":
        raise ValueError(f"channels must be 'bgr' or 'rgb', got {channels!r}")
    return ((x / 255.0 - 0.5) / 0.5).astype(np.float32)
