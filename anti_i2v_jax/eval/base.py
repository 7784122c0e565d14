"""A metric's value or the reason it has none."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class MetricUnavailable(Exception):
    """A metric cannot run here (its weights or package are absent); the message says how to enable it."""


@dataclasses.dataclass(frozen=True)
class Missing:
    """Stands in a results table where a metric has no value; ``reason`` says why and how to get one."""

    reason: str

    def __str__(self) -> str:
        return "n/a"


def is_missing(value: Any) -> bool:
    """True for :class:`Missing`, ``None`` and NaN: a cell without a number."""
    return value is None or isinstance(value, Missing) or (isinstance(value, float) and math.isnan(value))
