"""Golden token ids of OpenCLIP's tokenizer (DynamiCrafter's text conditioning), computed by open_clip itself.

Runs in a Python environment with open_clip_torch 2.22 (and so ftfy and regex), NOT the project venv:

    python tools/golden/openclip_tokenize.py            # writes tests/golden/tokenizers/openclip.json
    python tools/golden/openclip_tokenize.py --check    # recomputes and compares with the stored file

(Not named tokenizers.py: as a script's own folder comes first on sys.path, that would shadow the ``tokenizers``
package that open_clip's imports of transformers need.)

Each case is a prompt and ``open_clip.tokenize(prompt)[0]`` (77 ids: start, BPE, end, zero padding; past 77
the first 76 are kept and the end token is put last). The vocabulary is the ``bpe_simple_vocab_16e6.txt.gz``
that the installed open_clip ships; its sha256 is recorded, and the test checks that the copy in
tests/data/openclip/ is the same file. The prompts probe the cleaning (ftfy's fixes, HTML entities, whitespace,
case), the pre-tokenization (contractions, letters, numbers, punctuation, special-token strings), byte-level
BPE on non-Latin scripts and emoji, and truncation at the 77-token boundary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "golden" / "tokenizers" / "openclip.json"

PROMPTS = [
    "a cat sitting on a red sofa",
    "A DOG Running In The PARK, Slow Motion",
    "",
    "   ",
    "  extra   spaces\t\tand\n\nnew lines\r\nwindows  ",
    "Hello, world!!! What's up? It's 5 o'clock; isn't it... (yes) [no] {maybe}",
    "we'll they're I've you'd I'm can't WE'LL THEY'RE 'S 'reason ''s !'s",
    '"quoted" #hashtag @user $100 50% a&b x_y C++ C# F# -- ~tilde~ `code`',
    "http://example.com/path?x=1&y=2#frag",
    "1234567890 3.14159 1,000,000 2nd 21st 007",
    "café naïve résumé über Straße façade Ångström",
    "e\u0301 decomposed, cafe\u0301 too",
    "日本語のテキスト 東京タワー 一二三",
    "Ελληνικά русский текст العربية עברית",
    "안녕하세요 สวัสดี नमस्ते",
    "🐱🚀 fire 🔥 family 👨‍👩‍👧 flag 🇫🇷",
    "x² + y³ = z½ Ⅻ ①",
    "\ufb01ne \ufb02ower \ufb00 o\ufb03ce \u01c5ungla \u0133",
    "ＡＢＣ１２３　ｆｕｌｌｗｉｄｔｈ！",
    "\u201csmart\u201d \u2018quotes\u2019 it\u2019s \u02bcx",
    "Tom &amp; Jerry &lt;3 &quot;hi&quot; &amp;amp; &eacute;t&eacute; &#233; &#x41;",
    "<b>bold</b> &amp; keep",
    "\x93c1 quotes\x94 \x85 \x80",
    "zero\u200bwidth non\u00a0breaking\u3000ideographic\u2028sep",
    "bell\x07 esc\x1b[31mred\x1b[0m del\x7f bom\ufeff",
    "hello<end_of_text>world <start_of_text> <|endoftext|> !<end_of_text>",
    "thisisaverylongwordwithoutanyspacesatallreallyverylong",
    "a" * 200,
    "cat " * 74,  # 74 BPE tokens: 76 with start and end, one pad
    "cat " * 75,  # 75: exactly 77, no padding
    "cat " * 76,  # 76: one too many, the last is dropped and the end token kept
    "A photo of an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation, "
    "cinematic lighting, volumetric fog, octane render, by Greg Rutkowski and Alphonse Mucha, "
    "ultra-realistic, sharp focus, depth of field, golden hour, dramatic clouds, a long prompt that "
    "goes well past the seventy-seven token context of CLIP so that it must be truncated",
]


def compute() -> dict:
    sys.path.insert(0, str(REPO / "tools" / "upstream"))
    import stubs  # torchvision's CUDA-linked fake ops may not register on a CPU torch; open_clip imports it

    stubs.install()
    from importlib.metadata import version

    import open_clip
    from open_clip import tokenizer as oc_tokenizer

    vocab = Path(oc_tokenizer.default_bpe())
    cases = []
    for prompt in PROMPTS:
        ids = open_clip.tokenize(prompt)[0].tolist()
        n = len(oc_tokenizer._tokenizer.encode(prompt))
        cases.append({"prompt": prompt, "bpe_tokens": n, "ids": ids})
    return {
        "upstream": f"open_clip_torch {version('open_clip_torch')} (open_clip.tokenize), ftfy {version('ftfy')}",
        "vocab": vocab.name,
        "vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
        "context_length": 77,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args(argv)
    data = compute()
    if args.check:
        stored = json.loads(OUT.read_text(encoding="utf-8"))
        same = stored["vocab_sha256"] == data["vocab_sha256"] and stored["cases"] == data["cases"]
        print("same" if same else "DIFFERENT")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, ensure_ascii=True, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}: {len(data['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
