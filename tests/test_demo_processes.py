"""The demo on 2+ threads runs extraction as one-thread processes, each filling its shard part of the
one store (study/demo_processes.py `extract_in_processes`): the stores must be the bytes one process writes."""

import numpy as np

from refseg.cache import open_cache
from refseg.core.synthetic import generate
from refseg.extract.config import ExtractionConfig
from refseg.extract.pipeline import run_extraction
from refseg.study.demo_processes import extract_in_processes

NOISE_TS = (0, 500)


def _config(root, out, split):
    return ExtractionConfig(data_root=str(root), dataset="refcoco-synth", split=split, out=str(out), model="tiny",
                            noise_ts=NOISE_TS, image_size=64, token_length=16, batch_size=4, shard_size=4,
                            device="cpu", progress=False)


def test_two_extraction_processes_write_the_bytes_of_one(tmp_path):
    generate(tmp_path / "data", images=16, seed=0, image_size=64)
    splits = ("train", "val")
    for split in splits:  # one process, one thread (conftest)
        run_extraction(_config(tmp_path / "data", tmp_path / "one" / f"{split}.zarr", split))
    seconds = extract_in_processes([_config(tmp_path / "data", tmp_path / "two" / f"{split}.zarr", split)
                                    for split in splits], 2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    for split in splits:
        one, two = open_cache(tmp_path / "one" / f"{split}.zarr"), open_cache(tmp_path / "two" / f"{split}.zarr")
        assert one.fingerprint == two.fingerprint and one.n_samples == two.n_samples > 4  # several shards
        rows = list(range(one.n_samples))
        assert np.array_equal(one.embeddings(rows), two.embeddings(rows))
        assert np.array_equal(one.gt(rows), two.gt(rows))
        images = list(range(len(one.images_done())))
        assert np.array_equal(one.latents(images), two.latents(images))
        for t in NOISE_TS:
            assert two.done(t).all()
            for info in one.spec.tensors:
                name = info.name
                assert np.array_equal(one.read_rows(t, rows, name), two.read_rows(t, rows, name)), (t, name)


def test_a_store_a_part_left_unfinished_is_refused_in_one_line(tmp_path):
    import dataclasses

    import pytest

    from refseg.core.errors import CacheError
    from refseg.study.demo_processes import describe_store

    generate(tmp_path / "data", images=12, seed=0, image_size=64)
    cfg = _config(tmp_path / "data", tmp_path / "half.zarr", "train")
    run_extraction(dataclasses.replace(cfg, shard=(0, 2)))  # the other part never ran
    assert "unfinished at T = 0, 500" in describe_store(cfg.out)
    with pytest.raises(CacheError, match=r"half.zarr: noise level\(s\) 0, 500 unfinished after extraction; rerun"):
        describe_store(cfg.out, require_complete=True)
    run_extraction(dataclasses.replace(cfg, shard=(1, 2)))
    assert describe_store(cfg.out, require_complete=True).endswith("T = 0, 500 complete")
