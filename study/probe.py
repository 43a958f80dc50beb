"""The zero-shot attention probe: do a cache's cross-attention maps point at the referred object?

No training. For every noise level of the cache and every attention tensor of its spec (`attn_s16`,
`attn_s32`, ...: the `attn2` softmax maps (N, L, h, w), averaged over heads and over every layer at
that stride by the extraction), each sample gets one map: the mean of the token maps of its
sentence's **content tokens**. Two measures compare it with the ground-truth mask (`masks/gt`, S×S):

* **pointing accuracy**: the argmax of the map, upsampled bilinearly to S×S, lies inside the mask
  (ties go to the first pixel in row-major order, so a constant map points at the top-left corner);
  chance = the mean share of the image the mask covers (a uniformly random point);
* **best-threshold mIoU**: each map min-max normalised to [0, 1] (a constant map becomes all zeros),
  thresholded (>= thr) at one threshold shared by all samples, chosen from `THRESHOLDS` to maximise
  the mIoU. The threshold is chosen on the very samples it is scored on, so this is an upper bound
  of what a fixed threshold would give; `threshold=` fixes it instead. Chance = the mIoU of
  predicting the whole image, which is again the mean mask share (IoU(all, gt) = |gt| / S²).
  IoU of an empty prediction and an empty mask is 0, as `refseg.core.metrics` counts it.

**Content tokens** come from the cache's `text/input_ids` and `text/attention_mask` and the
backbone's tokenizer (only the tokenizer is loaded): not padding (attention_mask 0), not a special
token (BOS, EOS, PAD), and not part of a stop word (`STOP_WORDS`: articles, prepositions,
conjunctions and a few pronouns). Sub-tokens are grouped into words by CLIP's end-of-word marker
`</w>`; a word is a stop word when its text, lowercased, is in the list, and every sub-token of a
content word counts (its maps all enter the mean). A sentence with no content word falls back to
all its non-special tokens; one with no token at all is left out (and counted in `skipped`).

Per layer: the cache stores one map per stride (layers averaged at extraction, backbones/capture.py),
so the probe works per stride. Per-layer figures would need per-layer maps in the cache; not built.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from refseg.backbones.families.unet import tokenizer_sha256
from refseg.backbones.tokenizer_vocab import build_tokenizer
from refseg.cache.reader import Cache, open_cache
from refseg.core.errors import CacheError, ModelError, RefsegError

THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95
STOP_WORDS = frozenset("""
a an the this that these those of to at on in into onto by with from for and or but as is are be
next above below over under near behind beside between it its his her their there here
""".split())
BLOCK = 64  # samples read and scored at a time
COLUMNS = ("noise_t", "tensor", "stride", "pointing", "pointing_chance", "miou", "threshold", "miou_chance", "n",
           "skipped")


# ---- the tokenizer ------------------------------------------------------------------------------

CLIP_FAMILIES = (None, "sd", "sd2", "sdxl")  # their cached input_ids are CLIP tokens of `tokenizer/`


def load_tokenizer(backbone: dict):
    """The tokenizer of the backbone a cache records (its `backbone` settings); ModelError if it cannot
    be loaded. tiny, tiny-synth and the families' tiny models use the vocabulary in this package; a
    folder or hub id is read with transformers (local files only for a folder). Families whose cached
    tokens are not CLIP's (sd3, flux) are refused."""
    model, kind, family = str(backbone.get("model", "")), backbone.get("kind", ""), backbone.get("family")
    if family not in CLIP_FAMILIES:
        raise ModelError(f"the attention probe reads CLIP tokens (families sd, sd2, sdxl); the cache's backbone "
                         f"{model!r} is family {family!r}")
    if model == "tiny-synth" or kind in ("tiny", "tiny-synth") or model.startswith("tiny"):
        tokenizer = build_tokenizer()
    else:
        source = (backbone.get("model_config") if kind == "file" else model) or ""
        folder = Path(source) / "tokenizer" if source else None
        try:
            from transformers import CLIPTokenizer  # deferred: transformers is slow to import; tiny models skip it

            if folder is not None and folder.is_dir():
                tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            elif kind == "hub":
                tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            else:
                raise OSError(f"no tokenizer folder at {folder}" if folder else "the cache names no model")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the tokenizer of the cache's backbone {model or '(unnamed)'!r}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    recorded = backbone.get("tokenizer_sha256")
    if recorded:
        if tokenizer_sha256(tokenizer) != recorded:
            raise ModelError(f"the tokenizer found for {model!r} is not the one the cache was extracted with "
                             "(tokenizer_sha256 differs)")
    return tokenizer


def content_tokens(tokenizer, input_ids, attention_mask) -> np.ndarray:
    """bool (L,): the content tokens of one sentence (see the module's docs)."""
    ids = [int(i) for i in input_ids]
    keep = np.asarray(attention_mask, bool).copy()
    special = set(tokenizer.all_special_ids)
    real = np.array([k for k in range(len(ids)) if keep[k] and ids[k] not in special], int)
    content = np.zeros(len(ids), bool)
    if real.size == 0:
        return content
    pieces = tokenizer.convert_ids_to_tokens([ids[k] for k in real])
    word: list[int] = []
    text = ""
    for k, piece in zip(real, pieces):
        word.append(int(k))
        text += piece.replace("</w>", "")
        if piece.endswith("</w>") or k == real[-1]:
            if text.lower().strip(".,;:!?'\"") not in STOP_WORDS:
                content[word] = True
            word, text = [], ""
    if not content.any():
        content[real] = True
    return content


# ---- the measures -------------------------------------------------------------------------------

def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(maps.astype(np.float32))[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Min-max per sample to [0, 1]; a constant map becomes zeros."""
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    span = high - low
    out = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1), 0.0)
    return out.reshape(maps.shape)


class _Scores:
    """Per-sample sums for one (noise level, tensor): hits, mask shares, IoU at every threshold."""

    def __init__(self, thresholds):
        self.values = [float(t) for t in thresholds]
        self.thresholds = np.asarray(thresholds, np.float64)
        self.hits: list[bool] = []
        self.shares: list[float] = []
        self.ious: list[np.ndarray] = []  # (thresholds,) per block row

    def add(self, maps: np.ndarray, gt: np.ndarray) -> None:
        """maps (n, h, w) content-token means; gt (n, S, S) 0/1."""
        n, size = len(maps), gt.shape[-1]
        up = _upsample(maps, size)
        gt = gt.astype(bool)
        flat_gt = gt.reshape(n, -1)
        argmax = up.reshape(n, -1).argmax(1)
        self.hits += flat_gt[np.arange(n), argmax].tolist()
        self.shares += flat_gt.mean(1).tolist()
        norm = _normalise(up).reshape(n, -1)
        for row in range(n):
            pred = norm[row][None, :] >= self.thresholds[:, None]  # (T, S²)
            inter = (pred & flat_gt[row]).sum(1)
            union = (pred | flat_gt[row]).sum(1)
            self.ious.append(np.where(union > 0, inter / np.maximum(union, 1), 0.0))

    def result(self, fixed: float | None) -> dict:
        if not self.hits:
            return {"pointing": float("nan"), "pointing_chance": float("nan"), "miou": float("nan"),
                    "threshold": fixed, "miou_chance": float("nan")}
        miou = np.mean(np.stack(self.ious), axis=0)  # (T,)
        best = int(np.argmax(miou))  # the first of equal maxima: the lowest threshold
        share = float(np.mean(self.shares))
        return {"pointing": float(np.mean(self.hits)), "pointing_chance": share, "miou": float(miou[best]),
                "threshold": self.values[best], "miou_chance": share}


def probe_attention(cache, noise_ts=None, threshold: float | None = None, tokenizer=None) -> list[dict]:
    """Probe every attention tensor of `cache` (a path or an open `Cache`) at `noise_ts` (default: all
    of its noise levels). One dict per (noise_t, tensor) with the keys of `COLUMNS`; pointing, mIoU and
    their chances are fractions in [0, 1]. `threshold` fixes the mIoU threshold (default: the best of
    `THRESHOLDS`, an upper bound). CacheError when the cache has no attention tensors or lacks a level;
    ModelError when its tokenizer cannot be loaded."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if cache.extraction_record["extraction"].get("prompt", "sentence") != "sentence":
        prompt = cache.extraction_record["extraction"]["prompt"]
        raise CacheError(f"cache {cache.path} was extracted with --prompt {prompt}: "
                         "its attention maps follow no sentence, so there is nothing to probe")
    tensors = [t for t in cache.spec.tensors if t.kind == "attention"]
    if not tensors:
        raise CacheError(f"cache {cache.path} has no cross-attention tensors (it has "
                         f"{', '.join(cache.spec.names)}): extract with --attn-strides to probe it")
    levels = list(cache.noise_levels) if noise_ts is None else [int(t) for t in noise_ts]
    if not levels:
        raise CacheError(f"cache {cache.path} has no finished noise level yet")
    for t in levels:
        cache.timestep(t)  # a level the cache lacks: CacheError naming the ones it has
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise RefsegError(f"--threshold must be in [0, 1] (got {threshold})")
    tokenizer = tokenizer or load_tokenizer(cache.extraction_record["backbone"])

    n = cache.n_samples
    content = np.zeros((n, cache.spec.token_length), bool)
    text_ok = cache.text_done().astype(bool)
    for start in range(0, n, BLOCK):
        rows = np.arange(start, min(n, start + BLOCK))
        ids, mask = cache.input_ids(rows), cache.attention_mask(rows)
        for j, row in enumerate(rows):
            content[row] = content_tokens(tokenizer, ids[j], mask[j])
    thresholds = THRESHOLDS if threshold is None else (threshold,)
    rows_out = []
    for t in levels:
        usable = cache.done(t).astype(bool) & text_ok & content.any(1)
        picked = np.flatnonzero(usable)
        for info in tensors:
            scores = _Scores(thresholds)
            for start in range(0, len(picked), BLOCK):
                rows = picked[start:start + BLOCK]
                maps = cache.read_rows(t, rows, info.name).astype(np.float32)  # (b, L, h, w)
                weights = content[rows].astype(np.float32)
                mean = np.einsum("blhw,bl->bhw", maps, weights) / weights.sum(1)[:, None, None]
                scores.add(mean, cache.gt(rows))
            rows_out.append({"noise_t": int(t), "tensor": info.name, "stride": int(info.stride),
                             **scores.result(threshold), "n": int(len(picked)), "skipped": int(n - len(picked))})
    return rows_out


# ---- tables -------------------------------------------------------------------------------------

def probe_table_md(rows: list[dict]) -> str:
    """A Markdown table of `probe_attention`'s rows (percentages, one decimal)."""
    lines = ["| T | tensor | pointing % | chance % | best-thr mIoU % | thr | chance mIoU % | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        thr = "" if r["threshold"] is None else f"{r['threshold']:.2f}"
        lines.append(f"| {r['noise_t']} | {r['tensor']} | {100 * r['pointing']:.1f} | {100 * r['pointing_chance']:.1f} "
                     f"| {100 * r['miou']:.1f} | {thr} | {100 * r['miou_chance']:.1f} | {r['n']} |")
    return "\n".join(lines) + "\n"


def probe_table_csv(rows: list[dict]) -> str:
    """The rows as CSV (fractions, full precision), columns `COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in COLUMNS})
    return buf.getvalue()
