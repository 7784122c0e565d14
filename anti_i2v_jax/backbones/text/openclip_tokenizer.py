"""OpenCLIP's tokenizer without network: the CLIP BPE from a local folder (``vocab.json`` + ``merges.txt``,
e.g. saved with ``transformers.CLIPTokenizer.save_pretrained``), padded to 77 with 0 as open_clip does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anti_i2v_jax.errors import UserError


class OpenCLIPTokenizer:
    def __init__(self, folder: str | Path, length: int = 77):
        try:
            from transformers import CLIPTokenizer

            self._tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad folder
            raise UserError(f"cannot load the CLIP tokenizer from {folder}: {e}") from None
        self.length = length

    def __call__(self, text: str) -> np.ndarray:
        ids = self._tok(text, truncation=True, max_length=self.length)["input_ids"]  # [SOT, ..., EOT]
        return np.asarray(ids + [0] * (self.length - len(ids)), np.int32)
