"""Run refseg's command lines as real processes with a fault injected where a test says.

Every run is its own process (its own pid, its own locks, killed for real by SIGKILL), forked from a
multiprocessing forkserver that imported torch, diffusers and refseg once: on 2 busy cores a fresh
interpreter pays ~10 s of imports per run, a fork a fraction of a second. The child calls the same
click `main` the console script calls (`refseg-extract`, `refseg-train-head`), with its own
environment (RANK/WORLD_SIZE ...) and its stdout/stderr in files.

A `Fault` wraps one function, named "module:attr" or "module:Class.method", and acts on the n-th call
whose arguments mention `match`:
    kill     SIGKILL the process, before the call (or after it returned, with after=True)
    torn     for zarr's `_put(path, value)` or the engine's `start_write(file, target, data)`: write half
             the bytes to the writer's temporary file, then SIGKILL, i.e. die in the middle of writing
             one file of the store
    enospc   raise OSError(ENOSPC) from that call on (a disk that is full stays full)
    eio      raise OSError(EIO) from that call on
"""

from __future__ import annotations

import atexit
import errno
import importlib
import multiprocessing
import os
import re
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# What the forkserver imports once, so a forked run starts warm. diffusers and transformers load
# their models lazily: name the modules themselves.
PRELOAD = [
    "_fault_util", "torch", "numpy", "zarr", "click", "safetensors.torch",
    "refseg.backbones.loading", "refseg.backbones.tiny", "refseg.core.refer", "refseg.core.transforms",
    "refseg.cache", "refseg.cache.engine", "refseg.cache.writer", "refseg.cache.reader", "refseg.cache.dataset", "refseg.extract.cli", "refseg.extract.pipeline", "refseg.backbones.capture",
    "diffusers.models.autoencoders.autoencoder_kl", "diffusers.models.unets.unet_2d_condition",
    "diffusers.schedulers.scheduling_ddpm", "transformers.models.clip.modeling_clip",
    "transformers.models.clip.tokenization_clip", "refseg.heads.train", "refseg.heads.cli_train", "refseg.heads.cli_eval",
]
ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO}


@dataclass(frozen=True)
class Fault:
    target: str  # "package.module:function" or "package.module:Class.method"
    action: str = "kill"  # kill | torn | enospc | eio
    on_call: int = 1  # act on the n-th matching call (1-based)
    after: bool = False  # kill after that call returned instead of before it
    match: str = ""  # count only calls with a str/path argument that contains this

    def resolve(self):
        """(owner, attribute name, original) of the target."""
        module, _, path = self.target.partition(":")
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        return owner, name, getattr(owner, name)

    def wrapper(self, original):
        calls = [0]
        fault = self

        def faulty(*args, **kwargs):
            if fault.match and fault.match not in " ".join(str(a) for a in args if isinstance(a, (str, os.PathLike))):
                return original(*args, **kwargs)
            calls[0] += 1
            if calls[0] < fault.on_call or (calls[0] > fault.on_call and fault.action in ("kill", "torn")):
                return original(*args, **kwargs)
            if fault.action in ERRNO:
                code = ERRNO[fault.action]
                raise OSError(code, os.strerror(code), str(args[0]) if args else None)
            if fault.action == "torn":
                _torn_put(*args)
            if fault.after:
                result = original(*args, **kwargs)
                _kill_self()
                return result
            _kill_self()

        return faulty

    def install(self) -> None:
        owner, name, original = self.resolve()
        setattr(owner, name, self.wrapper(original))


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _torn_put(path, value, *_, **__) -> None:
    """What a process that dies half-way through writing a file of the store leaves: for zarr's
    LocalStore `_put(path, buffer)` a `.<uuid>.partial` file, for the engine's
    `start_write(file, target, data)` (cache/engine.py) tensorstore's `<file>.__lock`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(value, "as_buffer_like"):
        data, torn = bytes(value.as_buffer_like()), path.with_suffix(f".{uuid.uuid4().hex}.partial")
    else:
        data, torn = _[0].tobytes(), Path(f"{path}.__lock")
    torn.write_bytes(data[: len(data) // 2])
    _kill_self()


# ---- running a command line in a forked process ----------------------------------------------------
COMMANDS = {"refseg-extract": "refseg.extract.cli:main", "refseg-train-head": "refseg.heads.cli_train:main",
            "refseg-eval": "refseg.heads.cli_eval:main"}
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(command: str, argv: list[str], faults: tuple, env: dict, out_prefix: str, warmup: list | None) -> None:
    os.environ.update(env)
    for fd, suffix in ((1, ".out"), (2, ".err")):
        f = open(out_prefix + suffix, "w")
        os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import resource

    import torch

    torch.set_num_threads(1)  # the machine has 2 cores, shared
    for fault in faults:
        fault.install()
    module, _, name = COMMANDS[command].partition(":")
    main = getattr(importlib.import_module(module), name)

    def call(args) -> int:
        try:
            main.main(args=list(args), prog_name=command, standalone_mode=True)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0

    code = 0
    if warmup is not None:  # the same command once before, so that the run measured starts warm
        code = call(warmup)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if code == 0:
        code = call(argv)
    if warmup is not None:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(out_prefix + ".rss").write_text(f"{before} {after}")  # KiB on Linux
    sys.stdout.flush()
    sys.stderr.flush()
    # As a command's normal exit does: run the atexit handlers. zarr's waits for the writes still in
    # flight on its threads (a failed write's gather leaves its siblings running); os._exit alone would
    # cut them short and leave their temporary files, which no real exit does.
    atexit._run_exitfuncs()
    os._exit(code)


@dataclass
class Run:
    """A command line running (or done) in its own process."""

    process: multiprocessing.process.BaseProcess
    out_prefix: str

    def wait(self, timeout: float = 240) -> "Run":
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise AssertionError(f"process did not finish in {timeout} s; stderr: {self.stderr}")
        return self

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    @property
    def killed(self) -> bool:
        return self.process.exitcode == -signal.SIGKILL

    @property
    def peak_rss_growth_mb(self) -> float:
        """How much the process's peak RSS grew during the run proper (after `warmup`), in MiB."""
        before, after = (int(v) for v in Path(self.out_prefix + ".rss").read_text().split())
        return (after - before) / 1024

    @property
    def stdout(self) -> str:
        return Path(self.out_prefix + ".out").read_text() if Path(self.out_prefix + ".out").exists() else ""

    @property
    def stderr(self) -> str:
        return Path(self.out_prefix + ".err").read_text() if Path(self.out_prefix + ".err").exists() else ""


def start(command: str, argv: list[str], *, logs: Path, faults=(), env=None, warmup=None) -> Run:
    """Start `command argv` (e.g. "refseg-extract", [...]) in a new process; `logs` gets its output.

    With `warmup` (another argv), the process runs the command with it first and records how much its
    peak RSS grows during the second call (`Run.peak_rss_growth_mb`).
    """
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    prefix = str(logs / f"run-{uuid.uuid4().hex[:8]}")
    warmup = None if warmup is None else list(map(str, warmup))
    process = _forkserver().Process(target=_child, args=(command, list(map(str, argv)), tuple(faults),
                                                        dict(env or {}), prefix, warmup))
    process.start()
    return Run(process, prefix)


def _function_child(target: str, args: tuple, out_prefix: str) -> None:
    for fd, suffix in ((1, ".out"), (2, ".err")):
        f = open(out_prefix + suffix, "w")
        os.dup2(f.fileno(), fd)
    import traceback

    module, _, name = target.partition(":")
    code = 0
    try:
        getattr(importlib.import_module(module), name)(*args)
    except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_function(target: str, *args, logs: Path) -> Run:
    """Run `module:function(*args)` in a new process: exit code 0 if it returns, 1 (traceback on stderr)
    if it raises."""
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    prefix = str(logs / f"call-{uuid.uuid4().hex[:8]}")
    process = _forkserver().Process(target=_function_child, args=(target, args, prefix))
    process.start()
    return Run(process, prefix)


def call_at(when: float, target: str, *args) -> None:
    """Wait until time.time() == `when`, then call `module:function(*args)`: lines processes up."""
    import time

    time.sleep(max(0.0, when - time.time()))
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)(*args)


def fill_part_of_tiny_store(path: str, part: int, parts: int) -> None:
    """Open (or create) the small test store of _cache_util at `path` and write shards `part`/`parts` of
    every stage, noise levels 0 and 500 included."""
    from _cache_util import open_writer, random_contents

    with open_writer(path) as writer:
        contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
        for rows in writer.image_shards_todo((part, parts)):
            writer.write_latents(rows, contents["latent"][rows])
        for rows in writer.text_shards_todo((part, parts)):
            writer.write_text(rows, contents["input_ids"][rows], contents["attention_mask"][rows],
                              contents["embedding"][rows], contents["gt"][rows])
        for t in (0, 500):
            writer.add_noise_level(t, timestep=max(t, 1))
            for rows in writer.feature_shards_todo(t, (part, parts)):
                writer.write_features(t, rows, {name: a[rows] for name, a in contents[("t", t)].items()})


def run(command: str, argv: list[str], *, logs: Path, faults=(), env=None, warmup=None, timeout: float = 240) -> Run:
    """Run `command argv` in a new process and wait for it."""
    return start(command, argv, logs=logs, faults=faults, env=env, warmup=warmup).wait(timeout)


def partial_files(store) -> list[str]:
    """Temporary files a write cut short left in a store (zarr's `*.partial`, tensorstore's `*.__lock`)."""
    return sorted(str(p.relative_to(store)) for pattern in ("*.partial", "*.__lock") for p in Path(store).rglob(pattern))


# ---- the small extraction the fault tests share -----------------------------------------------------
def extract_args(data_root, out, *extra) -> list[str]:
    """10 samples of 3 images (shards of 2: 5 sample shards, 2 image shards), T=0 and 5, batches of 2."""
    return ["--data-root", str(data_root), "--dataset", "refcoco-synth", "--split", "train", "--sentences", "first",
            "--limit", "10", "--model", "tiny", "--noise-t", "0", "--noise-t", "5", "--image-size", "64",
            "--token-length", "16", "--shard-size", "2", "--batch-size", "2", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def extraction_reference(synth_root, tmp_path_factory):
    """The store an uninterrupted single-process `refseg-extract extract_args(...)` writes."""
    out = tmp_path_factory.mktemp("uninterrupted") / "C.zarr"
    done = run("refseg-extract", extract_args(synth_root, out), logs=out.parent / "logs")
    assert done.exitcode == 0, done.stderr
    return out


def computed(stdout: str) -> dict[str, int]:
    """The "<stage>: N computed this run" lines of an extraction report."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (.+): (\d+) computed this run$", stdout, re.M)}
