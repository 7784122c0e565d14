"""Seeded weights for golden cases whose checkpoint is too large to keep in the repository: a case records
the key names, shapes and seed, and the generator and the test both rebuild the same tensors from them."""

from __future__ import annotations

import numpy as np


def seeded_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """float32 tensors for ``shapes`` (in key order), drawn from one numpy generator; scales keep activations
    O(1): convolutions and linears 1/sqrt(fan-in), norm weights near 1, variances in [0.5, 1.5], PReLU near 0.25,
    LPIPS heads in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            out[key] = np.zeros(shape, np.int64)
            continue
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.startswith("lin") and key.endswith(".model.1.weight"):  # LPIPS heads: non-negative, as trained
            value = rng.uniform(0.0, 1.0, shape)
        elif key.endswith("prelu.weight"):
            value = 0.25 + 0.05 * rng.standard_normal(shape)
        elif len(shape) == 1 and key.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # biases and running means
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        out[key] = np.asarray(value, np.float32)
    return out


def materialise(case, cache=None):
    """The checkpoint file of a golden case whose weights are seeded (``case.json`` ``seeded_weights``: ``file``,
    ``seed``, ``keys`` {name: shape} in draw order, and ``buffers``, a small safetensors file of the tensors that
    must keep their real values, such as a diffusion schedule), built once into ``cache`` (default: a folder in
    the system's temporary directory, keyed by the case's content) and returned; None for a case that stores its
    checkpoint. A ``.ckpt`` file is written as ``torch.save({"state_dict": ...})`` (needs torch)."""
    import hashlib
    import json
    import os
    import tempfile
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    case = Path(case)
    spec = json.loads((case / "case.json").read_text()).get("seeded_weights")
    if spec is None:
        return None
    buffers = (case / spec["buffers"]).read_bytes()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + buffers).hexdigest()[:16]
    out = Path(cache or Path(tempfile.gettempdir()) / "anti_i2v_golden") / f"{case.name}-{digest}" / spec["file"]
    if out.exists():
        return out
    tensors = {**seeded_weights(spec["keys"], spec["seed"]), **load_file(case / spec["buffers"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # several test workers may build it at once
    if out.suffix == ".ckpt":
        import torch

        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}, tmp)
    else:
        save_file(tensors, str(tmp))
    os.replace(tmp, out)
    return out
