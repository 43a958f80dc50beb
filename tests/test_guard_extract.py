"""Guard rails of extraction, data, backbones and every command's habits (issue 14).

Each test fails on the code before the issue: a replaced dataset was not refused and a changed one
not named; numeric options escaped as tracebacks or left a store behind; an unwritable --out was
advised to "free space"; a hub id without network retried for half a minute; tiny-synth was a
'folder'; Ctrl-C printed "Aborted!" and exited 1; --threads/--quiet were missing from most commands.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from _cache_util import store_files
from _cli_util import one_line
from refseg.cache import open_cache
from refseg.cache.fingerprint import (
    check_dataset_unchanged,
    compute_fingerprint,
    dataset_sha256,
    fingerprint_payload,
)
from refseg.cache.layout import DATASET_DIGEST_ATTR
from refseg.cache.writer import CacheWriter
from refseg.core import cli as core_cli
from refseg.core.data_cli import main as data_main
from refseg.core.errors import CacheMismatchError, ModelError
from refseg.extract.cli import main as extract_main
from refseg.extract.pipeline import run_extraction

BIN = Path(sys.executable).parent



@pytest.fixture
def extract_cli(monkeypatch, tiny_backbone):
    """`refseg-extract` in-process on the session's tiny backbone -> click's Result."""
    monkeypatch.setattr("refseg.extract.pipeline.load_backbone", lambda *a, **k: tiny_backbone)
    return lambda args: CliRunner().invoke(extract_main, [str(a) for a in args], prog_name="refseg-extract")


def extract_args(root, out, *extra):
    return ["--data-root", root, "--dataset", "refcoco-synth", "--split", "val", "--model", "tiny", "--noise-t", "0",
            "--out", out, "--image-size", "64", "--token-length", "16", "--shard-size", "2", "--batch-size", "2",
            "--limit", "6", "--quiet", *extra]


def copy_dataset(synth_root, to: Path) -> Path:
    shutil.copytree(synth_root, to)
    return to


def edit_refs(root: Path, change) -> None:
    path = root / "refcoco-synth" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    change(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))


# ---- 1. a dataset replaced, and caches made from a changed one ------------------------------------------
def test_synth_refuses_to_replace_a_dataset_unless_overwrite(tmp_path):
    runner = CliRunner()
    assert runner.invoke(data_main, ["synth", "--out", tmp_path, "--images", "8"]).exit_code == 0
    folder = tmp_path / "refcoco-synth"
    before = store_files(folder)
    result = runner.invoke(data_main, ["synth", "--out", tmp_path, "--images", "2"])
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "already holds a dataset (8 image files" in line and "--overwrite" in line
    assert store_files(folder) == before  # nothing replaced
    result = runner.invoke(data_main, ["synth", "--out", tmp_path, "--images", "2", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(list((folder / "images").glob("*.jpg"))) == 2


def test_synth_bad_outputs_and_seeds_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    runner = CliRunner()
    result = runner.invoke(data_main, ["synth", "--out", tmp_path / "file" / "d", "--images", "2"])
    assert result.exit_code == 2 and "is a file, not a folder" in one_line(result.stderr)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "refcoco-synth").write_text("x")  # a file where the dataset folder goes
    result = runner.invoke(data_main, ["synth", "--out", tmp_path / "d", "--images", "2"])
    assert result.exit_code == 2 and "it is a file, not a folder" in one_line(result.stderr)
    result = runner.invoke(data_main, ["synth", "--out", tmp_path / "e", "--seed", "-1"])
    assert result.exit_code == 2 and not (tmp_path / "e").exists()  # was a ValueError from numpy
    # an interrupted synth (images, no refs/instances yet) is not a dataset: writing over it is allowed
    (tmp_path / "f" / "refcoco-synth" / "images").mkdir(parents=True)
    (tmp_path / "f" / "refcoco-synth" / "images" / "synth_000001.jpg").write_bytes(b"half")
    assert runner.invoke(data_main, ["synth", "--out", tmp_path / "f", "--images", "2"]).exit_code == 0


def test_store_records_the_dataset_digest_beside_an_unchanged_fingerprint(extract_config, tiny_backbone, synth_root,
                                                                          tmp_path):
    out = tmp_path / "C.zarr"
    run_extraction(extract_config(out, noise_ts=(0,), limit=4), backbone=tiny_backbone)
    attrs = open_cache(out).attrs
    folder = Path(synth_root) / "refcoco-synth"
    assert attrs[DATASET_DIGEST_ATTR] == dataset_sha256(folder / "refs(unc).p", folder / "instances.json")
    payload = {key: attrs[key] for key in ("backbone", "extraction", "dataset", "spec", "samples")}
    assert attrs["fingerprint"] == compute_fingerprint(payload)  # the digest is not part of it


def test_a_changed_dataset_is_named_when_the_selection_changed(extract_cli, synth_root, tmp_path):
    root = copy_dataset(synth_root, tmp_path / "data")
    out = tmp_path / "C.zarr"
    assert extract_cli(extract_args(root, out)).exit_code == 0
    assert CliRunner().invoke(data_main, ["synth", "--out", root, "--images", "12", "--seed", "3",
                                          "--overwrite"]).exit_code == 0
    before = store_files(out)
    result = extract_cli(extract_args(root, out))
    line = one_line(result.stderr)
    assert result.exit_code == 2 and "the dataset changed since this cache was made" in line
    assert "samples" in line and "--overwrite" in line
    assert store_files(out) == before


def test_a_changed_dataset_refuses_an_unfinished_stage_one_and_warns_after_it(extract_cli, synth_root, tmp_path,
                                                                             monkeypatch):
    root = copy_dataset(synth_root, tmp_path / "data")
    out = tmp_path / "C.zarr"
    original = CacheWriter.write_text
    monkeypatch.setattr(CacheWriter, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    assert extract_cli(extract_args(root, out)).exit_code == 2  # stage 1 unfinished: no sentence stored
    monkeypatch.setattr(CacheWriter, "write_text", original)
    # the same samples (sent_ids), another sentence: the fingerprint is the same, the files are not
    edit_refs(root, lambda refs: [s.update(sent="the odd one") for r in refs for s in r["sentences"]])
    result = extract_cli(extract_args(root, out))
    line = one_line(result.stderr)
    assert result.exit_code == 2 and "the dataset changed since this cache was made" in line
    assert "old and new data would mix" in line
    assert not open_cache(out).text_done().any()

    assert extract_cli(extract_args(root, out, "--overwrite")).exit_code == 0  # extracted again from the new files
    assert set(open_cache(out).texts) == {"the odd one"}
    # stage 1 complete: a new noise level reads only the store, so it goes on, with a warning
    edit_refs(root, lambda refs: [s.update(sent="changed again") for r in refs for s in r["sentences"]])
    result = extract_cli(extract_args(root, out, "--noise-t", "5"))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("warning: the dataset changed since this cache was made")
    assert open_cache(out).done(5).all() and set(open_cache(out).texts) == {"the odd one"}


def test_readers_of_the_dataset_are_told_it_changed(extract_config, tiny_backbone, synth_root, tmp_path):
    root = copy_dataset(synth_root, tmp_path / "data")
    out = tmp_path / "C.zarr"
    run_extraction(extract_config(out, data_root=str(root), noise_ts=(0,), limit=4), backbone=tiny_backbone)
    folder = root / "refcoco-synth"
    files = (folder / "refs(unc).p", folder / "instances.json")
    check_dataset_unchanged(str(out), open_cache(out).attrs, *files)  # unchanged: nothing to say
    edit_refs(root, lambda refs: refs.pop())
    with pytest.raises(CacheMismatchError, match="the dataset changed since this cache was made"):
        check_dataset_unchanged(str(out), open_cache(out).attrs, *files)


# ---- 2. every numeric option of refseg-extract, checked before anything is made ---------------------------
BAD_OPTIONS = [
    (["--image-size", "0"], "--image-size must be a positive multiple"),
    (["--image-size", "-64"], "--image-size must be a positive multiple"),
    (["--image-size", "72"],
     "--image-size 72 is not a multiple of 64, the model's largest feature stride (try 64 or 128)"),
    (["--image-size", "32"], "--image-size 32 is not a multiple of 64"),
    (["--token-length", "0"], "--token-length must be at least 2"),
    (["--token-length", "78"], "--token-length 78 exceeds the text encoder's 77 positions"),
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["--batch-size", "-2"], "--batch-size must be at least 1 (got -2)"),
    (["--limit", "0"], "--limit must be at least 1 (got 0)"),
    (["--shard-size", "0"], "--shard-size must be at least 1 (got 0)"),
    (["--workers", "-1"], "--workers must be at least 0 (got -1)"),
    (["--noise-t", "-1"], "--noise-t takes steps of the model's noise schedule"),
    (["--noise-t", "1000"], "--noise-t must be in 0..999 (the model's noise schedule has 1000 steps)"),
    (["--timestep", "-1"], "--timestep must be at least 0 (got -1)"),
    (["--timestep", "1000"], "--timestep must be in 0..999"),
    (["--wait-timeout", "nan"], "--wait-timeout must be 0 or more seconds (got nan)"),
    (["--wait-timeout", "-1"], "--wait-timeout must be 0 or more seconds"),
    (["--strides", "12"], "--strides takes powers of two like 8,16,32 (got 12)"),
    (["--attn-strides", "0"], "--attn-strides takes powers of two"),
    (["--threads", "0"], "--threads must be at least 1 (got 0)"),
]


@pytest.mark.parametrize("extra, message", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_numeric_options_are_one_line_and_leave_nothing(extract_cli, synth_root, tmp_path, extra, message):
    out = tmp_path / "sub" / "C.zarr"
    result = extract_cli(extract_args(synth_root, out, *extra))
    assert result.exit_code == 2, (result.output, result.exception)
    assert message in one_line(result.stderr)
    assert not (tmp_path / "sub").exists()  # no store, no lock file, not even the parent folder


# ---- 3. an output that cannot be written is a path problem, not a full disk ------------------------------
def test_unwritable_out_is_said_to_be_a_bad_path(extract_cli, synth_root, tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("x")
    line = one_line(extract_cli(extract_args(synth_root, tmp_path / "plain" / "C.zarr")).stderr)
    assert "plain is a file, not a folder; choose another --out" in line and "free space" not in line
    line = one_line(extract_cli(extract_args(synth_root, "/proc/refseg-guard.zarr")).stderr)
    # root may look and fail with ENOENT, anyone else is refused by the look first
    assert "choose another --out" in line and ("permission" in line or "bad path" in line), line
    assert "free space" not in line and not os.path.exists("/proc/refseg-guard.zarr")

    def refuse(code):
        def create(*args, **kwargs):
            raise OSError(code, os.strerror(code), str(tmp_path / "C.zarr" / "zarr.json"))
        return create

    for code, words in [(errno.EROFS, "read-only file system [EROFS]"), (errno.EACCES, "permission denied [EACCES]"),
                        (errno.ENOTDIR, "a part of the path is a file, not a folder [ENOTDIR]")]:
        monkeypatch.setattr(CacheWriter, "_create", staticmethod(refuse(code)))
        line = one_line(extract_cli(extract_args(synth_root, tmp_path / "C.zarr")).stderr)
        assert words in line and "choose another --out" in line and "free space" not in line, line
    monkeypatch.setattr(CacheWriter, "_create", staticmethod(refuse(errno.ENOSPC)))  # a full disk still says so
    line = one_line(extract_cli(extract_args(synth_root, tmp_path / "C.zarr")).stderr)
    assert "No space left on device (ENOSPC)" in line and "free space" in line


def test_every_command_says_a_bad_path_as_such():
    @click.command()
    @core_cli.user_errors
    def cmd():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", "/etc/passwd/x.json")

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 2
    assert one_line(result.stderr) == ("error: bad path: a part of the path is a file, not a folder [ENOTDIR] "
                                       "(/etc/passwd/x.json)")


# ---- 4. a hub id without network fails at once, saying why ---------------------------------------------
def test_hub_id_without_network_fails_fast_and_says_so(monkeypatch, tmp_path):
    from refseg.backbones.loading import load_backbone

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port nothing listens on: "the network" refuses at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    elsewhere = []
    connect = socket.socket.connect

    def local_only(self, address, *a, **k):  # nothing may leave the machine
        if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")):
            elsewhere.append(address)
            raise OSError(errno.ENETUNREACH, "network disabled in tests")
        return connect(self, address, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    start = time.monotonic()
    with pytest.raises(ModelError) as e:
        load_backbone("refseg-test-owner/not-cached-anywhere")
    message = str(e.value)
    assert time.monotonic() - start < 10
    assert "not in the local Hugging Face cache and the network is unreachable" in message
    assert f"cannot connect to 127.0.0.1:{port}" in message and "config.json" not in message
    assert elsewhere == []


# ---- 5. tiny-synth is tiny-synth, and old tiny-synth caches keep their fingerprint -----------------------
def test_tiny_synth_kind_is_named_and_hashed_as_before(tiny_backbone, monkeypatch, tmp_path):
    from refseg.backbones import loading
    from refseg.backbones.loading import load_backbone, save_backbone
    from refseg.backbones.tiny import build_tiny

    monkeypatch.setattr(loading, "TINY_SYNTH_DIR", save_backbone(build_tiny(), tmp_path / "tiny-synth"))
    identity = load_backbone("tiny-synth").identity
    assert identity["kind"] == "tiny-synth" and identity["model"] == "tiny-synth"
    spec = tiny_backbone.spec(64, 16)
    settings = {"backbone": identity, "extraction": {}, "dataset": {}}
    now = compute_fingerprint(fingerprint_payload(settings, spec, [1, 2]))
    was = {kind: compute_fingerprint(fingerprint_payload(dict(settings, backbone=dict(identity, kind=kind)),
                                                         spec, [1, 2])) for kind in ("folder", "tiny")}
    assert now == was["folder"] != was["tiny"]
    with pytest.raises(ModelError, match="'tiny' or 'tiny-synth'"):
        load_backbone("no-such-model")


# ---- 6. Ctrl-C ---------------------------------------------------------------------------------------------
def test_ctrl_c_during_extraction_says_what_is_kept_and_how_to_resume(extract_cli, synth_root, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "C.zarr"
    from refseg.extract import pipeline

    original, calls = pipeline.check_features, []

    def interrupted(*args, **kwargs):  # Ctrl-C in the main thread while the second batch of T=0 is stored
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "check_features", interrupted)
    result = extract_cli(extract_args(synth_root, out, "--strides", "8,16"))
    assert result.exit_code == 130 and "Aborted" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: the shards written so far are kept in {out}; "
                                                   "to resume, run: refseg-extract --data-root ")
    again = lines[0].split("to resume, run: ")[1].split()
    assert again[again.index("--strides") + 1] == "8,16" and again[again.index("--out") + 1] == str(out)
    assert open_cache(out).done(0).tolist() == [True, True, False, False, False, False]
    monkeypatch.setattr(pipeline, "check_features", original)
    result = extract_cli(again[1:])  # the printed command resumes
    assert result.exit_code == 0 and "unet T=0: 4 computed this run" in result.stdout


def _interrupted_command(module: str):
    def body(out):
        raise KeyboardInterrupt

    body.__module__ = module  # what the command's table of what is kept goes by
    return click.command()(click.option("--out")(core_cli.user_errors(body)))


def test_ctrl_c_of_training_names_resume_and_others_keep_nothing():
    result = CliRunner().invoke(_interrupted_command("refseg.core.data_cli"), ["--out", "d"], prog_name="refseg-data")
    assert result.exit_code == 130 and result.stderr == "interrupted: nothing was kept\n"
    result = CliRunner().invoke(_interrupted_command("refseg.heads.cli_train"), ["--out", "runs/x"],
                                prog_name="refseg-train-head")
    assert result.exit_code == 130
    assert result.stderr == ("interrupted: the epochs completed so far are kept in runs/x; to resume, run: "
                             "refseg-train-head --out runs/x --resume\n")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_real_interrupt_says_what_was_kept_and_the_rerun_completes(extract_cli, synth_root, tmp_path, sig, status):
    """SIGINT (Ctrl-C) or SIGTERM (SLURM preempting the job) to a real `refseg-extract` process while it
    writes: one line saying what was kept and how to resume; then the same command completes it."""
    out = tmp_path / "C.zarr"
    args = [str(a) for a in extract_args(synth_root, out, "--noise-t", "5", "--noise-t", "50", "--noise-t", "500",
                                         "--shard-size", "1", "--batch-size", "1")]
    process = subprocess.Popen([str(BIN / "refseg-extract"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 240
    # the first finished shard of the first level: 23 more (6 samples, shards of 1, four levels) are still to do
    while not (out / "t0000" / "done" / "c" / "0").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the extraction finished before the signal arrived")
    assert process.returncode == status, stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted: the shards written so far are kept in {out}")
    assert extract_cli(args).exit_code == 0
    assert all(open_cache(out).done(t).all() for t in (0, 5, 50, 500))


def test_demo_checks_its_settings_before_writing_anything(tmp_path):
    from refseg.study.cli import main as report_main

    out = tmp_path / "demo"
    for extra, words in ((["--image-size", "96"], "--image-size 96 is not a multiple of 64"),
                         (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
                         (["--head", "nope"], "--head takes"), (["--threads", "0"], "--threads must be at least 1")):
        result = CliRunner().invoke(report_main, ["demo", "--out", out, "--model", "tiny", *extra])
        assert result.exit_code == 2 and words in one_line(result.stderr), (extra, result.output)
        assert not out.exists()


# ---- 7. --threads and --quiet on every command; every default in --help ------------------------------------
def _leaf_commands():
    from refseg.backbones.tiny_synth.cli import main as tiny_synth_main
    from refseg.study.cli_reference import COMMANDS

    commands = dict(COMMANDS, **{"python -m refseg.backbones.tiny_synth": tiny_synth_main})
    for name, command in commands.items():
        if isinstance(command, click.Group):
            for sub in command.list_commands(click.Context(command)):
                yield f"{name} {sub}", command.get_command(click.Context(command), sub)
        else:
            yield name, command


def test_every_command_has_threads_and_quiet():
    names = []
    for name, command in _leaf_commands():
        options = {opt for param in command.params for opt in param.opts}
        assert {"--threads", "--quiet"} <= options, name
        names.append(name)
    assert {"refseg-data synth", "refseg-cache info", "refseg-eval", "refseg-train-head",
            "refseg-extract"} <= set(names)


def test_threads_is_applied_while_the_command_runs_and_restored():
    seen = []

    @click.command()
    @core_cli.user_errors
    def cmd():
        seen.append((torch.get_num_threads(), core_cli.current_runtime().quiet))

    before = torch.get_num_threads()
    assert CliRunner().invoke(cmd, ["--threads", "3", "--quiet"]).exit_code == 0
    assert CliRunner().invoke(cmd, []).exit_code == 0
    assert seen == [(3, True), (core_cli.default_threads(), False)] and torch.get_num_threads() == before


def test_default_threads_leave_a_core_to_the_writer_and_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert core_cli.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert core_cli.default_threads() == 15
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert core_cli.default_threads() == 4


def test_quiet_extraction_prints_no_progress(extract_cli, synth_root, tmp_path):
    args = extract_args(synth_root, tmp_path / "C.zarr")
    loud = extract_cli([a for a in args if a != "--quiet"])
    assert loud.exit_code == 0 and "UNet T=0: 100%" in loud.stderr  # the progress bars
    quiet = extract_cli(extract_args(synth_root, tmp_path / "D.zarr"))
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_help_shows_every_default():
    from refseg.study.cli import main as report_main

    for command in (extract_main, data_main.get_command(None, "synth"), data_main.get_command(None, "info"),
                    report_main.get_command(None, "demo")):
        for param in command.params:
            if not isinstance(param, click.Option) or param.required or param.is_flag or param.name == "help":
                continue
            if param.name in ("preset", "shard"):  # no default: they only act when given (help says so)
                continue
            shown = param.show_default if isinstance(param.show_default, str) else param.default
            assert param.show_default and shown not in (None, ""), (command.name, param.name)
    help_text = CliRunner().invoke(extract_main, ["--help"], terminal_width=200).output
    assert "Noise level T (repeatable): 0, 5, 500 ...  [default: 0]" in help_text
