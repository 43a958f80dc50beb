"""The tiny backbone's CLIP tokenizer, written from a local vocabulary (nothing is downloaded).

Same format as OpenAI CLIP's byte-level BPE (`vocab.json` + `merges.txt`): the 256 byte symbols,
the same with `</w>` (end of word), then one token per merge, then `<|startoftext|>` and
`<|endoftext|>`. Every byte has a token, so any text tokenizes (unknown words fall back to
pieces); the words of `WORDS` (the synthetic world's, `refseg.core.synthetic.VOCABULARY`) are
whole tokens.

The merges come from BPE training on the word list itself (most frequent pair first, ties broken
alphabetically), which guarantees each listed word encodes to a single token. A naive per-word
chain of merges does not: one word's inner pair ("c l" in "circle") can be merged first because
another word starts with it ("close").
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# The whole-word tokens, frozen as written: the vocabulary's size and every token id follow from
# this list, and they decide the tiny backbones' text-encoder weights, so every tiny cache's
# fingerprint. It is the word list the tiny weights were made with, not read from the synthetic
# world: a word the world adds still tokenizes (in pieces), and tests/test_synthetic.py fails until
# it is added here on purpose (which makes new tiny weights).
WORDS = (
    "a", "above", "and", "at", "below", "big", "blue", "bottom", "circle", "diamond", "green", "in", "left",
    "middle", "next", "of", "on", "one", "orange", "purple", "red", "right", "shape", "small", "square", "star",
    "the", "to", "top", "triangle", "yellow",
)


@lru_cache(maxsize=1)
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


def _symbols(word: str) -> tuple[str, ...]:
    """A word as CLIP's BPE sees it: byte symbols, the last one carrying `</w>`."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.lower().encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def train_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every word of `words` into one token (deterministic)."""
    pieces = {w: _symbols(w) for w in sorted(set(w.lower() for w in words if w))}
    merges = []
    while True:
        pairs = Counter(p for syms in pieces.values() for p in zip(syms, syms[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in pieces.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            pieces[w] = tuple(out)


def build_vocab(words=None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, merges) in CLIP's layout; `words` defaults to `WORDS`."""
    merges = train_merges(WORDS if words is None else words)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:  # two merges can spell the same token ("ab c", "a bc"): keep the first id
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer(words=None, model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` over the local vocabulary (built in memory)."""
    # deferred: transformers is heavy and the family registry imports this module
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
