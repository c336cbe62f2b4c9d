#!/usr/bin/env python3
"""Reference token ids for msfp's CLIP tokenizer (src/models/clip/tokenizer.rs).

Stable Diffusion v1.x tokenizes prompts with transformers' `CLIPTokenizer` loaded from
openai/clip-vit-large-patch14, called as
`tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids`.
That repository's `vocab.json` / `merges.txt` are OpenAI's `bpe_simple_vocab_16e6.txt.gz`
rewritten: merges lines [1 : 48895] of the gz file (line 0 is a header) become `merges.txt`,
and the vocabulary is the 256 byte symbols, the same 256 with `</w>`, the 48,894 merged
strings, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407). The hub is not reachable
here, so this script derives those two files from the gz file, adds SD1.x's
`tokenizer_config.json` settings (special tokens `normalized`), loads the folder with
`CLIPTokenizer.from_pretrained(<that folder>)`, checks OpenAI's well-known example
("Hi there" -> [49406, 1883, 997, 49407]) and writes, for every prompt in PROMPTS,

    tests/fixtures/clip_tokenizer/reference_ids.json   [{"prompt": str, "ids": [77 ints]}, ...]

It also encodes each prompt with OpenAI's own tokenizer (`clip/simple_tokenizer.py` from the
`openai-clip` sdist, imported from its file so that torch is not needed) when `--openai-clip`
points at that package's folder, and prints the prompts on which the two disagree. The fixture
always follows transformers.

Usage (from the repository root; PyPI only, no hub):
    python3 -m venv /tmp/clipref
    /tmp/clipref/bin/pip install transformers==5.24.0 tokenizers==0.23.3 ftfy==6.3.1 regex==2026.11.19
    /tmp/clipref/bin/pip download --no-deps openai-clip==1.0.1 -d /tmp/clipsrc
    tar xzf /tmp/clipsrc/openai-clip-1.0.1.tar.gz -C /tmp/clipsrc
    HF_HUB_OFFLINE=1 /tmp/clipref/bin/python tools/gen_tokenizer_fixture.py \
        --bpe assets/clip/bpe_simple_vocab_16e6.txt.gz --openai-clip /tmp/clipsrc/openai-clip-1.0.1/clip

(The sdist's clip/bpe_simple_vocab_16e6.txt.gz is the same file as the committed asset; the
script refuses any other.) The output is deterministic: rerunning it reproduces the fixture.
"""

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MAX_LEN = 77
N_MERGES = 49408 - 512 - 2  # 48,894

LONG_SCENE = (
    "A highly detailed matte painting of a sprawling cyberpunk city at night, neon signs "
    "reflecting on wet streets, flying cars weaving between towering skyscrapers, crowds of "
    "people with umbrellas, steam rising from vents, holographic advertisements in Japanese and "
    "English, volumetric fog, cinematic lighting, octane render, unreal engine 5, 8k resolution, "
    "trending on artstation, by Syd Mead and Simon Stalenhag, masterpiece, best quality"
)

# Prompts covering what the Rust side must reproduce: plain English, SD prompt idioms,
# punctuation runs, digits (each digit is its own pre-token), contractions, casing,
# whitespace runs, unicode (accents, NFD input, CJK, Hangul, Indic, emoji and ZWJ sequences,
# curly quotes, full-width forms, ligatures), the special-token strings, and prompts longer
# than 77 tokens (truncated: BOS, the first 75 tokens, EOS).
PROMPTS = [
    "Hi there",
    "a photo of a cat",
    "",
    "A photograph of an astronaut riding a horse",
    "a painting of a fox sitting in a field at sunrise in the style of Claude Monet",
    "the quick brown fox jumps over the lazy dog",
    "1girl, solo, long hair, looking at viewer, smile, blue eyes",
    "3.14",
    "2024",
    "pi is 3.14159265358979",
    "in 1999 there were 1,000,000 people",
    "$100, 50% off!!!",
    "3D render, 4K, 16:9, f/1.8, 85mm",
    "v1.5 sd-v1-4.ckpt",
    "don't",
    "it's",
    "don't stop, it's a dog's life",
    "I'M HAPPY, YOU'RE SAD, WE'VE WON, THEY'LL GO, HE'D GO",
    "O'Neil's rock'n'roll 'tis",
    "'s 't 're 've 'm 'll 'd",
    "ALL CAPS PROMPT",
    "mixed CaSe WoRdS",
    "Hello,   world!\n\nNew\tline",
    "   leading and trailing   ",
    "\n\t\r\n  ",
    "tab\tseparated\tvalues\r\nand windows newlines",
    "non-breaking\u00a0space and ideographic\u3000space",
    "zero\u200bwidth space",
    "next\u0085line, line\u2028separator, mongolian\u180evowel, narrow\u202fnbsp",
    "control\x07char\x00nul",
    "masterpiece, best quality, (ultra-detailed:1.2), [[flowers]], {cat}, <lora:foo:0.8>",
    "8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
    "!!!???... --- ___ *** ~~~",
    "A-B_C/D\\E|F",
    "C++ and C# and F#",
    "#hashtag @mention",
    "email me at foo.bar@example.com",
    "https://example.com/path?query=1&x=2",
    "&amp; &lt;tag&gt; &quot;",
    "<|startoftext|> literally <|endoftext|>",
    "a<|endoftext|>b",
    "<|ENDOFTEXT|> upper-case special",
    "<|StartOfText|> mixed-case bos",
    "x<|ENDOFTEXT|><|startoftext|>y",
    "<|ENDOFTEXT|>> and !<|ENDOFTEXT|>",
    "<|startoftext|><|endoftext|>",
    "<start_of_text> and <end_of_text>",
    "café résumé naïve",
    "cafe\u0301 (decomposed e + combining acute)",
    "\u00c5ngstr\u00f6m \u212b \u2126",
    "x\u0301 q\u0307",
    "\u00dcn\u00efc\u00f6d\u00e9 \u00c0\u00c9\u00ce\u00d5\u00dc",
    "Straße GROSSE",
    "İstanbul",
    "ΟΔΟΣ Σίσυφος ΣΑΣ",
    "Москва, КРАСНАЯ площадь",
    "東京の夜景, 桜",
    "猫が好き",
    "一只可爱的猫在草地上",
    "한국어 프롬프트",
    "नमस्ते दुनिया",
    "สวัสดี",
    "مرحبا بالعالم",
    "٣ arabic-indic digits ١٢٣",
    "Ⅻ roman numeral ½ ² ³",
    "emoji 🐱🐶 🚀✨",
    "family 👨‍👩‍👧 and flags 🇯🇵",
    "thumbs 👍🏽",
    "“quoted” ‘single’",
    "don’t",
    "em—dash – en dash … ellipsis",
    "ﬁne ligature",
    "full-width ＡＢＣ１２３",
    "mojibake: Ã©",
    "supercalifragilisticexpialidocious",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "a painting by Greg Rutkowski, trending on artstation",
    "a " * 74,
    "a " * 75,
    "a " * 76,
    "a " * 100,
    LONG_SCENE,
    LONG_SCENE + ", " + LONG_SCENE,
    "🐱" * 40,
    "1234567890" * 10,
]


def sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def bytes_to_unicode():
    """The byte -> printable character table of GPT-2 / CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def added_token(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


# The settings of SD1.x's tokenizer/tokenizer_config.json. What matters: the special tokens are
# `normalized`, i.e. matched in the NFC-lowercased text. transformers 5.24 keeps that for BOS but
# re-adds EOS (also the pad token, given as a plain string) as not normalized: "<|StartOfText|>"
# is BOS, "<|ENDOFTEXT|>" is not EOS (transformers 4.x and OpenAI make it EOS).
SD_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": added_token("<|startoftext|>"),
    "do_lower_case": True,
    "eos_token": added_token("<|endoftext|>"),
    "errors": "replace",
    "model_max_length": MAX_LEN,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": added_token("<|endoftext|>"),
}


def write_hf_files(bpe_path, folder):
    """Writes SD1.x's tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) to `folder`."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    folder = pathlib.Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(SD_TOKENIZER_CONFIG, indent=2))
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def load_openai(clip_dir, bpe_path):
    """OpenAI's SimpleTokenizer, imported from its file (the package __init__ needs torch)."""
    spec = importlib.util.spec_from_file_location(
        "openai_simple_tokenizer", pathlib.Path(clip_dir) / "simple_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = module.SimpleTokenizer(str(bpe_path))
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]

    def encode(prompt):
        # OpenAI's clip.tokenize: [sot] + encode + [eot], truncated keeping eot last; we pad
        # with eot as SD does (OpenAI pads with 0) so the rows compare directly.
        ids = [sot] + tok.encode(prompt) + [eot]
        if len(ids) > MAX_LEN:
            ids = ids[: MAX_LEN - 1] + [eot]
        return ids + [eot] * (MAX_LEN - len(ids))

    return encode


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bpe", required=True, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--openai-clip", help="folder holding OpenAI's simple_tokenizer.py")
    parser.add_argument("--out", default=root / "tests/fixtures/clip_tokenizer/reference_ids.json")
    args = parser.parse_args()

    digest = sha256(args.bpe)
    if digest != BPE_SHA256:
        sys.exit(f"{args.bpe}: sha256 {digest}, expected {BPE_SHA256}")

    import transformers
    import tokenizers
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_hf_files(args.bpe, folder)
        hf = CLIPTokenizer.from_pretrained(folder)
    print(
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
        f"{type(hf).__module__}.{type(hf).__name__}",
        file=sys.stderr,
    )

    def hf_encode(prompt):
        return hf(prompt, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids

    hi = hf("Hi there").input_ids
    assert hi == [49406, 1883, 997, 49407], hi
    assert hf.bos_token_id == 49406 and hf.eos_token_id == 49407 and hf.pad_token_id == 49407

    openai = load_openai(args.openai_clip, args.bpe) if args.openai_clip else None
    if openai is not None:
        assert openai("Hi there")[:4] == [49406, 1883, 997, 49407]

    assert len(set(PROMPTS)) == len(PROMPTS), "duplicate prompt"
    rows, disagree = [], []
    for prompt in PROMPTS:
        ids = hf_encode(prompt)
        assert len(ids) == MAX_LEN and ids[0] == 49406 and ids[-1] == 49407, (prompt, ids)
        rows.append({"prompt": prompt, "ids": ids})
        if openai is not None and openai(prompt) != ids:
            disagree.append(prompt)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        f.write("\n]\n")
    print(f"wrote {len(rows)} prompts to {out}", file=sys.stderr)
    if openai is not None:
        print(f"OpenAI's SimpleTokenizer disagrees on {len(disagree)} prompts:", file=sys.stderr)
        for prompt in disagree:
            a, b = hf_encode(prompt), openai(prompt)
            print(f"  {prompt!r}\n    transformers {trim(a)}\n    openai       {trim(b)}", file=sys.stderr)


def trim(ids):
    """Drops the EOS padding for printing."""
    end = len(ids)
    while end > 1 and ids[end - 1] == 49407 and ids[end - 2] == 49407:
        end -= 1
    return ids[:end]


if __name__ == "__main__":
    main()
