"""Backbone adapters: the protocol, the registry, and one package per ported model."""

from anti_i2v_jax.backbones.base import Backbone, LayerDefaults, Noisy
from anti_i2v_jax.backbones.registry import (
    BackboneSpec,
    load,
    register,
    specs,
    unregister,
)

__all__ = ["Backbone", "BackboneSpec", "LayerDefaults", "Noisy", "load", "register", "specs", "unregister"]
