"""Backbone registry: a name -> how to build the adapter, and whether it needs converted weights."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

from anti_i2v_jax.backbones.base import Backbone
from anti_i2v_jax.errors import UserError

# Modules that register the built-in backbones when imported. A backbone package lands here when ported.
_BUILTIN_MODULES: tuple[str, ...] = (
    "anti_i2v_jax.backbones.cogvideox",
    "anti_i2v_jax.backbones.opensora",
    "anti_i2v_jax.backbones.dynamicrafter",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """A registered backbone: its name, a one-line summary and a loader."""

    name: str
    summary: str
    needs_weights: bool
    load: Callable[[Path | None], Backbone]
    # The full-size adapter over ShapeDtypeStruct parameters (no weights, nothing allocated), with the
    # execution switches a real run uses: for shape checks and memory estimates. None for tiny backbones.
    abstract: Callable[[], Backbone] | None = None


_REGISTRY: dict[str, BackboneSpec] = {}
_builtins_loaded = False


def register(spec: BackboneSpec, *, replace: bool = False) -> None:
    """Add ``spec`` under its name; registering a taken name is an error unless ``replace``."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def unregister(name: str) -> None:
    """Remove a backbone (for plug-ins and tests)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def specs() -> list[BackboneSpec]:
    """Every registered backbone, sorted by name."""
    _load_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get(name: str) -> BackboneSpec:
    """The spec registered under ``name``; a clear error lists the known names otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise UserError(f"unknown backbone {name!r} (known: {known}); `anti-i2v backbones` lists them")
    return _REGISTRY[name]


def load(name: str, weights: str | Path | None = None) -> Backbone:
    """Build the adapter for ``name``, from converted ``weights`` when it needs them."""
    spec = get(name)
    if spec.needs_weights and weights is None:
        raise UserError(
            f"backbone {name!r} needs converted weights: a folder made by `python -m weights_convert` "
            f"(CLI: --weights DIR; Python: load_backbone(name, weights))"
        )
    if weights is not None and not spec.needs_weights:
        raise UserError(f"backbone {name!r} is built in (fixed random weights) and takes no converted weights; "
                        f"drop --weights, or choose a real backbone")
    if weights is not None:
        weights = Path(weights)
        if not weights.is_dir():
            raise UserError(f"--weights {weights}: not a directory")
    return spec.load(weights)
