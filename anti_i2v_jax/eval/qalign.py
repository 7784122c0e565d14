"""Q-Align's scoring rules (Wu et al. 2024, ``Q-Future/Q-Align`` ``q_align/evaluate/scorer.py``), without the model.

Q-Align asks mPLUG-Owl2 (7B) to complete "The quality of the image is" and reads the next-token logits of
the five level words; the score is the softmax over those five weighted by [1, .75, .5, .25, 0] (a value in
[0, 1]; Q-Align's own 1-5 scale is 1 + 4x this). Images are padded to a square with the image processor's
mean colour; a video is scored from frames sampled at 1 fps, all given to the model as one input.
``experiments/qalign_score.py`` runs the model (PyTorch, a local model folder) with these rules; they live
here so they are tested without it.
"""

from __future__ import annotations

import numpy as np

LEVELS = ("excellent", "good", "fair", "poor", "bad")
WEIGHTS = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
PROMPTS = {
    "image": "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is",
    "video": "USER: How would you rate the quality of this video?\n<|image|>\nASSISTANT: The quality of the video is",
}
# CLIP's normalisation mean (the mPLUG-Owl2 image processor's), as 8-bit colour: the square padding.
PAD_COLOUR = tuple(int(c * 255) for c in (0.48145466, 0.4578275, 0.40821073))


def score_from_logits(level_logits: np.ndarray) -> np.ndarray:
    """(..., 5) logits of the level words, in :data:`LEVELS` order -> scores in [0, 1]."""
    z = np.asarray(level_logits, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ WEIGHTS


def pad_to_square(image: np.ndarray, colour: tuple[int, int, int] = PAD_COLOUR) -> np.ndarray:
    """uint8 (H, W, 3) centred on a square canvas of ``colour`` (Q-Align's ``expand2square``)."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(colour, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image[..., :3]
    return out


def sample_1fps(num_frames: int, fps: float) -> list[int]:
    """Frame indices Q-Align's video loader takes: ``int(fps * i)`` for each whole second of the clip. A clip
    shorter than one second gives its first frame (Q-Align's loader would give none)."""
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"need frames and a positive fps, got {num_frames} frames at {fps}")
    seconds = int(num_frames / fps)
    return [int(fps * i) for i in range(seconds)] or [0]


def from_five_point(score: np.ndarray | float) -> np.ndarray | float:
    """Q-Align's own 1-5 score (softmax weighted [5, 4, 3, 2, 1], what ``model.score`` returns) on the [0, 1]
    scale of :func:`score_from_logits` and of the paper's table: ``(s - 1) / 4``."""
    return (np.asarray(score, np.float64) - 1.0) / 4.0


# Playback frame rate of each backbone's videos (what its reference pipeline saves them at), for 1-fps sampling.
PLAYBACK_FPS = {"cogvideox": 8, "opensora": 24, "dynamicrafter": 8}


def playback_fps(backbone: str) -> int:
    """The playback fps of a backbone's videos by its registry name (8 when unknown)."""
    return next((v for k, v in PLAYBACK_FPS.items() if backbone.startswith(k)), 8)
