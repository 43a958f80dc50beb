"""Session-wide fixtures: one synthetic dataset, one tiny backbone, one small extracted cache.

Built once per test session because the suite must finish in minutes on 2 CPU cores.
"""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network; a hub id must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: on 2 cores shared with other work, OpenMP's spinning threads make a tiny UNet call
# ~200x slower with 2 threads (9 s instead of 0.05 s, measured) than with 1.
torch.set_num_threads(1)

SYNTH_IMAGES = 24
IMAGE_SIZE = 64  # extraction size for tests: latents 8×8, features s8..s64 = 8×8 .. 1×1
TOKENS = 16


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic RefCOCO-format dataset: <root>/refcoco-synth/{instances.json, refs(unc).p, images/}."""
    from refseg.core.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, images=SYNTH_IMAGES, seed=0, image_size=96)
    return root


@pytest.fixture(scope="session")
def tiny_backbone():
    from refseg.backbones.loading import load_backbone

    return load_backbone("tiny", device="cpu")


@pytest.fixture(scope="session")
def extract_config(synth_root, tmp_path_factory):
    """A factory of ExtractionConfig for the synthetic val split at test size."""
    from refseg.extract.pipeline import ExtractionConfig

    def make(out, **overrides):
        kwargs = dict(data_root=str(synth_root), dataset="refcoco-synth", split="val", out=str(out), model="tiny",
                      noise_ts=(0, 5), image_size=IMAGE_SIZE, token_length=TOKENS, batch_size=4, progress=False,
                      shard_size=4)
        kwargs.update(overrides)
        return ExtractionConfig(**kwargs)

    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it, run by bench/gpu_check.sh (pytest -m gpu)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (bench/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
