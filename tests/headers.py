"""Header-only safetensors files with full-size shapes (sparse data region), from the reference key lists."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

# Key names and shapes of the released checkpoints (read from their safetensors headers / state dicts).
KEYS = Path(__file__).resolve().parent / "data" / "keys"
needs_keys = pytest.mark.skipif(not KEYS.is_dir(), reason=f"key lists not found at {KEYS}")


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    """``name (d0, d1, ...) [dtype]`` lines of a key list; comment lines are skipped."""
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        m = re.fullmatch(r"(\S+) \(([\d, ]*)\)(?: \S+)?", line.strip())
        if m:
            out[m.group(1)] = tuple(int(x) for x in m.group(2).replace(" ", "").split(",") if x)
    return out


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> None:
    """A safetensors file with a real header and a sparse (unwritten) data region of the full size."""
    itemsize = {"BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
