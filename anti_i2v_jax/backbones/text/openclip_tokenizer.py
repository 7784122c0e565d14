"""OpenCLIP's text tokenizer (``open_clip.tokenize``, DynamiCrafter's text conditioning), network-free and without
open_clip, ftfy or regex.

A byte-level BPE whose vocabulary is built from the merges file that open_clip ships
(``bpe_simple_vocab_16e6.txt.gz``: a header line, then one ``a b`` merge per line, of which the first
49152 - 256 - 2 are used), or read from a ``vocab.json`` + ``merges.txt`` folder (the layout of
``transformers.CLIPTokenizer.save_pretrained``). Ids: the 256 byte symbols, the same with ``</w>`` (end of
word), one per merge in rank order, then ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407).

Text goes through the cleaning open_clip applies before BPE: ftfy's fixes, HTML unescaping (twice), runs
of whitespace to one space, strip, lower case. Of ftfy, :func:`clean` applies the fixes that matter for prompts
(HTML entities, C1 controls read as Windows-1252, Latin ligatures, full-width forms, curly quotes, terminal
escapes, control characters, NFC) but not its mojibake repair: text that is already garbled by a wrong
decoding (``"cafÃ©"``) is tokenized as it stands, where open_clip would first repair it. Letters and numbers
are Unicode categories L* and N* as this Python knows them (open_clip's ``regex`` may know newer characters).
"""

from __future__ import annotations

import gzip
import html
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from anti_i2v_jax.errors import UserError

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"  # as shipped in the open_clip_torch wheel
N_MERGES = 49152 - 256 - 2
START, END = "<start_of_text>", "<end_of_text>"
CONTEXT_LENGTH = 77


def byte_symbols() -> dict[int, str]:
    """Byte -> the printable character that stands for it, in vocabulary order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68
    (controls, space, soft hyphen, ...) take U+0100 onwards in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return {b: chr(b) for b in printable} | {b: chr(0x100 + i) for i, b in enumerate(others)}


# --- cleaning ---------------------------------------------------------------------------------------------

_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;]*[a-zA-Z]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}


def _build_fixes() -> dict[int, str | None]:
    """One ``str.translate`` table for ftfy's per-character fixes (:func:`clean` repeats to a fixed point, as ftfy)."""
    table: dict[int, str | None] = {}
    for b in range(0x80, 0xA0):  # C1 controls are almost always Windows-1252 bytes read as Latin-1
        try:
            table[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d: undefined there, left alone
            pass
    table.update({ord(k): v for k, v in _LIGATURES.items()})
    table[0x3000] = " "  # full-width (ideographic) space
    for c in range(0xFF01, 0xFFF0):  # full-width and half-width forms
        if (alt := unicodedata.normalize("NFKC", chr(c))) != chr(c):
            table[c] = alt
    table.update({c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)})  # curly quotes
    table.update({c: '"' for c in range(0x201C, 0x2020)})
    return table


_FIXES = _build_fixes()
# control and format characters nobody means to type (after terminal escapes, which start with ESC, are gone)
_CONTROLS = dict.fromkeys((*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                           *range(0xFFF9, 0xFFFD)))


def _unescape_entity(m: re.Match) -> str:
    out = html.unescape(m.group(0))
    return m.group(0) if ";" in out else out  # only whole ``&name;`` / ``&#n;`` references


def clean(text: str) -> str:
    """open_clip's cleaning: ftfy-like fixes, HTML unescaped twice, whitespace runs to one space, stripped."""
    unescape = "<" not in text  # a literal '<' means HTML: ftfy then keeps entities as they are
    while True:
        before = text
        if unescape:
            text = _ENTITY.sub(_unescape_entity, text)
        text = _SURROGATE.sub("\ufffd", text.translate(_FIXES))  # C1 controls, ligatures, widths, quotes
        text = _TERMINAL_ESCAPE.sub("", text).translate(_CONTROLS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            break
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())


# --- pre-tokenization -------------------------------------------------------------------------------------

_HEADS = (START, END, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # tried in this order, before the classes


def _kind(c: str) -> str:
    if c.isspace():
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def pieces(text: str) -> list[str]:
    """Split cleaned, lower-cased text as open_clip's pattern does, trying at each position in turn: a special
    token's name (``<start_of_text>``, ``<end_of_text>``), a contraction (``'s``, ``'t``, ``'re``, ``'ve``, ``'m``,
    ``'ll``, ``'d``), a run of letters, one number character, a run of anything else but whitespace. Whitespace
    separates pieces and is dropped."""
    out, i, n = [], 0, len(text)
    while i < n:
        head = next((s for s in _HEADS if text.startswith(s, i)), None)
        kind = _kind(text[i])
        if head is not None:
            j = i + len(head)
        elif kind == " ":
            i += 1
            continue
        elif kind == "N":
            j = i + 1
        else:
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        out.append(text[i:j])
        i = j
    return out


# --- the tokenizer ----------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8").split("\n")


class OpenCLIPTokenizer:
    """``tokenizer(text) -> (length,) int32``: ``[SOT, bpe..., EOT, 0, ...]`` exactly as ``open_clip.tokenize``
    (past ``length`` tokens it keeps the first ``length - 1`` and puts EOT last).

    ``source``: open_clip's merges file (``bpe_simple_vocab_16e6.txt.gz``, gzipped or not), a folder holding it,
    or a folder with ``vocab.json`` + ``merges.txt`` (the CLIP layout of transformers).
    """

    def __init__(self, source: str | Path, length: int = CONTEXT_LENGTH):
        if length < 2:
            raise UserError(f"context length {length}: room is needed for the start and end tokens")
        self.length = length
        source = Path(source).expanduser()
        try:
            if source.is_dir() and (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
                self._from_vocab_json(source)
            elif source.is_dir() and (source / VOCAB_NAME).is_file():
                self._from_merges_file(source / VOCAB_NAME)
            elif source.is_file():
                self._from_merges_file(source)
            else:
                raise UserError(
                    f"{source}: neither open_clip's {VOCAB_NAME} (it ships in the open_clip_torch package folder) "
                    "nor a folder with it or with vocab.json + merges.txt"
                )
        except (OSError, ValueError, KeyError, EOFError) as e:  # unreadable, not gzip, not JSON, bad lines
            raise UserError(f"cannot read the CLIP BPE vocabulary from {source}: {e}") from None
        # open_clip reads these two strings in a prompt as the tokens themselves, whatever the vocabulary names them
        self._cache: dict[str, tuple[int, ...]] = {START: (self.sot_id,), END: (self.eot_id,)}
        self._bytes = byte_symbols()

    def _from_merges_file(self, path: Path) -> None:
        lines = _read_lines(path)[1 : N_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"expected {N_MERGES} merges of two symbols after the header line")
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[START], self.encoder[END]

    def _from_vocab_json(self, folder: Path) -> None:
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = [line for line in _read_lines(folder / "merges.txt") if line and not line.startswith("#version")]
        self.ranks = {tuple(line.split()): r for r, line in enumerate(lines)}
        for sot, eot in ((START, END), ("<|startoftext|>", "<|endoftext|>")):
            if sot in self.encoder and eot in self.encoder:
                self.sot_id, self.eot_id = self.encoder[sot], self.encoder[eot]
                return
        raise ValueError("vocab.json has neither <start_of_text>/<end_of_text> nor <|startoftext|>/<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece: merge the lowest-ranked adjacent pair, everywhere, until none is left."""
        if (hit := self._cache.get(piece)) is not None:
            return hit
        word = [self._bytes[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            rank, pair = min(((self.ranks.get(p, len(self.ranks)), p) for p in zip(word, word[1:])))
            if rank == len(self.ranks):
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = tuple(self.encoder[s] for s in word)
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after open_clip's cleaning, without start/end tokens or padding."""
        return [i for p in pieces(clean(text).lower()) for i in self._bpe(p)]

    def __call__(self, text: str) -> np.ndarray:
        ids = [self.sot_id, *self.encode(text)][: self.length - 1] + [self.eot_id]
        return np.asarray(ids + [0] * (self.length - len(ids)), np.int32)
