"""Strict parsing of upstream config files into the frozen config dataclasses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from anti_i2v_jax.errors import UserError


def parse_config(cls, raw: dict[str, Any], ignored: frozenset[str], where: str):
    """Build the frozen config ``cls`` from an upstream config dict; a key that is neither a field nor
    listed in ``ignored`` (nor ``_``-prefixed metadata) is an error, so a different model is never built
    silently. Lists become tuples (configs are hashable static arguments)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if k not in fields and k not in ignored and not k.startswith("_"))
    if unknown:
        raise UserError(f"{where}: unknown config keys {unknown}; this port does not know what they change")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in fields})


def read_json(path) -> dict[str, Any]:
    """A JSON config file as a dict, with a clear error when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
