"""Caches on object storage, tested against a real S3 server (issue 24, item 4): moto's S3-compatible
server on 127.0.0.1, started and stopped here; no other network. Endpoint and keys are configured the
way AWS users do it: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.

- two processes with distinct --shard parts fill one s3:// store; it holds every array's values of a
  local store made by one process, and a head trained and evaluated from it has the local run's bytes
  and metrics;
- an extraction killed in the middle of its writes is resumed by the same command to the same values;
- a damaged remote store is said in one line, never read as zeros.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import zarr
from _cache_util import all_arrays
from _fault_util import Fault, extract_args, extraction_reference, run, start  # noqa: F401
from click.testing import CliRunner

pytest.importorskip("moto.server", reason="moto[server] is in the test extras (setup.py)")
pytest.importorskip("s3fs", reason="s3fs is in the test extras (setup.py)")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment that points boto/s3fs at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "refseg-test",
           "AWS_SECRET_ACCESS_KEY": "refseg-test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def bucket(s3) -> str:
    import boto3

    name = f"refseg-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def same_arrays(a, b) -> None:
    x, y = all_arrays(a), all_arrays(b)
    assert sorted(x) == sorted(y)
    for key in x:
        assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def test_two_processes_fill_an_s3_store_that_trains_and_scores_as_a_local_one(s3, synth_root, extraction_reference,
                                                                           tmp_path):
    from refseg.heads.cli_eval import main as eval_main
    from refseg.heads.cli_train import main as train_main

    url = f"s3://{bucket(s3)}/c.zarr"
    logs = tmp_path / "logs"
    # no locks on object stores: the first process creates the store, the second joins it (DESIGN §11)
    first = start("refseg-extract", extract_args(synth_root, url, "--shard", "0/2"), logs=logs, env=s3)
    import time

    deadline = time.monotonic() + 120
    while first.process.is_alive() and time.monotonic() < deadline:
        try:
            if "refseg_cache" in zarr.open_group(url, mode="r").attrs:
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.2)
    second = run("refseg-extract", extract_args(synth_root, url, "--shard", "1/2"), logs=logs, env=s3)
    first.wait()
    assert first.exitcode == 0, first.stderr
    assert second.exitcode == 0, second.stderr
    same_arrays(url, extraction_reference)

    scores = {}
    for name, cache in (("s3", url), ("local", str(extraction_reference))):
        out = tmp_path / name
        trained = CliRunner().invoke(train_main, ["--cache", cache, "--noise-t", "5", "--head", "linear", "--epochs", "2",
                                                  "--optimizer", "adam", "--lr", "1e-3", "--out", str(out), "--quiet"])
        assert trained.exit_code == 0, trained.output
        scored = CliRunner().invoke(eval_main, ["--run", str(out), "--cache", cache, "--quiet"])
        assert scored.exit_code == 0, scored.output
        scores[name] = (scored.stdout.splitlines()[-2], (out / "head.safetensors").read_bytes())
    assert scores["s3"] == scores["local"]


def test_an_s3_extraction_killed_mid_write_resumes_to_the_same_values(s3, synth_root, extraction_reference, tmp_path):
    url = f"s3://{bucket(s3)}/c.zarr"
    logs = tmp_path / "logs"
    # killed inside the third write of a shard's data of T=0 (its data partly written, never flagged done)
    killed = run("refseg-extract", extract_args(synth_root, url), logs=logs, env=s3,
                 faults=[Fault("refseg.cache.engine:ZarrEngine.write", on_call=9, match="t0000")])
    assert killed.exitcode != 0 and killed.killed, killed.stderr
    from refseg.cache import open_cache

    assert not open_cache(url).done(0).all()
    again = run("refseg-extract", extract_args(synth_root, url), logs=logs, env=s3)
    assert again.exitcode == 0, again.stderr
    same_arrays(url, extraction_reference)


def test_a_damaged_s3_store_is_said_not_read_as_zeros(s3, extraction_reference, tmp_path):
    import s3fs

    from refseg.cache import open_cache
    from refseg.core.errors import DamagedCacheError

    url = f"s3://{bucket(s3)}/c.zarr"
    fs = s3fs.S3FileSystem()
    fs.put(str(extraction_reference), url.removeprefix("s3://"), recursive=True)
    fs.rm(url.removeprefix("s3://") + "/t0005/s8/c/1/0/0/0")
    with pytest.raises(DamagedCacheError, match=r"t0005/s8 rows? 2.*\(sent_id .*chunk file missing"):
        open_cache(url).read_rows(5, [2, 3], "s8")
    from refseg.cache.cli import main as cache_main

    found = CliRunner().invoke(cache_main, ["verify", url])
    assert found.exit_code == 2 and "damaged: t0005/s8: rows 2, 3" in found.output, found.output


def test_an_s3_dry_run_writes_nothing_and_du_counts_what_the_local_disk_does(s3, synth_root, extraction_reference,
                                                                            monkeypatch):
    import s3fs

    from refseg.cache.cli import main as cache_main
    from refseg.cache.usage import disk_usage
    from refseg.extract.cli import main as extract_main

    name = bucket(s3)
    url = f"s3://{name}/c.zarr"
    fs = s3fs.S3FileSystem()
    # the free space of an object store is not asked for: the local disk reporting none changes nothing
    monkeypatch.setattr("refseg.extract.plan.shutil.disk_usage", lambda path: pytest.fail("disk_usage asked"))
    dry = CliRunner().invoke(extract_main, extract_args(synth_root, url, "--dry-run"))
    assert dry.exit_code == 0, dry.output
    assert f"free at {url}: not checked (an object store has no free space to ask for)" in dry.stdout
    assert fs.ls(name, refresh=True) == []  # nothing written: no store, no lock object

    fs.put(str(extraction_reference), url.removeprefix("s3://"), recursive=True)
    remote, local = disk_usage(url), disk_usage(str(extraction_reference))
    assert remote == local and remote[-1][1] > 0  # the same objects, the same bytes, the same rows
    again = CliRunner().invoke(extract_main, extract_args(synth_root, url, "--dry-run"))
    assert "already in the store: T=0: complete, T=5: complete" in again.stdout and "to write: 0 B" in again.stdout
    shown = CliRunner().invoke(cache_main, ["du", url])
    assert shown.exit_code == 0 and f"total ({url})" in shown.stdout and "t0005/s8" in shown.stdout, shown.output
