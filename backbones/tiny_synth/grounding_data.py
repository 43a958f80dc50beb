"""Stage C's data: synthetic scenes with, for each caption, which tokens name which object's pixels.

Two kinds of caption, both from `refseg.core.synthetic`'s own language:

* the scene caption (`describe_scene`): every object named left to right, "a big red circle at the
  top left and ..."; each object's size, colour, shape and position words are tied to its mask;
* a referring sentence (`refer_scene`, the generator the referring dataset uses): it names one of
  several objects, often look-alikes ("the square on the left", "the red one above the green star");
  the words of the *referred object's* phrase (everything before a relation such as "above" or
  "next to") are tied to its mask. The anchor's words after the relation are left free.

Tied tokens get an attention target: the object's mask at latent resolution (area fractions).
Function words ("a", "the", "at", "and", ...) are never tied. Every word of the synthetic world is one
token of the tiny tokenizer (`tokenizer_vocab.WORDS`), so word k is token k + 1 (after BOS); a
caption that tokenizes otherwise is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

from refseg.core.synthetic import describe_scene, refer_scene
from refseg.core.synthetic_scenes import render_scene

GROUND_SCENE_STREAM = 3  # stage C's scenes: neither stage A/B's (1), the sample grid's (2), nor the dataset's
SENTENCE_STREAM = 4  # the referring sentences drawn for those scenes
FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "to", "at", "on", "in", "and", "next", "above", "below"})
RELATION_STARTS = ("next", "above", "below", "to")  # a referring sentence's target phrase ends before these


@dataclass
class GroundingSample:
    """One caption of one scene: token index -> the object (index into `masks`) it should look at."""

    scene: int
    text: str
    tied: dict[int, int]
    kind: str  # "caption" (the scene caption) or "sentence" (a referring sentence)


def object_masks(scene, latent_side: int) -> np.ndarray:
    """(objects, latent_side, latent_side) float32: the share of each latent cell an object covers."""
    size = scene.size
    out = np.empty((len(scene.objects), latent_side, latent_side), np.float32)
    k = size // latent_side
    for j, obj in enumerate(scene.objects):
        rles = mask_utils.frPyObjects(obj.polygons, size, size)
        full = mask_utils.decode(mask_utils.merge(rles)).astype(np.float32)
        out[j] = full.reshape(latent_side, k, latent_side, k).mean(axis=(1, 3))
    return out


def scene_caption(scene) -> tuple[str, dict[int, int]]:
    """`describe_scene`'s caption and the tie of each object's content words to that object."""
    text = describe_scene(scene)
    order = sorted(range(len(scene.objects)), key=lambda j: (scene.objects[j].x, scene.objects[j].y))
    tied, word = {}, 0
    for j, phrase in zip(order, text.split(" and ")):  # object phrases never contain "and"
        for w in phrase.split():
            if w not in FUNCTION_WORDS:
                tied[word + 1] = j
            word += 1
        word += 1  # the "and" between phrases
    return text, tied


def sentence_ties(sentence: str, target: int) -> dict[int, int]:
    """The referred object's words in a referring sentence: those before the first relation word."""
    tied = {}
    for k, w in enumerate(sentence.split()):
        if w in RELATION_STARTS:
            break
        if w not in FUNCTION_WORDS:
            tied[k + 1] = target
    return tied


def grounding_set(seed: int, count: int, image_size: int, latent_side: int, first: int = 0):
    """Scenes `first`..`first+count-1` of stage C's stream: (images uint8, per-scene object masks, samples).

    Each scene gives its scene caption and every referring sentence `refer_scene` draws for it.
    """
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    masks, samples = [], []
    for n in range(count):
        i = first + n
        scene = render_scene(np.random.default_rng([seed, GROUND_SCENE_STREAM, i]), image_size)
        images[n] = np.asarray(scene.image)
        masks.append(object_masks(scene, latent_side))
        text, tied = scene_caption(scene)
        samples.append(GroundingSample(n, text, tied, "caption"))
        for target, sentences in refer_scene(np.random.default_rng([seed, SENTENCE_STREAM, i]), scene):
            samples += [GroundingSample(n, s, sentence_ties(s, target), "sentence") for s in sentences]
    return images, masks, samples


def check_one_token_per_word(tokenizer, samples) -> None:
    """Word k must be token k + 1; true for the synthetic world's words with the tiny tokenizer."""
    for s in samples:
        ids = tokenizer(s.text, truncation=False).input_ids
        if len(ids) != len(s.text.split()) + 2:
            raise ValueError(f"caption {s.text!r} does not tokenize one token per word")


def attention_targets(batch, masks, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length, side, side) target maps and (B, length) weights (1 where a token is tied)."""
    side = masks[0].shape[-1]
    targets = torch.zeros(len(batch), length, side, side)
    weights = torch.zeros(len(batch), length)
    for b, s in enumerate(batch):
        for token, obj in s.tied.items():
            if token < length - 1:  # truncated captions lose their last words (EOS is at length-1)
                targets[b, token] = torch.from_numpy(masks[s.scene][obj])
                weights[b, token] = 1.0
    return targets, weights
