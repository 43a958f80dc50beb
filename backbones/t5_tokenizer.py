"""The tiny transformer backbones' T5 tokenizer, built in code (no sentencepiece model, no download).

T5's tokenizer is a sentencepiece Unigram model. This one is a `tokenizers` Unigram with T5's
layout and pipeline, as `transformers.T5Tokenizer` builds it from a vocabulary: ids 0, 1, 2 are
`<pad>`, `</s>`, `<unk>`; no normalizer (T5 is case-sensitive); whitespace split then Metaspace
("▁" marks a word start); `</s>` appended to every sequence. Because the pipeline is T5's own, the
tokenizer saves and reloads (`save_pretrained` / `from_pretrained`) to the same ids.

The vocabulary: every word of `refseg.backbones.tokenizer_vocab.WORDS` as one piece ("▁red"), plus
single characters with and without "▁", so any text tokenizes (unknown words fall back to
characters, whose pieces score lower than whole words; a character outside the list is `<unk>`).
"""

from __future__ import annotations

import string

from refseg.backbones.tokenizer_vocab import WORDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:'\"!?-()/&"


def unigram_vocab(words=None) -> list[tuple[str, float]]:
    """(piece, log-probability) in id order; whole words outscore any spelling in characters."""
    words = WORDS if words is None else words
    pieces = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(set(words))]
    pieces += [("▁" + c, -4.0) for c in CHARACTERS]
    pieces += [(c, -5.0) for c in CHARACTERS]
    return pieces


def build_t5_tokenizer(words=None, model_max_length: int = 512):
    """A `transformers` T5 tokenizer (fast) over the local vocabulary, built in memory."""
    # deferred: heavy, and the family registry imports this module
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(unigram_vocab(words), unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS], special_tokens=[(EOS, 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                           extra_ids=0, additional_special_tokens=[], model_max_length=model_max_length)
