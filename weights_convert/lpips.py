"""LPIPS-VGG weights (torchvision's VGG16 + the ``lpips`` heads) -> :mod:`anti_i2v_jax.nn.lpips`.

Sources: torchvision's ``vgg16-397923af.pth`` (``features.N.weight/bias``; its ``classifier`` is set aside, LPIPS
stops at relu5_3), the ``lpips`` package's ``weights/v0.1/vgg.pth`` (``linK.model.1.weight``, (1, C, 1, 1)), or a
whole LPIPS state dict (``net.sliceK.N.*``: the same torchvision indices; ``scaling_layer`` buffers are the fixed
constants of :data:`anti_i2v_jax.nn.lpips.SHIFT`/``SCALE`` and are checked against them; ``lins.K`` repeats ``linK``).
"""

from __future__ import annotations

from weights_convert.core import Rule

LPIPS_RULES = [
    Rule(r"features\.(\d+)\.weight", r"vgg/features_\1/kernel", "conv2d"),
    Rule(r"features\.(\d+)\.bias", r"vgg/features_\1/bias"),
    Rule(r"net\.slice\d\.(\d+)\.weight", r"vgg/features_\1/kernel", "conv2d"),
    Rule(r"net\.slice\d\.(\d+)\.bias", r"vgg/features_\1/bias"),
    Rule(r"lin(\d)\.model\.1\.weight", r"lin\1", "conv1x1_vector"),
]
# classifier: after relu5_3, unused; lins.K: a ModuleList alias of linK (the same tensors, saved twice by lpips);
# scaling_layer: lpips' fixed constants, compared by anti_i2v_jax.nn.lpips.load.
LPIPS_IGNORE = [r"classifier\..*", r"lins\.\d\.model\.1\.weight", r"scaling_layer\.(shift|scale)"]


class MergedSource:
    """Several key sources read as one (a key present in two is an error)."""

    def __init__(self, sources):
        from anti_i2v_jax.errors import UserError

        self.sources = list(sources)
        self.path = " + ".join(str(getattr(s, "path", "<source>")) for s in self.sources)
        self._owner = {}
        for s in self.sources:
            for k in s.keys():
                if k in self._owner:
                    raise UserError(f"{k!r} is in both {self._owner[k].path} and {s.path}: give each tensor once")
                self._owner[k] = s

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def load(self, key: str):
        return self._owner[key].load(key)
