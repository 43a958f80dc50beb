"""`film_attend` (heads/film_attend.py): FiLM plus attention between the decoder's cells and the
sentence's words; checked against `film` and on what each cell can read."""

import pytest
import torch

from refseg.core.feature_spec import FeatureSpec, TensorInfo
from refseg.heads import build_head
from refseg.heads.batches import remove_sentence
from refseg.heads.film_attend import CellsAndWords


def _spec():
    tensors = (TensorInfo("s8", "feature", 6, 8, 8, ()), TensorInfo("s16", "feature", 5, 16, 4, ()),
               TensorInfo("s32", "feature", 5, 32, 2, ()), TensorInfo("attn_s16", "attention", 4, 16, 4, ()))
    return FeatureSpec(image_size=64, token_length=4, text_dim=12, latent_channels=4, latent_stride=8,
                       tensors=tensors)


def _inputs(spec, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = {t.name: torch.randn(batch, t.channels, 64 // t.stride, 64 // t.stride, generator=g)
                for t in spec.tensors}
    return features, torch.randn(batch, 4, 12, generator=g), torch.tensor([[True, True, False, False]] * batch)


def _wake(module, seed=1, scale=0.2):
    """Give every parameter random values (the output projections start at zero, which hides the attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def test_film_attend_starts_as_film_and_its_blocks_sit_where_the_cells_are_few():
    spec = _spec()
    head = build_head("film_attend", spec, hidden=8, levels=1)
    film = build_head("film", spec, hidden=8)
    assert head.head_args["heads"] == 4 and head.head_args["levels"] == 1 and head.uses_text
    # two fusion blocks (4×4 and 8×8 outputs): levels=1 attends on the first, more than 2 on both
    assert len(head.attend) == 1 and len(build_head("film_attend", spec, hidden=8, levels=5).attend) == 2
    assert film.load_state_dict(head.state_dict(), strict=False).unexpected_keys
    features, text, mask = _inputs(spec)
    assert torch.equal(head.eval()(features, text, mask), film.eval()(features, text, mask))
    with pytest.raises(ValueError, match=r"hidden \(10\) must be a multiple of heads \(4\)"):
        build_head("film_attend", spec, hidden=10)
    with pytest.raises(ValueError, match="levels must be at least 1"):
        build_head("film_attend", spec, hidden=8, levels=0)


def test_padding_words_are_not_read_and_a_sentence_changes_the_mask():
    spec = _spec()
    head = _wake(build_head("film_attend", spec, hidden=8)).eval()
    features, text, mask = _inputs(spec)
    out = head(features, text, mask)
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    other_padding = text.clone()
    other_padding[:, 2:] = 100.0  # the masked tokens
    pooled_same = head(features, other_padding, mask)
    assert torch.allclose(pooled_same, out, atol=1e-5)
    other_word = text.clone()
    other_word[:, 1] = torch.randn(2, 12)  # a constant shift would vanish in the LayerNorms
    assert (head(features, other_word, mask) - out).abs().max() > 1e-3
    # a sentence of padding only (never from a cache) reads every token rather than giving NaN
    assert torch.isfinite(head(features, text, torch.zeros(2, 4, dtype=torch.bool))).all()


def test_a_cell_reads_the_whole_level_and_knows_where_it_is():
    torch.manual_seed(0)
    block = _wake(CellsAndWords(hidden=8, text_dim=12, heads=2), scale=0.6).eval()
    text, mask = torch.randn(1, 4, 12), torch.ones(1, 4, dtype=torch.bool)
    x = torch.randn(1, 8, 6, 6)
    out = block(x, text, mask)
    far = x.clone()
    far[0, :, 0, 0] = torch.randn(8)  # one corner changed: the opposite corner's output moves (a 3×3 conv could not)
    assert (block(far, text, mask)[0, :, 5, 5] - out[0, :, 5, 5]).abs().max() > 1e-3  # a local op: exactly 0
    flat = torch.ones(1, 8, 6, 6)  # every cell alike: only their positions tell them apart
    flat_out = block(flat, text, mask)
    assert (flat_out[0, :, 0, 0] - flat_out[0, :, 5, 5]).abs().max() > 1e-3
    assert (flat_out[0, :, 0, 0] - flat_out[0, :, 0, 5]).abs().max() > 1e-3


def test_the_text_blind_baseline_of_film_attend_ignores_the_sentence():
    spec = _spec()
    head = remove_sentence(_wake(build_head("film_attend", spec, hidden=8)).eval(), spec)
    features, text, mask = _inputs(spec)
    assert torch.equal(head(features, text, mask), head(features, torch.randn(2, 4, 12), mask))


def test_film_attend_trains_deterministically():
    spec = _spec()
    features, text, mask = _inputs(spec, batch=4)
    target = torch.zeros(4, 8, 8, dtype=torch.long)
    target[:, 2:5, 3:6] = 1
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        head = build_head("film_attend", spec, hidden=8)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(head(features, text, mask), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in head.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert head.attend[1].read_words.out_proj.weight.abs().max() > 0  # the zero-started steps learned
