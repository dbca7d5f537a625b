"""Generate small CLIP-format BPE tokenizers (vocab.json + merges.txt) without any download.

The real SDXL tokenizers come with the user's SDXL folder. The demo bundle
needs tokenizers in the same on-disk format that transformers' `CLIPTokenizer`
loads: byte-level symbols (GPT-2's byte-to-unicode table), each also with the
end-of-word marker `</w>`, then one symbol per learned merge, then
`<|startoftext|>` and `<|endoftext|>` (the order of OpenAI's CLIP vocabulary).
Merges are learned here by plain BPE over a small built-in word list, so
common prompt words become single tokens and the token counts stay realistic.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

CORPUS = (
    "a an the and of in on at with his her their man woman girl boy person people two one "
    "walking sitting standing running reading smiling looking holding playing wearing "
    "park street city beach forest mountain room cafe office garden library river snow rain "
    "photo portrait cinematic lighting detailed high quality story book illustration style "
    "suit dress shirt jacket coat hat red blue green white black pink yellow golden "
    "sunset morning night evening sky tree flower dog cat car train bridge window table "
    "blurry lowres bad anatomy worst quality watermark text deformed ugly"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken lexicographically)."""
    seqs = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for seq, c in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new: Counter = Counter()
        for seq, c in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new[tuple(out)] += c
        seqs = new
    return merges


def write_clip_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>", num_merges: int = 400) -> int:
    """Write vocab.json, merges.txt and the tokenizer configs; return the vocabulary size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(CORPUS, num_merges)
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), pad_token=pad_token,
                        model_max_length=77)
    tok.save_pretrained(str(out_dir))
    return len(vocab)
