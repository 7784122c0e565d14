"""Settings of a protection run: the loss terms, the method presets, ``AttackConfig`` and which terms a
backbone can compute."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from anti_i2v_jax import dsp
from anti_i2v_jax.backbones.base import Backbone
from anti_i2v_jax.errors import UserError

# Every loss term the engine knows, and what it measures. A term is computed only when weighted; a negative
# weight maximises it. Sums are rescaled to Stable Diffusion's 64x64x4 latent (losses.SD_LATENT_ELEMENTS).
TERMS: dict[str, str] = {
    "dm": "the backbone's diffusion loss at a sampled timestep (negative weight: maximised, as AdvDM)",
    "irc": "IRC: deep denoiser layers pulled onto the early layer",
    "ira": "IRA, denoiser: protected-branch taps vs target-image-branch taps (same z_t, t, text)",
    "ira_vae": "IRA, VAE encoder: taps of the protected image vs taps of the target image",
    "aux": "Anti-I2V auxiliary: LPIPS-VGG + (1 - cos of the CLIP image embeddings), protected vs clean image "
    "(each part where available: LPIPS given its weights, CLIP where the backbone has an image encoder)",
    "texture": "MIST texture loss: summed squared distance of the image latent to the target image's latent",
    "texture_mean": "the texture distance mean-reduced, as the authors' mist.py variant has it",
    "vgm_vae": "VGMShield: 1 - cos of the VAE latents of the protected and the reference image, each with fresh "
    "Gaussian noise (vgm_noise)",
    "vgm_clip": "VGMShield: 1 - cos of the CLIP image embeddings of the protected and the reference image",
    "vgm_lpips": "VGMShield: LPIPS-VGG of the protected image to the clean image (given LPIPS weights)",
    "sds": "SDS surrogate: the denoiser's eps-space residual pushed through the encoder only",
}

# Terms that need an optional part of the adapter: the parts that can compute them (any one suffices).
# "image_embedding": a CLIP image encoder (DynamiCrafter's OpenCLIP); "lpips": LPIPS-VGG weights (with_lpips).
TERM_NEEDS: dict[str, tuple[str, ...]] = {
    "aux": ("lpips", "image_embedding"),
    "vgm_clip": ("image_embedding",),
    "vgm_lpips": ("lpips",),
}

# Objective presets. Anti-I2V: L_IRC + L_IRA + L_aux - L_DM with unit weights, each term normalised by its
# mean magnitude at the start. Every baseline keeps the paper's shared budget (16/255) and step count (200)
# and follows its original objective; METHOD_NOTES says what the original is and where this differs.
METHODS: dict[str, dict[str, Any]] = {
    "anti-i2v": dict(
        weights=(("irc", 1.0), ("ira", 1.0), ("ira_vae", 1.0), ("aux", -1.0), ("dm", -1.0)),
        schedule="alternate", normalize_terms=True, random_start=False,
    ),
    "advdm": dict(weights=(("dm", -1.0),), schedule="rgb", normalize_terms=False, random_start=True, vae_sample=True),
    "mist": dict(
        weights=(("texture", 1.0), ("dm", -1.0e4)),
        schedule="rgb", normalize_terms=False, random_start=True, vae_sample=True,
    ),
    "mist-vaijsc": dict(
        weights=(("texture_mean", 1.0), ("dm", -1.0e4)),
        schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True,
    ),
    "vgmshield": dict(
        weights=(("vgm_vae", -1.0), ("vgm_clip", -1.0), ("vgm_lpips", -1.0)),
        schedule="rgb", normalize_terms=False, random_start=False, vgm_directed=False,
    ),
    "vgmshield-directed": dict(
        weights=(("vgm_vae", 1.0), ("vgm_clip", 1.0), ("vgm_lpips", 1.0)),
        schedule="rgb", normalize_terms=False, random_start=False, vgm_directed=True,
    ),
    "sds": dict(weights=(("sds", 1.0),), schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True),
    "sds+": dict(weights=(("sds", -1.0),), schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True),
    "sdst": dict(
        weights=(("sds", 5.0), ("texture", 1.0)),
        schedule="rgb", normalize_terms=False, random_start=False, vae_sample=True,
    ),
    "photoguard": dict(weights=(("texture", 1.0),), schedule="rgb", normalize_terms=False, random_start=True),
}

# One line per preset for --help and reports: the original and each deliberate deviation (README: "Methods").
METHOD_NOTES: dict[str, str] = {
    "anti-i2v": "IRC + IRA (denoiser and VAE) - auxiliary (LPIPS + CLIP distance) - diffusion loss, dual-space steps",
    "advdm": "AdvDM (Liang et al. 2023): sign ascent on the diffusion loss, random start, sampled VAE posterior",
    "mist": "MIST (psyker-team/mist): summed texture loss to the target minus 1e4 x the diffusion loss",
    "mist-vaijsc": "the Anti-I2V authors' MIST variant: mean texture loss, so it behaves like AdvDM",
    "vgmshield": "VGMShield undirected (MMVGM): ascend 1 - cos to the clean image's noisy VAE latent and CLIP "
    "embedding, and LPIPS to the clean image",
    "vgmshield-directed": "VGMShield directed (MMVGM): descend 1 - cos to the target image's VAE latent and CLIP "
    "embedding, and LPIPS to the clean image",
    "sds": "SDS(-) (Xue et al. 2024): descend along the encoder Jacobian of eps_hat - eps (the recommended variant)",
    "sds+": "SDS(+): ascend along the encoder Jacobian of eps_hat - eps",
    "sdst": "SDS(-) with a texture target (Diff-Protect using_target, rate 5)",
    "photoguard": "PhotoGuard encoder attack (Salman et al. 2023): pull the image latent onto the target's",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """Every setting of a protection run; the paper's unknowns are documented defaults (docs/method.md, section 3).

    Budgets and steps are on the [0, 1] image scale. Layer choices of ``None`` take the backbone's defaults.
    """

    method: str = "anti-i2v"
    eps: float = 16.0 / 255.0  # project page: 16/255, 200 iterations
    steps: int = 200
    schedule: str = "alternate"  # even steps L*a*b*, odd steps DCT; or "lab", "dct", "rgb", "lab,dct,dct"
    step_rgb: float = 1.0 / 255.0  # RGB sign step (baselines)
    step_lab: float = 0.5  # a*/b* sign step, in L*a*b* units
    step_dct: float = 1.0 / 255.0  # RMS RGB change of one DCT sign step (scaled per coefficient by dsp.dct_step_scale)
    dct_fraction: float = 0.25  # low band: u < H/4 and v < W/4
    dct_block: int | None = None  # None: one global DCT; e.g. 8 for JPEG-style tiles
    weights: tuple[tuple[str, float], ...] = METHODS["anti-i2v"]["weights"]
    normalize_terms: bool = True  # divide each term by its mean |value| over normalize_draws draws at the start
    normalize_draws: int = 4  # (t, eps, posterior) draws that set the normalisation; seeded by `seed`
    random_start: bool = False
    irc_early: int | None = None
    irc_deep: tuple[int, ...] | None = None
    ira_layers: tuple[int, ...] | None = None
    vae_layers: tuple[str, ...] | None = None
    vae_sample: bool = False  # sample the VAE posterior each step instead of using its mean (where the backbone supports it)
    vgm_noise: float = 0.02  # VGMShield's Gaussian noise std on both VAE branches, on the [-1, 1] scale (MMVGM)
    vgm_directed: bool = False  # VGMShield terms measured against the target image (directed) or the clean one
    target_seed: int = 0  # seed of the procedural IRA/MIST target texture (when no target image is given)
    prompt: str = "a video"  # used when no per-image prompt is given; a caption of the image is better
    seed: int = 0
    chunk_size: int = 10  # steps per jitted lax.scan chunk (progress, finiteness checks, checkpoints)
    checkpoint_every: int = 50  # a save at the first chunk end at or past each multiple of this (with a folder)

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.eps <= 1.0:
            problems.append(f"eps must be in (0, 1] on the [0, 1] scale, got {self.eps}")
        if self.steps < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        unknown = [name for name, _ in self.weights if name not in TERMS]
        if unknown:
            problems.append(f"unknown loss terms {unknown}; known: {sorted(TERMS)}")
        if not self.weights or all(w == 0 for _, w in self.weights):
            problems.append("weights: at least one loss term needs a non-zero weight")
        if self.normalize_draws < 1:
            problems.append(f"normalize_draws must be >= 1, got {self.normalize_draws}")
        if self.vgm_noise < 0:
            problems.append(f"vgm_noise must be >= 0, got {self.vgm_noise}")
        if self.dct_block is not None and self.dct_block < 1:
            problems.append(f"dct_block must be >= 1 or None, got {self.dct_block}")
        if not 0.0 < self.dct_fraction <= 1.0:
            problems.append(f"dct_fraction must be in (0, 1], got {self.dct_fraction}")
        try:
            dsp.schedule_spaces(self.schedule)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise UserError("invalid settings: " + "; ".join(problems))

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> AttackConfig:
        """The preset of ``method`` (one of :data:`METHODS`) with overrides."""
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}; known: {sorted(METHODS)}")
        return cls(**{"method": method, **METHODS[method], **overrides})

    @property
    def draws(self) -> int:
        """The normalisation draws this run takes before its first step (0 when it does not normalise)."""
        return self.normalize_draws if self.normalize_terms else 0

    @property
    def term_names(self) -> tuple[str, ...]:
        """The loss terms this run computes and records, in a fixed order."""
        return tuple(name for name, w in self.weights if w != 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (for reports and checkpoint fingerprints)."""
        d = dataclasses.asdict(self)
        d["weights"] = dict(self.weights)
        return d


@dataclasses.dataclass(frozen=True)
class ProtectResult:
    """The protected image (uint8, the input's size) and the per-step history of every loss term."""

    image: np.ndarray
    history: dict[str, np.ndarray]  # term -> (steps,) raw values; "total" -> the weighted objective
    steps: int
    seconds: float
    resumed_from: int = 0


@dataclasses.dataclass(frozen=True)
class _Layers:
    irc_early: int
    irc_deep: tuple[int, ...]
    ira: tuple[int, ...]
    vae: tuple[str, ...]

    @classmethod
    def resolve(cls, backbone: Backbone, config: AttackConfig) -> _Layers:
        d = backbone.layers
        pick = lambda value, default: default if value is None else value  # noqa: E731
        layers = cls(
            irc_early=pick(config.irc_early, d.irc_early),
            irc_deep=tuple(pick(config.irc_deep, d.irc_deep)),
            ira=tuple(pick(config.ira_layers, d.ira_layers)),
            vae=tuple(pick(config.vae_layers, d.vae_layers)),
        )
        bad = [i for i in (layers.irc_early, *layers.irc_deep, *layers.ira) if not 0 <= i < d.num_layers]
        if bad:
            raise UserError(
                f"layers {bad} are out of range for {backbone.name} (blocks 0..{d.num_layers - 1})"
            )
        return layers


def provides(backbone: Backbone, part: str) -> bool:
    """Whether ``backbone`` has the optional ``part`` (a key of ``PART_MISSING``)."""
    if part == "lpips":
        return getattr(backbone, "lpips", None) is not None
    if part == "image_embedding":  # an attached OpenCLIP encoder, or an image tower of the backbone's own
        return getattr(backbone, "clip", None) is not None or hasattr(backbone, "_own_image_embedding")
    return hasattr(backbone, part)


# Why a part is absent, for the notes (formatted with the backbone's name).
PART_MISSING = {
    "image_embedding": "{name} has no CLIP image encoder (--clip gives one)",
    "lpips": "no LPIPS-VGG weights were given (--lpips)",
}


def _lacks(backbone: Backbone, term: str) -> bool:
    """Whether ``term`` needs optional adapter parts (``TERM_NEEDS``) of which ``backbone`` has none."""
    return term in TERM_NEEDS and not any(provides(backbone, part) for part in TERM_NEEDS[term])


def uses_target(config: AttackConfig) -> bool:
    """Whether the run's terms read the target image (IRA, the texture terms, directed VGMShield)."""
    names = set(config.term_names)
    return bool({"ira", "ira_vae", "texture", "texture_mean"} & names) or (
        config.vgm_directed and bool({"vgm_vae", "vgm_clip"} & names))


def resolve_terms(backbone: Backbone, config: AttackConfig) -> tuple[AttackConfig, dict[str, str]]:
    """``config`` with the terms ``backbone`` cannot compute removed, and a note for each term left out or cut.

    A term needing optional parts (``TERM_NEEDS``: a CLIP image encoder, LPIPS-VGG weights) is off when the
    adapter has none of them, and ``aux`` runs with the half it can compute; the notes say so, and reports
    record them.
    """
    why = lambda part: PART_MISSING[part].format(name=backbone.name)  # noqa: E731
    keep, notes = [], {}
    for name, w in config.weights:
        if w != 0 and _lacks(backbone, name):
            notes[name] = "off: " + "; ".join(why(part) for part in TERM_NEEDS[name])
            continue
        keep.append((name, w))
    if "aux" in dict(keep):
        if not provides(backbone, "lpips"):
            notes["aux"] = f"CLIP image distance only: {why('lpips')}"
        elif not provides(backbone, "image_embedding"):
            notes["aux"] = f"LPIPS only: {why('image_embedding')}"
    if not any(w != 0 for _, w in keep):
        raise UserError(
            f"method {config.method!r} has no term {backbone.name} can compute ({'; '.join(notes.values())}); "
            f"choose another method or backbone"
        )
    return dataclasses.replace(config, weights=tuple(keep)), notes
