"""Import-only stand-ins that let the upstream PyTorch code (Open-Sora v1.2.0, DynamiCrafter) run on a CPU.

None of this is upstream code, and none of it changes the maths on the paths the benchmarks and golden
generators run:

* ``xformers``: ``memory_efficient_attention`` and ``fmha.BlockDiagonalMask.from_seqlens`` re-implemented
  exactly in torch (softmax in float32, scale head_dim^-0.5; a block-diagonal mask lets query block i
  attend to key block i only, as xformers does);
* ``colossalai``, ``av``, ``cv2``: dummy modules (imported at module level, never called on these paths);
* ``torchvision`` (the PyPI wheel links CUDA ops that a CPU torch lacks): its registration of fake ops is
  allowed to fail, so the pure-Python parts import;
* ``posterior_means()``: VAE posteriors return their mean from ``sample()`` so both sides compare the
  deterministic encode (the attack uses the posterior mean by default).

    import sys; sys.path.insert(0, "tools/upstream"); import stubs; stubs.install()
"""

from __future__ import annotations

import sys
import types


class _Anything(types.ModuleType):
    """A module whose every attribute is another such module (callable, subclassable as a no-op)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        child = _Anything(f"{self.__name__}.{name}")
        setattr(self, name, child)
        sys.modules[child.__name__] = child
        return child

    def __call__(self, *args, **kwargs):
        return None

    def __mro_entries__(self, bases):
        return (object,)


class _DummyFinder:
    """Resolves ``import colossalai.booster`` and the like to :class:`_Anything` modules."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Anything(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _dummy(names) -> None:
    if not any(isinstance(f, _DummyFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DummyFinder(names))


def _xformers() -> None:
    import torch

    class BlockDiagonalMask:
        def __init__(self, q_lens, k_lens):
            self.q_lens, self.k_lens = list(q_lens), list(k_lens)

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            kv = q_seqlen if kv_seqlen is None else kv_seqlen
            return cls(q_seqlen, [int(n) for n in kv])

        def materialize(self, device):
            nq, nk = sum(self.q_lens), sum(self.k_lens)
            mask = torch.full((nq, nk), float("-inf"), device=device)
            q0 = k0 = 0
            for lq, lk in zip(self.q_lens, self.k_lens):
                mask[q0 : q0 + lq, k0 : k0 + lk] = 0.0
                q0, k0 = q0 + lq, k0 + lk
            return mask

    def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None, **_):
        # (B, L, H, D) in and out, as xformers
        scale = q.shape[-1] ** -0.5
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float() * scale, k.float())
        if attn_bias is not None:
            bias = attn_bias.materialize(q.device) if isinstance(attn_bias, BlockDiagonalMask) else attn_bias
            scores = scores + bias
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
        return out.to(q.dtype).contiguous()

    # diffusers looks xformers up with find_spec, which wants a spec; say it is absent for diffusers' own use
    import importlib.machinery

    xf = types.ModuleType("xformers")
    xf.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.BlockDiagonalMask = BlockDiagonalMask
    ops.fmha = fmha
    ops.memory_efficient_attention = memory_efficient_attention
    xf.ops = ops
    sys.modules.update({"xformers": xf, "xformers.ops": ops, "xformers.ops.fmha": fmha})


def _torchvision_shim() -> None:
    import torch

    original = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        if not (isinstance(op, str) and op.startswith("torchvision::")):
            return original(op, *args, **kwargs)

        def register(fn=None):
            try:
                return original(op, *args, **kwargs)(fn) if fn is not None else None
            except RuntimeError:  # the CUDA-linked op library did not load: nothing to register
                return fn

        return register if "func" not in kwargs and not args else register(args[0] if args else kwargs["func"])

    torch.library.register_fake = tolerant


def install() -> None:
    """Install every stand-in (idempotent)."""
    _xformers()
    _dummy(("colossalai", "av", "cv2"))
    _torchvision_shim()


def posterior_means() -> None:
    """Make the diffusers and Open-Sora Gaussian posteriors deterministic: ``sample()`` returns the mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # a copy: upstream scales the sample in place (`.mul_`), which autograd refuses on a view of the moments
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean.clone()
    try:
        from opensora.models.vae.utils import DiagonalGaussianDistribution as OSDiag

        OSDiag.sample = lambda self: self.mean.clone()
    except ImportError:
        pass
