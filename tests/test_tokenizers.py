"""Tokenizers on real vocabularies.

OpenCLIP (DynamiCrafter's text conditioning): the project's BPE, built from the merges file the open_clip_torch
wheel ships (a copy in tests/data/openclip/), gives the ids ``open_clip.tokenize`` gave on tricky prompts
(tests/golden/tokenizers/openclip.json, written by tools/golden/openclip_tokenize.py).

T5 (CogVideoX, Open-Sora): a tiny SentencePiece model is trained here, saved as a tokenizer folder laid out as
CogVideoX's and DeepFloyd's (``spiece.model`` + config, no ``tokenizer.json``), and read through
``converted_text_encoder``; its ids and mask must be SentencePiece's own ids, truncated, EOS appended, padded.
"""

import gzip
import hashlib
import io
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anti_i2v_jax import UserError
from anti_i2v_jax.backbones.text import t5 as t5_lib
from anti_i2v_jax.backbones.text.openclip_tokenizer import (
    VOCAB_NAME,
    OpenCLIPTokenizer,
    clean,
)

TESTS = Path(__file__).resolve().parent
VOCAB_DIR = TESTS / "data" / "openclip"
GOLDEN = json.loads((TESTS / "golden" / "tokenizers" / "openclip.json").read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def clip_tok():
    return OpenCLIPTokenizer(VOCAB_DIR)  # the folder holding open_clip's bpe_simple_vocab_16e6.txt.gz


# ------------------------------------------------------------------------------------------------ OpenCLIP


def test_vocab_copy_is_the_one_open_clip_ships(clip_tok):
    assert hashlib.sha256((VOCAB_DIR / VOCAB_NAME).read_bytes()).hexdigest() == GOLDEN["vocab_sha256"]
    assert clip_tok.vocab_size == 49408 and (clip_tok.sot_id, clip_tok.eot_id) == (SOT, EOT)


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{ascii(c['prompt'][:24])}" for i, c in enumerate(CASES)])
def test_openclip_ids_equal_open_clip_tokenize(clip_tok, case):
    ids = clip_tok(case["prompt"])
    assert ids.dtype == np.int32 and ids.shape == (77,)
    assert ids.tolist() == case["ids"]


def test_golden_covers_padding_and_truncation():
    n = {c["bpe_tokens"] for c in CASES}
    assert {0, 74, 75, 76} <= n and max(n) > 76  # empty, one pad, exactly full, one over, far over
    full = [c for c in CASES if c["bpe_tokens"] > 75]
    assert full and all(c["ids"][-1] == EOT and 0 not in c["ids"] for c in full)


def test_shorter_context_truncates_keeping_the_end_token():
    tok = OpenCLIPTokenizer(VOCAB_DIR / VOCAB_NAME, length=16)
    for case in CASES:
        ids, ref = tok(case["prompt"]).tolist(), case["ids"]
        if case["bpe_tokens"] >= 15:  # open_clip.tokenize(p, 16): the first 15 of [SOT, bpe...], then EOT
            assert ids == ref[:15] + [EOT]
        else:
            assert ids == ref[:16]


def test_uncompressed_merges_file(tmp_path, clip_tok):
    plain = tmp_path / "bpe_simple_vocab_16e6.txt"
    plain.write_bytes(gzip.decompress((VOCAB_DIR / VOCAB_NAME).read_bytes()))
    tok = OpenCLIPTokenizer(plain)
    assert tok.encoder == clip_tok.encoder and tok.ranks == clip_tok.ranks


def test_vocab_json_folder_gives_the_same_ids(tmp_path, clip_tok):
    """The transformers CLIP layout (vocab.json with <|startoftext|>/<|endoftext|>, merges.txt), converted from
    open_clip's file, tokenizes as open_clip; transformers' CLIPTokenizer reads the same folder to the same ids on
    prompts its own cleaning leaves alone (it lacks ftfy's fixes and HTML unescaping)."""
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (tmp_path / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in clip_tok.encoder.items()}))
    merges = sorted(clip_tok.ranks, key=clip_tok.ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = OpenCLIPTokenizer(tmp_path)
    for case in CASES:
        assert tok(case["prompt"]).tolist() == case["ids"], case["prompt"]

    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for case in CASES[:2] + CASES[9:11] + CASES[-1:]:
        ids = hf(case["prompt"], truncation=True, max_length=77)["input_ids"]
        assert ids + [0] * (77 - len(ids)) == case["ids"], case["prompt"]


def test_cleaning():
    assert clean("  A\u00a0b\t\nc  ") == "A b c"
    assert clean("it\u2019s \ufb01ne &amp;amp; \uff21") == "it's fine & A"
    assert clean("<b>&amp;amp;</b>") == "<b>&</b>"  # HTML: ftfy keeps entities, open_clip unescapes twice


def test_openclip_bad_sources(tmp_path):
    with pytest.raises(UserError, match=VOCAB_NAME):
        OpenCLIPTokenizer(tmp_path)  # an empty folder
    (tmp_path / "junk.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read"):
        OpenCLIPTokenizer(tmp_path / "junk.txt.gz")
    (tmp_path / "short.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(UserError, match="merges"):
        OpenCLIPTokenizer(tmp_path / "short.txt")
    with pytest.raises(UserError, match="context length"):
        OpenCLIPTokenizer(VOCAB_DIR, length=1)


# ------------------------------------------------------------------------------------------------ T5

T5_WORDS = ("a cat dog sitting on red blue green sofa in the sun quick brown fox jumps over lazy video of waves "
            "crashing beach at sunset camera pans slowly across mountain river forest city night lights people "
            "walking street rain").split()
T5_PROMPTS = [
    "a cat sitting on a red sofa",
    "A Cat SITTING On The Sofa",
    "",
    "   ",
    "  extra   spaces\t\tand\n\nnew lines  ",
    "Numbers 123, 4.5! (ok) \"q\" 'x'",
    "caf\u00e9 na\u00efve \u03a9mega \u65e5\u672c \U0001f431 zzqqxx",  # characters outside the tiny vocabulary
    "\uff21\uff22\uff23\uff11\uff12\uff13 \ufb01ne x\u00b2 \u00bd",  # NFKC in SentencePiece's normaliser
    "\u00a0nbsp\u3000ideographic",
    "the quick brown fox jumps over the lazy dog " * 6,  # longer than max_length: truncated, EOS kept
]
T5_EXTRA_IDS = 100


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A converted-weights folder whose tokenizer/ is laid out as CogVideoX's: spiece.model + configs."""
    import sentencepiece as spm

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(T5_WORDS) for _ in range(12)) for _ in range(300)]
    corpus.append("Numbers 0123456789, punctuation!?.;:'\"()- caf\u00e9")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # T5's settings: unigram, nmt_nfkc, pad 0, EOS 1, UNK 2, no BOS
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=100, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    root = tmp_path_factory.mktemp("t5")
    tok = root / "tokenizer"
    tok.mkdir()
    (tok / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    (tok / "special_tokens_map.json").write_text(json.dumps(specials))
    (tok / "tokenizer_config.json").write_text(json.dumps({
        **specials, "extra_ids": T5_EXTRA_IDS, "legacy": True, "model_max_length": 226, "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    }))
    return root, spm.SentencePieceProcessor(model_proto=model.getvalue())


def _tiny_t5(vocab_size: int):
    cfg = t5_lib.T5Config(vocab_size=vocab_size, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2)
    params = t5_lib.T5EncoderModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return cfg, params


@pytest.fixture(scope="module")
def t5_encoder(t5_folder):
    root, sp = t5_folder
    cfg, params = _tiny_t5(256)
    assert sp.get_piece_size() + T5_EXTRA_IDS <= cfg.vocab_size
    return t5_lib.converted_text_encoder(root, cfg, params, 16, with_mask=True)


def _sp_reference(sp, pieces: list, max_length: int):
    """T5 on SentencePiece ids: each text chunk encoded on its own (transformers' legacy handling around special
    tokens), cut to max_length - 1, EOS, zero padding; mask over the real tokens."""
    ids = [p if isinstance(p, int) else i for p in pieces for i in ([p] if isinstance(p, int) else sp.encode(p))]
    ids = ids[: max_length - 1] + [1]
    n = len(ids)
    return np.asarray(ids + [0] * (max_length - n)), np.asarray([1] * n + [0] * (max_length - n))


@pytest.mark.parametrize("max_length", [16, 40])
def test_t5_tokens_equal_sentencepiece(t5_folder, t5_encoder, max_length):
    _, sp = t5_folder
    enc = t5_lib.T5TextEncoder(t5_encoder.config, t5_encoder.params, t5_encoder.tokenizer, max_length, with_mask=True)
    for prompt in T5_PROMPTS:
        ids, mask = enc.tokens(prompt)
        ref_ids, ref_mask = _sp_reference(sp, [prompt], max_length)
        assert ids.dtype == np.int32 and ids.shape == mask.shape == (max_length,)
        np.testing.assert_array_equal(ids, ref_ids, err_msg=repr(prompt))
        np.testing.assert_array_equal(mask, ref_mask, err_msg=repr(prompt))
    long_ids, long_mask = enc.tokens(T5_PROMPTS[-1])
    assert long_mask.all() and long_ids[-1] == 1 and len(sp.encode(T5_PROMPTS[-1])) >= max_length


def test_t5_special_token_strings(t5_folder, t5_encoder):
    """``</s>`` and ``<extra_id_N>`` in a prompt are the special tokens (N counted down from the top), as the
    transformers T5 tokenizer the upstream pipelines call."""
    _, sp = t5_folder
    top = sp.get_piece_size() + T5_EXTRA_IDS - 1
    for prompt, pieces in (("a <extra_id_3> b", ["a ", top - 3, " b"]), ("</s> in text", [1, " in text"])):
        ids, mask = t5_encoder.tokens(prompt)
        ref_ids, ref_mask = _sp_reference(sp, pieces, 16)
        np.testing.assert_array_equal(ids, ref_ids, err_msg=prompt)
        np.testing.assert_array_equal(mask, ref_mask, err_msg=prompt)


def test_t5_encoder_masks_padding(t5_encoder):
    """With the mask (Open-Sora) the real tokens' embeddings do not depend on how much padding follows."""
    prompt = "a cat sitting on a red sofa"
    emb, mask = t5_encoder(prompt)
    longer = t5_lib.T5TextEncoder(t5_encoder.config, t5_encoder.params, t5_encoder.tokenizer, 24, with_mask=True)
    emb24, mask24 = longer(prompt)
    n = int(mask.sum())
    assert emb.shape == (16, 8) and mask.dtype == bool and mask24[:n].all() and not mask24[n:].any()
    np.testing.assert_allclose(emb[:n], emb24[:n], rtol=1e-5, atol=1e-6)


def test_t5_tokenizer_folder_errors(tmp_path, t5_folder, monkeypatch):
    cfg = t5_lib.T5Config(vocab_size=256, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    with pytest.raises(UserError, match="no tokenizer/ folder"):
        t5_lib.converted_text_encoder(tmp_path, cfg, None, 16, with_mask=False)
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text((t5_folder[0] / "tokenizer" / "tokenizer_config.json").read_text())
    with pytest.raises(UserError, match="spiece.model"):  # transformers alone would tokenize everything to <unk>
        t5_lib.converted_text_encoder(tmp_path, cfg, None, 16, with_mask=False)
    (tok / "spiece.model").write_bytes((t5_folder[0] / "tokenizer" / "spiece.model").read_bytes())
    find_spec = t5_lib.importlib.util.find_spec
    monkeypatch.setattr(t5_lib.importlib.util, "find_spec", lambda n, *a: None if n == "sentencepiece" else find_spec(n, *a))
    with pytest.raises(UserError, match="pip install sentencepiece"):
        t5_lib.load_tokenizer(tok)
