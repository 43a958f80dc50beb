"""Head training under torchrun (heads/distributed.py): batches split across ranks, the one-process
gradient, rank 0 alone writing the run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _heads_util import train_val_caches
from safetensors.torch import load_file

from refseg.heads import train
from refseg.heads.distributed import RankBatches, Ranks
from refseg.heads.train_setup import EpochShuffle

T = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ranks_split_every_global_batch_and_fill_in_a_placeholder():
    order = EpochShuffle(10, seed=3)
    order.set_epoch(2)
    single = list(RankBatches(order, 4, Ranks()))
    per_rank = [list(RankBatches(order, 4, Ranks(rank=r, world=3))) for r in range(3)]
    assert [len(b) for b in single] == [4, 4, 2] and all(len(p) == 3 for p in per_rank)
    for k, batch in enumerate(single):
        shares = [per_rank[r][k] for r in range(3) if Ranks(rank=r, world=3).share(len(batch))]
        assert sorted(i for share in shares for i in share) == sorted(batch)
    # the last batch has 2 samples for 3 ranks: rank 2 gets a placeholder (its first sample, weight 0)
    assert Ranks(rank=2, world=3).share(2) == 0 and per_rank[2][2] == single[2][:1]


# Trains like the in-process run below, as one of the ranks torchrun starts.
RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from refseg.heads import train
    torch.set_num_threads(1)
    train(sys.argv[1], 5, "linear", sys.argv[2], val_cache=sys.argv[3], **json.loads(sys.argv[4]))
""")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return train_val_caches(tmp_path_factory.mktemp("ddp-caches"), 33, 16)  # batches of 8: 8 8 8 8 1


def test_two_ranks_train_the_weights_of_one_process(caches, tmp_path):
    train_cache, val_cache = caches
    # no BatchNorm: on the CPU (gloo) DDP keeps per-rank batch statistics (SyncBatchNorm is GPU-only)
    kwargs = dict(epochs=2, batch_size=8, lr=1e-3, optimizer="adamw", norm=False, preload=True, progress=False)
    one = tmp_path / "one"
    train(train_cache, T, "linear", one, val_cache=val_cache, **kwargs)

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(train_cache), str(two), str(val_cache), json.dumps(kwargs)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = load_file(one / "head.safetensors"), load_file(two / "head.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]  # written once, by rank 0
    for m, r in zip(metrics, reference):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-4)
        assert m["val"]["oIoU"] == pytest.approx(r["val"]["oIoU"], abs=0.05)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
