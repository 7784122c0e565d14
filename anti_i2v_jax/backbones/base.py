"""The Backbone protocol: everything the attack needs from an image-to-video model.

An adapter is a small frozen object over (config, params) with pure methods. Parameters are passed
explicitly (``backbone.params`` is the default) so that ``jax.jit`` sees them as arguments, never as
constants folded into the program. Taps come back as plain ``{layer: array}`` dicts; only the layers
asked for are computed and kept.

Conventions every adapter follows:

* images reach the adapter as ``(H, W, 3)`` float32 in [0, 1] at the *input's* resolution; the adapter's
  own differentiable preprocessing (``resize_center_crop`` and normalisation) maps them to the model size;
* ``condition`` returns the image condition (a pytree) and the requested VAE-encoder taps, which always
  include ``"latent"`` (the scaled image latent) when asked for;
* ``add_noise`` builds the clean video latents from the condition (the image repeated over frames unless
  the adapter was given a reference video) and noises them at a sampled timestep;
* ``denoise`` runs the denoiser on a :class:`Noisy` sample and returns its prediction in the backbone's own
  parameterisation (eps, v or velocity) together with the requested block taps;
* ``eps_residual`` converts a prediction to ``eps_hat - eps`` (eps: itself; v: ``sqrt(a_t) (v_hat - v)``;
  rectified flow: ``-(1 - t/T) (v_hat - v)``), so score distillation has one sign on every backbone;
* ``image_embedding(params, x)`` is a global CLIP image embedding for the CLIP terms of VGMShield and of
  Anti-I2V's auxiliary loss: an attached OpenCLIP encoder's (``with_clip``), else an image tower of the adapter's
  own (``_own_image_embedding``: DynamiCrafter's OpenCLIP ViT-H). A ``condition`` that is a dict may hold
  ``clip_embedding``, equal to ``image_embedding(params, x)`` of the same ``x``: the CLIP terms then use it instead
  of a second pass through the image tower (DynamiCrafter conditions on that tower's tokens);
* an adapter may expose ``attack_params``, the subset (or re-layout) of its parameters a protection step
  needs; the attack then holds only those and passes them to every method;
* an adapter may carry LPIPS-VGG (``with_lpips(model)``: a field ``lpips``, its parameters under
  ``attack_params["lpips"]``, ``perceptual_features(params, y)`` and ``perceptual_distance(params, x,
  y_features)``) for the LPIPS terms of Anti-I2V's
  auxiliary loss and of VGMShield. LPIPS belongs to no backbone; it rides on the adapter so that every entry
  point (``Protector``, ``make_protect_fn``, the memory report) passes it as a step parameter like the rest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Taps = dict[int | str, jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerDefaults:
    """A backbone's block count and its default layer choices for IRC and IRA (documented per backbone)."""

    num_layers: int
    irc_early: int
    irc_deep: tuple[int, ...]
    ira_layers: tuple[int, ...]
    vae_layers: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Geometry:
    """The video a run works with: pixel ``frames`` x ``height`` x ``width`` and, where the model is conditioned
    on it, ``fps`` (Open-Sora's fps, DynamiCrafter's fps or frame stride; None for CogVideoX).

    A run setting, not a model property: each adapter takes the model card's values as defaults and
    ``with_geometry`` returns a copy at another geometry after checking that the model can take it.
    """

    frames: int
    height: int
    width: int
    fps: float | None = None

    def describe(self) -> str:
        fps = "" if self.fps is None else f" at {self.fps:g} fps"
        return f"{self.frames} frames x {self.height} x {self.width}{fps}"


def nearest_multiples(value: int, step: int, offset: int = 0, minimum: int | None = None) -> str:
    """The valid values around ``value`` among ``offset + k * step`` (k >= 0), as words for an error."""
    low = offset + max(0, (value - offset) // step) * step
    lowest = offset if minimum is None else minimum
    options = sorted({v for v in (low, low + step) if v >= lowest} or {lowest})
    return " or ".join(str(v) for v in options)


def check_multiple(what: str, value: int, step: int, why: str, offset: int = 0, minimum: int = 1) -> list[str]:
    """[] when ``value`` is ``offset + k*step`` and >= ``minimum``; else one problem naming the nearest valid values."""
    if value >= minimum and (value - offset) % step == 0:
        return []
    rule = f"a multiple of {step}" if offset == 0 else f"{step}k + {offset}"
    at_least = f", at least {minimum}" if minimum > max(offset, 1) else ""
    return [f"{what} {value}: {why} needs {rule}{at_least} (nearest: {nearest_multiples(value, step, offset, minimum)})"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Noisy:
    """One draw of the forward diffusion process, shared by every loss term of a step."""

    x0: jax.Array  # clean video latents the noise was added to
    z_t: jax.Array  # noisy latents fed to the denoiser
    t: jax.Array  # timestep (backbone units)
    target: jax.Array  # what the denoiser should predict (eps, v or velocity)


@runtime_checkable
class Backbone(Protocol):
    """What the attack sees of an image-to-video backbone."""

    name: str
    model_size: tuple[int, int]  # (H, W) in pixels of the model input
    min_input_side: int  # shorter side below which an input is refused
    layers: LayerDefaults
    params: Params

    def encode_text(self, params: Params, prompt: str) -> Any:
        """Text conditioning for ``prompt`` (tokenised on the host); a pytree of arrays."""
        ...

    def condition(
        self, params: Params, x: jax.Array, key: jax.Array | None, *, vae_layers: Sequence[str] = ()
    ) -> tuple[Any, Taps]:
        """Image condition of ``x`` ((H, W, 3) in [0, 1]) and the VAE-encoder taps named in ``vae_layers``.

        ``key`` None means the VAE posterior mean; a key samples the posterior (where supported).
        """
        ...

    def add_noise(self, params: Params, cond: Any, key: jax.Array, *, t: jax.Array | None = None) -> Noisy:
        """Clean video latents from ``cond`` noised at a timestep drawn with ``key`` (or at ``t``, in the
        backbone's own timestep units, when given: the layer analysis looks at chosen timesteps)."""
        ...

    def denoise(
        self, params: Params, noisy: Noisy, cond: Any, text: Any, *, taps: Sequence[int] = ()
    ) -> tuple[jax.Array, Taps]:
        """Denoiser prediction for ``noisy`` given the image condition and text, plus the requested block taps."""
        ...

    def diffusion_loss(self, prediction: jax.Array, noisy: Noisy) -> jax.Array:
        """The backbone's own training loss for ``prediction`` (a float32 scalar)."""
        ...

    def eps_residual(self, prediction: jax.Array, noisy: Noisy) -> jax.Array:
        """``eps_hat - eps`` in the backbone's noise space, shaped like ``noisy.x0``, zero on conditioning
        frames (score distillation): the prediction converted from the backbone's own parameterisation."""
        ...


class AdapterDefaults:
    """Shared by the adapters (frozen dataclasses with ``config``, ``layers``, ``min_input_side``, ``lpips`` and
    ``clip``): the model size from ``config.height``/``config.width``, the two defaults filled in when left
    unset (``layers`` from the adapter's ``default_layers(config)``), and the LPIPS and CLIP attachments."""

    def with_lpips(self, model):
        """A copy carrying LPIPS-VGG (:class:`anti_i2v_jax.nn.lpips.LPIPSModel`, or None to drop it) for the
        perceptual terms; its parameters join :attr:`attack_params` under ``"lpips"``."""
        import dataclasses

        return dataclasses.replace(self, lpips=model)

    def with_clip(self, model):
        """A copy carrying an OpenCLIP image encoder (:class:`anti_i2v_jax.nn.openclip_image.CLIPImageModel`, or
        None to drop it) for the CLIP terms; it takes precedence over an image tower of the backbone's own."""
        import dataclasses

        return dataclasses.replace(self, clip=model)

    def _attached_params(self) -> dict:
        """The attached models' parameters for :attr:`attack_params`: ``"lpips"`` and ``"clip_model"`` when
        attached."""
        out = {} if self.lpips is None else {"lpips": self.lpips.params}
        if getattr(self, "clip", None) is not None:
            out["clip_model"] = self.clip.params
        return out

    def image_embedding(self, params, x) -> jax.Array:
        """A global CLIP image embedding of ``x`` ((H, W, 3) in [0, 1]): the attached encoder's (:meth:`with_clip`),
        else the backbone's own image tower's (``_own_image_embedding``, DynamiCrafter)."""
        if getattr(self, "clip", None) is not None:
            return self.clip(params["clip_model"], self.cast(x))
        own = getattr(self, "_own_image_embedding", None)
        if own is None:
            raise ValueError(f"{self.name} has no CLIP image encoder: use with_clip(anti_i2v_jax.nn.openclip_image.load(...))")
        return own(params, x)

    def _lpips_model(self):
        if self.lpips is None:
            raise ValueError(f"{self.name} carries no LPIPS model: use with_lpips(anti_i2v_jax.nn.lpips.load(...))")
        return self.lpips

    def perceptual_features(self, params, y):
        """LPIPS-VGG features of a reference image (H, W, 3) in [0, 1], computed once (needs :meth:`with_lpips`)."""
        return self._lpips_model().features(params["lpips"], self.cast(y))

    def perceptual_distance(self, params, x, y_features) -> jax.Array:
        """LPIPS-VGG between ``x`` (H, W, 3) in [0, 1] and the image of ``y_features`` (:meth:`perceptual_features`),
        each at its own size."""
        return self._lpips_model().distance_to(params["lpips"], self.cast(x), y_features).astype(jnp.float32)

    @property
    def model_size(self) -> tuple[int, int]:
        return (self.config.height, self.config.width)

    @property
    def compute_dtype(self):
        """The dtype the networks run in under this adapter's ``precision`` (see ``anti_i2v_jax.precision``)."""
        from anti_i2v_jax.precision import compute_dtype

        return compute_dtype(self.precision)

    def cast(self, tree):
        """Floating leaves of ``tree`` (weights or network inputs) in the compute dtype."""
        from anti_i2v_jax.precision import cast_floating

        return cast_floating(tree, self.compute_dtype)

    # The field of the adapter's config that holds the denoiser's execution switches (scan_layers, remat,
    # remat_policy); set by each adapter.
    denoiser_config: str

    @classmethod
    def with_execution(cls, config, **switches):
        """``config`` with the denoiser's execution switches replaced (a switch given as None is kept)."""
        import dataclasses

        changes = {k: v for k, v in switches.items() if v is not None}
        if not changes:
            return config
        denoiser = getattr(config, cls.denoiser_config)
        return dataclasses.replace(config, **{cls.denoiser_config: dataclasses.replace(denoiser, **changes)})

    def configured(self, *, precision: str | None = None, remat: bool | None = None,
                   remat_policy: str | None = None):
        """A copy with another precision (``fp32``/``bf16``) and/or rematerialisation of the denoiser's
        blocks (``remat``; ``remat_policy`` names what a block keeps, see ``anti_i2v_jax.nn.remat``)."""
        import dataclasses

        from anti_i2v_jax.nn.remat import check_policy
        from anti_i2v_jax.precision import compute_dtype

        changes = {}
        if precision is not None:
            compute_dtype(precision)
            changes["precision"] = precision
        if remat_policy is not None:
            check_policy(remat_policy)
        config = self.with_execution(self.config, remat=remat, remat_policy=remat_policy)
        if config is not self.config:
            changes["config"] = config
        return dataclasses.replace(self, **changes) if changes else self

    def with_geometry(self, frames: int | None = None, height: int | None = None, width: int | None = None,
                      fps: float | None = None):
        """A copy that runs at another geometry (a value left None keeps the current one). A geometry the model
        cannot take is a :class:`~anti_i2v_jax.errors.UserError` naming every problem and the nearest valid sizes."""
        from anti_i2v_jax.errors import UserError

        old = self.geometry
        if fps is not None and old.fps is None:
            raise UserError(f"{self.name} has no fps or frame-stride conditioning; drop --model-fps")
        new = Geometry(
            frames=old.frames if frames is None else int(frames),
            height=old.height if height is None else int(height),
            width=old.width if width is None else int(width),
            fps=old.fps if fps is None else fps,
        )
        if new == old:
            return self
        problems = self.geometry_problems(new)
        if problems:
            raise UserError(f"{self.name} cannot run at {new.describe()}: " + "; ".join(problems))
        if self.reference_latents is not None:
            raise UserError("set the geometry first, then the reference video (it is encoded at the run's geometry)")
        changes = self._geometry_changes(new)
        if self.min_input_side == default_min_input_side(self.model_size):
            changes["min_input_side"] = 0  # the default follows the new model size (__post_init__)
        return dataclasses.replace(self, **changes)

    def preprocess(self, x: jax.Array) -> jax.Array:
        """(H, W, 3) in [0, 1] at any size -> the model size in [-1, 1] (resize to cover, centre crop)."""
        return to_signed(resize_center_crop(x, self.model_size))

    def __post_init__(self):
        if self.layers is None:
            object.__setattr__(self, "layers", self.default_layers(self.config))
        if not self.min_input_side:
            object.__setattr__(self, "min_input_side", default_min_input_side(self.model_size))


def resample_frames(video: np.ndarray, n: int) -> np.ndarray:
    """``n`` frames of ``video`` (T, ...) at evenly spaced indices from the first to the last (repeats when
    ``T < n``): how a reference clip of any length becomes a model's frame count."""
    t = len(video)
    if t < 1:
        raise ValueError("a reference video needs at least one frame")
    return np.asarray(video)[np.rint(np.linspace(0, t - 1, n)).astype(int)]


def default_min_input_side(model_size: tuple[int, int]) -> int:
    """Inputs whose shorter side is under a quarter of the model's (and under 16 px) are refused."""
    return max(16, min(model_size) // 4)


def restore_converted(path, abstract: dict, dtype) -> dict:
    """Converted weights (``params/<component>`` orbax checkpoints written by ``weights_convert``) as
    ``{component: tree}``, restored onto ``abstract`` with every leaf in ``dtype``."""
    from pathlib import Path

    import orbax.checkpoint as ocp

    from anti_i2v_jax.errors import UserError

    checkpointer = ocp.StandardCheckpointer()
    params = {}
    for part, tree in abstract.items():
        folder = Path(path) / "params" / part
        if not folder.is_dir():
            raise UserError(f"{path}: missing params/{part}; convert again with python -m weights_convert")
        params[part] = checkpointer.restore(folder, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree))
    return params


def resize_center_crop(x: jax.Array, size: tuple[int, int], method: str = "linear") -> jax.Array:
    """Differentiably resize ``(H, W, C)`` to cover ``size`` keeping the aspect ratio, then centre-crop to it."""
    h, w = x.shape[-3:-1]
    th, tw = size
    scale = max(th / h, tw / w)
    rh, rw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
    if (rh, rw) != (h, w):
        x = jax.image.resize(x, (*x.shape[:-3], rh, rw, x.shape[-1]), method=method, antialias=True)
    top, left = (rh - th) // 2, (rw - tw) // 2
    return x[..., top : top + th, left : left + tw, :]


def to_signed(x: jax.Array) -> jax.Array:
    """[0, 1] -> [-1, 1], the range every supported VAE expects."""
    return jnp.asarray(x) * 2.0 - 1.0
