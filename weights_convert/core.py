"""The conversion engine: stream tensors, map keys by a rule table, fill an abstract Flax tree, check all.

A converter is a table of :class:`Rule` (a regex over the upstream key -> a Flax path and a named
transform) plus an abstract parameter tree from ``jax.eval_shape``. :func:`convert` reads one tensor at
a time (memory-mapped), transforms it, checks its shape against the abstract leaf, and fails listing
both sets when any source key is unused or any Flax leaf is unset or mis-shaped.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from anti_i2v_jax.errors import UserError

# ------------------------------------------------------------------------------------------ transforms

# name -> (array transform, shape transform). PyTorch layouts to Flax layouts.
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[tuple], tuple]]] = {
    "identity": (lambda a: a, lambda s: tuple(s)),
    "linear": (lambda a: a.T, lambda s: tuple(reversed(s))),  # (out, in) -> (in, out)
    "conv2d": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[2], s[3], s[1], s[0])),  # OIHW -> HWIO
    "conv3d": (lambda a: a.transpose(2, 3, 4, 1, 0), lambda s: (s[2], s[3], s[4], s[1], s[0])),  # OITHW -> THWIO
    "squeeze0": (lambda a: a[0], lambda s: tuple(s[1:])),  # (1, ...) buffers
    "conv1x1_linear": (lambda a: a[:, :, 0, 0].T, lambda s: (s[1], s[0])),  # 1x1 Conv2d used as a Linear
    "conv1d_k1_linear": (lambda a: a[:, :, 0].T, lambda s: (s[1], s[0])),  # kernel-1 Conv1d used as a Linear
    "conv1x1_vector": (lambda a: a[0, :, 0, 0], lambda s: (s[1],)),  # a (1, C, 1, 1) Conv2d: per-channel weights
    "flatten": (lambda a: a.reshape(-1), lambda s: (int(np.prod(s)),)),  # Keras PReLU slopes (1, 1, C) -> (C,)
}


TORCH = "<torch>"  # a Rule target meaning: the generic PyTorch -> Flax rename below


def torch_to_flax(key: str, ndim: int) -> tuple[str, str]:
    """The generic rename: ``a.b.3.c.weight`` -> ``a/b_3/c/kernel`` (or ``scale`` for 1-D norm weights),
    with the layout transform chosen by the tensor's rank (Linear, Conv2d, Conv3d)."""
    parts: list[str] = []
    for p in key.split("."):
        if p.isdigit() and parts:
            parts[-1] += f"_{p}"
        else:
            parts.append(p)
    transform = "identity"
    if parts[-1] == "weight":
        if ndim == 1:
            parts[-1] = "scale"
        else:
            parts[-1] = "kernel"
            transform = {2: "linear", 4: "conv2d", 5: "conv3d"}[ndim]
    return "/".join(parts), transform


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (a regex matched against the whole upstream key) -> ``target`` Flax path ('/'-separated,
    with ``\\1``-style groups), through the named ``transform``."""

    pattern: str
    target: str
    transform: str = "identity"
    # For TORCH rules: regex substitutions applied to the key, in order, before the generic rename; a
    # transform other than "identity" overrides the one inferred from the rank.
    sub: tuple[tuple[str, str], ...] | tuple[str, str] | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")


# ------------------------------------------------------------------------------------------ readers

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    file: Path
    offsets: tuple[int, int]


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Tensor names, shapes and byte ranges of a safetensors file, reading only its header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    infos = {
        k: TensorInfo(tuple(v["shape"]), v["dtype"], path, tuple(v["data_offsets"])) for k, v in header.items()
    }
    return infos, 8 + n


class SafetensorsSource:
    """A safetensors checkpoint: one file, or a folder with ``*.safetensors.index.json`` shards."""

    def __init__(self, path: str | Path, *, stem: str | None = None):
        path = Path(path)
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self._data_start: dict[Path, int] = {}
        files = self._files(path, stem)
        for file in files:
            infos, start = read_safetensors_header(file)
            self._data_start[file] = start
            for k, info in infos.items():
                if k in self.tensors:
                    raise UserError(f"{path}: tensor {k!r} appears in two shards")
                self.tensors[k] = info

    @staticmethod
    def _files(path: Path, stem: str | None) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise UserError(f"{path}: no such file or folder")
        indices = sorted(path.glob("*.safetensors.index.json"))
        if stem is not None:
            indices = [p for p in indices if p.name.startswith(stem)]
        if len(indices) > 1:
            raise UserError(f"{path}: several index files {[p.name for p in indices]}")
        if indices:
            index = json.loads(indices[0].read_text())
            names = sorted(set(index.get("weight_map", {}).values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise UserError(f"{path}: shards named in {indices[0].name} are missing: {missing}")
            return [path / n for n in names]
        files = sorted(path.glob("*.safetensors"))
        if stem is not None:
            files = [p for p in files if p.name.startswith(stem)]
        if len(files) != 1:
            raise UserError(
                f"{path}: expected one .safetensors file or an index.json, found {[p.name for p in files]}"
            )
        return files

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def load(self, key: str) -> np.ndarray:
        """One tensor, memory-mapped (no copy until transformed)."""
        info = self.tensors[key]
        if info.dtype not in _ST_DTYPES:
            raise UserError(f"{info.file}: tensor {key!r} has unsupported dtype {info.dtype}")
        dtype = np.dtype(_ST_DTYPES[info.dtype])
        begin, end = info.offsets
        count = (end - begin) // dtype.itemsize
        mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=self._data_start[info.file] + begin, shape=(end - begin,))
        return mm.view(dtype)[:count].reshape(info.shape)

    def keys(self) -> list[str]:
        return list(self.tensors)


# Globals a checkpoint may name when torch's weights_only loader refuses it: the tensor rebuild machinery
# and plain containers are loaded; classes of these data-only modules become inert placeholders (their
# fields are kept as data, no code of theirs runs); anything else is refused.
_INERT_MODULE_PREFIXES = ("omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "argparse", "typing")


class _Inert:
    """Stands in for a non-tensor object of a checkpoint (hyper-parameters, callbacks): data only."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # some pickles call what a global rebuilds
        return _Inert(*args, **kwargs)


def _restricted_pickle_module():
    """A ``pickle``-like module whose Unpickler loads tensors and plain data, and refuses other globals."""
    import pickle
    import types

    import torch

    safe = {
        ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
        ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "dtype"),
        ("torch", "device"), ("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage"),
    }
    safe |= {("torch", name) for name in dir(torch) if name.endswith("Storage")}
    safe |= {("torch", name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in safe:
                return super().find_class(module, name)
            if module.startswith(_INERT_MODULE_PREFIXES):
                return type(name, (_Inert,), {"__module__": "weights_convert.inert"})
            raise UserError(
                f"the checkpoint refers to {module}.{name}, which could run code when loaded; refused. "
                f"Only tensors and plain data are read (re-save it with torch.save(model.state_dict()))"
            )

    mod = types.ModuleType("restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.__name__ = "restricted_pickle"
    return mod


class TorchCheckpointSource:
    """A PyTorch / Lightning checkpoint (``.ckpt``, ``.pt``): the tensors of its ``state_dict``.

    Read with ``torch.load(weights_only=True, mmap=True)``; when that refuses other objects in the file
    (Lightning hyper-parameters, callbacks), a restricted unpickler loads the tensors and turns known
    data-only classes into inert placeholders. A reference to anything that could run code is refused.
    """

    def __init__(self, path: str | Path, prefix: str = ""):
        try:
            import torch
        except ImportError:
            raise UserError(f"{path}: reading .ckpt files needs torch: pip install -e '.[torch]'") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except UserError:
            raise
        except Exception as first:  # weights_only refused something: retry with the restricted reader
            import pickle

            try:
                obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
            except UserError:
                raise
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                raise UserError(f"{path}: not a readable PyTorch checkpoint ({e}; first attempt: {first})") from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{path}: holds no state_dict of tensors")
        self._t = {
            k[len(prefix):]: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and k.startswith(prefix)
        }

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def load(self, key: str) -> np.ndarray:
        t = self._t[key].detach()
        if t.dtype.is_floating_point and t.dtype not in (__import__("torch").float32, __import__("torch").float64):
            t = t.float()  # bfloat16 / float16 have no exact numpy view through torch; float32 holds them exactly
        return t.numpy()


class PrefixSource:
    """The tensors of ``source`` whose names start with ``prefix`` (names kept whole): one part of a checkpoint."""

    def __init__(self, source, prefix: str):
        self.source, self.prefix, self.path = source, prefix, getattr(source, "path", "<source>")

    def keys(self) -> list[str]:
        return [k for k in self.source.keys() if k.startswith(self.prefix)]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(key)

    def load(self, key: str) -> np.ndarray:
        return self.source.load(key)


class DictSource:
    """Tensors already in memory (e.g. from a torch state dict converted to numpy)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], path: str = "<memory>"):
        self.path = path
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def load(self, key: str) -> np.ndarray:
        return np.asarray(self._t[key])


class KerasH5Source:
    """A Keras 2 weights file (``model.save_weights("x.h5")``, the layout of DeepFace's ``arcface_weights.h5``
    and ``retinaface.h5``), read with h5py: key ``<layer>/<weight>`` (``conv0/kernel``, ``bn0/moving_mean``),
    one per weight of each layer in the file's ``layer_names``, in file order. Keras kernels are already in Flax's
    layouts (HWIO, (in, out)). Keras 3's ``.weights.h5`` layout (no ``layer_names``) is refused with the reason."""

    def __init__(self, path: str | Path):
        try:
            import h5py
        except ImportError:
            raise UserError(f"{path}: reading Keras .h5 weights needs h5py: pip install h5py") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        self.path = path
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise UserError(f"{path}: not an HDF5 file ({e})") from None
        root = f["model_weights"] if "model_weights" in f else f  # a whole-model .h5 keeps weights there
        if "layer_names" not in root.attrs:
            f.close()
            raise UserError(f"{path}: not a Keras 2 weights file (no layer_names; a Keras 3 .weights.h5 must be "
                            "re-saved with tf_keras, as the files DeepFace distributes are)")
        self._file, self._datasets = f, {}
        for layer in root.attrs["layer_names"]:
            layer = layer.decode() if isinstance(layer, bytes) else str(layer)
            group = root[layer]
            for name in group.attrs.get("weight_names", []):
                name = name.decode() if isinstance(name, bytes) else str(name)
                short = name.rsplit("/", 1)[-1].split(":", 1)[0]
                key = f"{layer}/{short}"
                if key in self._datasets:
                    raise UserError(f"{path}: weight {key} appears twice")
                self._datasets[key] = group[name]

    def keys(self) -> list[str]:
        return list(self._datasets)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._datasets[key].shape)

    def load(self, key: str) -> np.ndarray:
        return np.asarray(self._datasets[key][()])


# ------------------------------------------------------------------------------------------ mapping


class ConversionError(UserError):
    """The checkpoint and the Flax tree do not match; the message lists both sets."""


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out["/".join((*prefix, k))] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def plan(
    shapes: Mapping[str, tuple[int, ...]], rules: list[Rule], ignore: Iterable[str] = ()
) -> tuple[dict[str, tuple[str, str]], list[str], list[str]]:
    """Map every source key: (target path -> (key, transform)), unmatched keys, ignored keys.

    The first matching rule wins; a rule whose target is ``TORCH`` renames the whole key generically."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    ignore_re = [re.compile(p) for p in ignore]
    mapping: dict[str, tuple[str, str]] = {}
    unmatched, ignored = [], []
    for key in shapes:
        if any(p.fullmatch(key) for p in ignore_re):
            ignored.append(key)
            continue
        for regex, rule in compiled:
            m = regex.fullmatch(key)
            if m:
                if rule.target == TORCH:
                    subs = rule.sub or ()
                    if subs and isinstance(subs[0], str):
                        subs = (subs,)
                    renamed = key
                    for pattern, repl in subs:
                        renamed = re.sub(pattern, repl, renamed)
                    if rule.transform != "identity":  # an explicit layout transform: the leaf is a kernel
                        target, transform = torch_to_flax(renamed, 2)[0], rule.transform
                    else:
                        target, transform = torch_to_flax(renamed, len(shapes[key]))
                else:
                    target, transform = m.expand(rule.target), rule.transform
                if target in mapping:
                    raise ConversionError(f"keys {mapping[target][0]!r} and {key!r} both map to {target}")
                mapping[target] = (key, transform)
                break
        else:
            unmatched.append(key)
    return mapping, unmatched, ignored


@dataclasses.dataclass
class Report:
    mapped: int
    ignored: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def summary(self) -> str:
        return (
            f"mapped {self.mapped} tensors, ignored {self.ignored}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}"
        )

    def raise_if_bad(self, what: str) -> None:
        problems = []
        if self.unexpected:
            problems.append(f"source keys no rule uses ({len(self.unexpected)}): {sorted(self.unexpected)}")
        if self.missing:
            problems.append(f"Flax leaves no source key fills ({len(self.missing)}): {sorted(self.missing)}")
        if self.mismatched:
            problems.append(f"shape mismatches ({len(self.mismatched)}): {self.mismatched}")
        if problems:
            raise ConversionError(f"{what}: checkpoint does not match the model.\n  " + "\n  ".join(problems))


def convert(
    source,
    rules: list[Rule],
    abstract: Mapping,
    *,
    ignore: Iterable[str] = (),
    dtype: Any = None,
    dry_run: bool = False,
    what: str = "conversion",
) -> tuple[dict | None, Report]:
    """Fill ``abstract`` (a tree of ShapeDtypeStruct) from ``source`` through ``rules``.

    With ``dry_run`` only shapes are checked (no tensor data is read). Returns (params or None, report);
    raises :class:`ConversionError` listing every problem.
    """
    mapping, unmatched, ignored = plan({k: source.shape(k) for k in source.keys()}, rules, ignore)
    targets = _flatten(abstract)
    missing = sorted(set(targets) - set(mapping))
    unexpected = sorted(unmatched + [f"{k} -> {t} (no such Flax leaf)" for t, (k, _) in mapping.items() if t not in targets])
    mismatched = []
    for target, (key, transform) in mapping.items():
        if target not in targets:
            continue
        want = tuple(targets[target].shape)
        got = TRANSFORMS[transform][1](source.shape(key))
        if got != want:
            mismatched.append(f"{key} {tuple(source.shape(key))} -> {target} {got}, model expects {want}")
    report = Report(len(mapping), len(ignored), missing, unexpected, mismatched)
    report.raise_if_bad(what)
    if dry_run:
        return None, report
    flat = {}
    for target, (key, transform) in mapping.items():
        leaf_dtype = dtype or targets[target].dtype
        flat[target] = np.asarray(TRANSFORMS[transform][0](source.load(key)), dtype=leaf_dtype)
    return _unflatten(flat), report


def abstract_params(init_fn: Callable[[], Any]) -> dict:
    """The parameter tree of ``init_fn`` as ShapeDtypeStructs, without allocating it."""
    variables = jax.eval_shape(init_fn)
    return jax.tree.map(lambda x: x, dict(variables["params"]))
