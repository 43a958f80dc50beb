"""What one extraction reads: the samples it selects and their cache tables."""

from __future__ import annotations

from typing import NamedTuple

from refseg.cache import layout
from refseg.cache.layout import ImageTable, SampleTable
from refseg.core.errors import DataError
from refseg.core.refer import ReferDataset
from refseg.extract.config import ExtractionConfig


def selected_samples(cfg: ExtractionConfig) -> tuple[ReferDataset, "SelectedTables"]:
    """The dataset of `cfg` and the tables of the samples it selects, in cache order."""
    refer = ReferDataset(cfg.data_root, cfg.dataset, split_by=cfg.split_by, image_root=cfg.image_root,
                         text_field=cfg.text_field)
    return refer, selected_tables(refer, select_samples(refer, cfg.split, cfg.sentences, cfg.limit))


def select_samples(refer: ReferDataset, split: str, sentences: str, limit: int | None):
    """The samples of a split in cache order: sorted by (image_id, sent_id), optionally first-sentence/limited."""
    samples = refer.samples(split)
    if sentences == "first":
        seen, firsts = set(), []
        for s in samples:
            if s.ref_id not in seen:
                seen.add(s.ref_id)
                firsts.append(s)
        samples = firsts
    samples = sorted(samples, key=lambda s: (s.image_id, s.sent_id))
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise DataError(f"split '{split}' of {refer.dataset} has no samples to extract")
    return samples


class SelectedTables(NamedTuple):
    """The cache's sample and image tables of the selected samples, and each image row's file path."""

    samples: SampleTable
    images: ImageTable
    image_paths: list[str]


def selected_tables(refer: ReferDataset, samples) -> SelectedTables:
    """`layout.build_tables` of `samples`, with the image sizes and paths read from `refer`."""
    orig_hw = {}
    for s in samples:
        if s.image_id not in orig_hw:
            info = refer.image(s.image_id)
            orig_hw[s.image_id] = (int(info["height"]), int(info["width"]))
    samples_table, images_table = layout.build_tables(samples, orig_hw)
    path_of = {s.image_id: str(s.image_path) for s in samples}
    return SelectedTables(samples_table, images_table, [path_of[int(i)] for i in images_table.image_id])


def count_truncated(tokenizer, texts: list[str], length: int) -> int:
    # verbose=False: these lengths are counted on purpose, no "longer than the maximum" warning
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    return sum(n > length for n in lengths)
