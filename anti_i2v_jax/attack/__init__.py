"""The protection loop: projected sign-gradient steps in the dual space, jitted, chunked, resumable.

One step (for one image):

1. draw the step's keys; the noisy latents, timestep and text are shared by every loss term;
2. ``jax.value_and_grad`` of the weighted objective w.r.t. the RGB perturbation ``delta`` only;
3. pull the RGB gradient back into this step's space (a*/b* of L*a*b*, low-frequency DCT, or RGB),
   take an optax sign step there and map the image back to RGB;
4. project onto ``||x_adv - x||_inf <= eps`` and [0, 1].

Steps run inside ``lax.scan`` chunks; between chunks the host reports progress, checks that every
loss term and the gradient stayed finite, and (with a checkpoint folder) saves the state with orbax.
Many images run on several devices either by dispatching each image's own one-device program to a
device (bytes equal to a run alone) or as one N-device program (``jax.shard_map`` on a mesh, ``jax.pmap``).

Modules: ``config`` (terms, method presets, ``AttackConfig``), ``step`` (the step, the chunk, the initial
state, ``make_protect_fn``), ``executors`` (images over devices), ``checkpoints`` (resumable saves) and
``api`` (``Protector``, ``protect``, ``protect_batch``).
"""

from anti_i2v_jax.attack.api import Protector, check_image, protect, protect_batch
from anti_i2v_jax.attack.checkpoints import _Checkpointer, _fingerprint
from anti_i2v_jax.attack.config import (
    METHOD_NOTES,
    METHODS,
    TERM_NEEDS,
    TERMS,
    AttackConfig,
    ProtectResult,
    _lacks,
    _Layers,
    resolve_terms,
    uses_target,
)
from anti_i2v_jax.attack.executors import MODES, Mode
from anti_i2v_jax.attack.step import (
    _initial_state,
    _make_chunk_fn,
    _prepare_target,
    make_protect_fn,
)
from anti_i2v_jax.errors import AttackError, NonFiniteError

# Also re-exported for the tools and tests that reach inside: _Checkpointer, _fingerprint, _lacks, _Layers,
# _initial_state, _make_chunk_fn, _prepare_target.
__all__ = [
    "_Checkpointer",
    "_Layers",
    "_fingerprint",
    "_initial_state",
    "_lacks",
    "_make_chunk_fn",
    "_prepare_target",
    "METHODS",
    "METHOD_NOTES",
    "MODES",
    "Mode",
    "TERMS",
    "TERM_NEEDS",
    "AttackConfig",
    "AttackError",
    "NonFiniteError",
    "ProtectResult",
    "Protector",
    "check_image",
    "make_protect_fn",
    "protect",
    "protect_batch",
    "resolve_terms",
    "uses_target",
]
