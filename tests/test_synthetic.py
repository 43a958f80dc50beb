"""The synthetic world: determinism, RefCOCO format round trip, sentences that are true and unique."""

import hashlib
import json
import pickle

import numpy as np
import pytest

from refseg.backbones.tokenizer_vocab import WORDS, build_vocab
from refseg.core.refer import ReferDataset
from refseg.core.synthetic import VOCABULARY, describe_scene, generate, refer_scene
from refseg.core.synthetic_scenes import COLOURS, SHAPES, SIZES, render_scene


@pytest.fixture(scope="module")
def synth30(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, images=30, seed=3, image_size=96)
    return out


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_vocabulary_constants():
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    assert all(w == w.lower() and w.isalpha() for w in VOCABULARY)
    assert set(COLOURS) | set(SHAPES) | set(SIZES) <= set(VOCABULARY)


# Recorded from the tokenizer and the tiny backbone as they were built before the vocabulary was frozen.
TINY_VOCAB_SHA256 = "9862110f12597da6a1375407335a2f3d063b8026df61cce620ec4395d3e3949a"
TINY_TOKENIZER_SHA256 = "7229876d1bbf9095742efd73f167be61403b3b29954c1b8ad8596bbb8e49f7fa"
TINY_WEIGHTS_SHA256 = "120b4ee10d503ce023793787e207f11cf27ef99c0feaa263dc4d420a1a6939f4"


def test_synthetic_words_are_whole_tokens_of_the_frozen_tiny_vocabulary():
    """A word added to the synthetic world must be added to the tiny vocabulary on purpose: that
    changes the tiny backbone's weights and every tiny cache's fingerprint."""
    vocab, _ = build_vocab()
    missing = [w for w in VOCABULARY if w + "</w>" not in vocab]
    assert not missing, f"add {missing} to refseg.backbones.tokenizer_vocab.WORDS (new tiny weights)"
    assert set(VOCABULARY) <= set(WORDS)


def test_tiny_vocabulary_is_frozen():
    vocab, merges = build_vocab()
    assert len(vocab) == 602
    assert hashlib.sha256(json.dumps([sorted(vocab.items()), merges]).encode()).hexdigest() == TINY_VOCAB_SHA256


def test_tiny_backbone_identity_is_frozen(tiny_backbone):
    """The tiny backbone's weights and tokenizer as cache fingerprints see them."""
    assert tiny_backbone.identity["tokenizer_sha256"] == TINY_TOKENIZER_SHA256
    assert tiny_backbone.identity["weights_sha256"] == TINY_WEIGHTS_SHA256


def test_same_seed_same_bytes(tmp_path):
    a = generate(tmp_path / "a", images=12, seed=7)
    b = generate(tmp_path / "b", images=12, seed=7)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 12 + 2 and fa.keys() == fb.keys()
    assert fa == fb
    c = generate(tmp_path / "c", images=12, seed=8)
    assert _files(c)["images/synth_000001.jpg"] != fa["images/synth_000001.jpg"]


def test_rerun_smaller_removes_stale_images(tmp_path):
    generate(tmp_path, images=10)
    root = generate(tmp_path, images=4)
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"synth_{i:06d}.jpg" for i in range(1, 5)]


def test_round_trip_through_refer(synth30):
    ds = ReferDataset(synth30, "refcoco-synth")
    splits = ds.splits()
    assert list(splits) == ["train", "val", "testA", "testB"]
    assert sum(s["images"] for s in splits.values()) == 30
    assert splits["val"]["images"] == splits["testA"]["images"] == splits["testB"]["images"] == 3
    by_id = lambda samples: sorted(samples, key=lambda s: s.sent_id)  # noqa: E731
    assert by_id(ds.samples("test")) == by_id(ds.samples("testA") + ds.samples("testB"))
    differ = 0
    for split in splits:
        for ref in ds.refs(split):
            vpd, union = ds.mask(ref["ref_id"]), ds.mask(ref["ref_id"], "union")
            assert vpd.shape == (96, 96) and vpd.any()
            assert not (vpd & ~union).any()
            ann = ds.annotation(ref["ann_id"])
            if (vpd != union).any():
                differ += 1
                assert len(ann["segmentation"]) == 2  # the two-part annotations, and only they
            sents = [s["sent"] for s in ref["sentences"]]
            assert len(sents) in (1, 2, 3) and len(set(sents)) == len(sents)
            assert all(set(s.split()) <= set(VOCABULARY) for s in sents)
    assert differ > 0
    for sample in ds.samples("train"):
        assert sample.image_path.is_file()


def test_refs_file_has_every_field_of_the_real_ones(synth30):
    raw = (synth30 / "refcoco-synth" / "refs(unc).p").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2, like the py2-written originals
    refs = pickle.loads(raw)
    assert isinstance(refs, list)
    for ref in refs:
        assert set(ref) == {"ref_id", "ann_id", "image_id", "category_id", "split", "sent_ids", "sentences",
                            "file_name"}
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for s in ref["sentences"]:
            assert set(s) == {"sent_id", "sent", "raw", "tokens"} and s["tokens"] == s["sent"].split()
        assert not (synth30 / "refcoco-synth" / "images" / ref["file_name"]).exists()


def test_sentences_never_shared_between_refs_of_an_image(synth30):
    ds = ReferDataset(synth30, "refcoco-synth")
    seen = {}
    for split in ds.splits():
        for ref in ds.refs(split):
            for s in ref["sentences"]:
                key = (ref["image_id"], s["sent"])
                assert seen.setdefault(key, ref["ref_id"]) == ref["ref_id"], key


def test_pixels_are_the_objects_colour(synth30):
    from PIL import Image

    from refseg.core.synthetic_scenes import RGB

    ds = ReferDataset(synth30, "refcoco-synth")
    colour_of = {}
    for ref in ds.refs("train")[:20]:
        union = ds.mask(ref["ref_id"], "union")
        pixels = np.asarray(Image.open(ds.image_path(ref["image_id"])).convert("RGB"))[union].astype(float)
        median = np.median(pixels, axis=0)
        nearest = min(RGB, key=lambda c: np.abs(np.array(RGB[c]) - median).sum())
        colour_of[ref["ref_id"]] = nearest
        assert np.abs(np.array(RGB[nearest]) - median).sum() < 60
        words = ref["sentences"][0]["sent"].split()
        head = words[: next((i for i, w in enumerate(words) if w in _RELATION_STARTS), len(words))]
        named = [w for w in head if w in COLOURS]
        if named:
            assert named == [nearest], (ref["sentences"][0]["sent"], nearest)


# --- an independent reading of the sentences, checked against the scene's geometry

_RELATION_STARTS = {"on", "at", "next", "above", "below", "to"}


def _parse_np(words):
    """'the [size] [colour] (shape|one|shape)' → attribute dict."""
    assert words[0] == "the", words
    attrs = {}
    for w in words[1:]:
        if w in SIZES:
            attrs["size"] = w
        elif w in COLOURS:
            attrs["colour"] = w
        elif w in SHAPES:
            attrs["shape"] = w
        else:
            assert w in ("one", "shape"), words
    return attrs


def _fits(attrs, obj):
    return all(getattr(obj, k) == v for k, v in attrs.items())


def _check_sentence(sentence, target, objects):
    words = sentence.split()
    cut = next((i for i, w in enumerate(words) if w in _RELATION_STARTS), len(words))
    head, rest = _parse_np(words[:cut]), words[cut:]
    assert _fits(head, target), sentence
    group = [o for o in objects if _fits(head, o)]
    if not rest:
        assert group == [target], sentence
        return
    position = {("on", "the", "left"): (0, -1), ("on", "the", "right"): (0, 1),
                ("at", "the", "top"): (1, -1), ("at", "the", "bottom"): (1, 1)}
    if tuple(rest) in position:
        axis, sign = position[tuple(rest)]
        assert max(group, key=lambda o: sign * o.center[axis]) is target, sentence
        return
    for lead, axis, sign in ((["next", "to"], None, 0), (["above"], 1, -1), (["below"], 1, 1),
                             (["to", "the", "left", "of"], 0, -1), (["to", "the", "right", "of"], 0, 1)):
        if rest[: len(lead)] == lead:
            anchor_attrs = _parse_np(rest[len(lead):])
            anchors = [o for o in objects if _fits(anchor_attrs, o)]
            assert len(anchors) == 1 and anchors[0] is not target, sentence
            anchor = anchors[0]
            candidates = [o for o in group if o is not anchor]
            if axis is None:
                dist = lambda o: np.hypot(o.x - anchor.x, o.y - anchor.y)  # noqa: E731
                assert min(candidates, key=dist) is target, sentence
            else:
                on_side = [o for o in candidates if sign * (o.center[axis] - anchor.center[axis]) > 0]
                assert target in on_side, sentence
            return
    raise AssertionError(f"unparsed sentence: {sentence}")


def test_sentences_are_true_and_unique_in_their_scene():
    kinds = set()
    for seed in range(150):
        rng = np.random.default_rng(seed)
        scene = render_scene(rng, 128)
        assert 2 <= len(scene.objects) <= 5
        for index, sentences in refer_scene(rng, scene):
            for s in sentences:
                _check_sentence(s, scene.objects[index], scene.objects)
                kinds.add("relation" if any(w in s.split() for w in ("next", "above", "below", "of"))
                          else "position" if len(s.split()) > 4 and s.split()[-2] == "the" else "attribute")
    assert kinds == {"attribute", "position", "relation"}


def test_render_and_describe_scene():
    scene = render_scene(np.random.default_rng(1), 64)
    assert scene.image.size == (64, 64) and scene.image.mode == "RGB"
    caption = describe_scene(scene)
    assert set(caption.split()) <= set(VOCABULARY)
    for obj in scene.objects:
        assert f"{obj.size} {obj.colour} {obj.shape}" in caption
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in obj.polygons)
        assert obj.area > 0 and obj.bbox[2] > 0
    again = render_scene(np.random.default_rng(1), 64)
    assert describe_scene(again) == caption and again.image.tobytes() == scene.image.tobytes()


def test_sentence_kind_names_the_template_each_candidate_came_from():
    from refseg.core.synthetic import SENTENCE_KINDS, _candidate_sentences, sentence_kind
    from refseg.core.synthetic_scenes import render_scene

    rng = np.random.default_rng(7)
    seen = dict.fromkeys(SENTENCE_KINDS, 0)
    for _ in range(60):
        scene = render_scene(rng, 128)
        for obj in scene.objects:
            for kind, sentences in _candidate_sentences(obj, scene).items():
                for sentence in sentences:
                    assert sentence_kind(sentence) == kind, sentence
                    seen[kind] += 1
    assert min(seen.values()) > 20, seen  # every kind drawn, "to the left of" among the relations
    assert sentence_kind("the square to the left of the red circle") == "relation"
    assert sentence_kind("the small square on the left") == "position"
    assert sentence_kind("the big red one") == "attribute"
