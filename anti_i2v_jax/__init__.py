"""anti_i2v_jax: protect photos against malicious image-to-video generation (Anti-I2V, CVPR 2026) in JAX."""

from anti_i2v_jax.attack import (
    METHOD_NOTES,
    METHODS,
    TERMS,
    AttackConfig,
    Protector,
    ProtectResult,
    make_protect_fn,
    protect,
    protect_batch,
    resolve_terms,
)
from anti_i2v_jax.backbones import load as load_backbone
from anti_i2v_jax.errors import AttackError, ImageError, NonFiniteError, UserError
from anti_i2v_jax.io import load_image, save_image

__version__ = "0.1.0"

__all__ = [
    "METHOD_NOTES",
    "METHODS",
    "TERMS",
    "AttackConfig",
    "AttackError",
    "ImageError",
    "NonFiniteError",
    "ProtectResult",
    "Protector",
    "UserError",
    "load_backbone",
    "load_image",
    "make_protect_fn",
    "protect",
    "protect_batch",
    "resolve_terms",
    "save_image",
]
