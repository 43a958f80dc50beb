"""A head run directory on disk, and nothing else: paths, atomic writes, checks on read.

```
RUN/
  config.json        what was trained on what: head, head args, feature spec, cache fingerprint and
                     settings, noise T, timestep, seed, optimizer, lr, epochs, batch size, versions
  head.safetensors   the weights after the last completed epoch
  best.safetensors   the weights of the epoch with the best val oIoU (only with a val cache)
  metrics.jsonl      one JSON line per epoch: epoch, loss, samples_per_s, lr, val metrics
  state.safetensors  everything needed to resume: weights, optimizer tensors, and a JSON header
                     (epoch, iteration, best val oIoU, RNG states) in the file's metadata, so that
                     weights and state can never come from different epochs
```
Every file is written to a temporary name and renamed into place, so an interrupted run leaves the
previous epoch's files intact, with the mode a plain `open()` would give it (0666 less the umask).
Nothing here unpickles: weights and state are safetensors only. A trainer holds the directory's lock
(`RunLock`) while it writes, so a second trainer on the same directory is refused, not interleaved.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from refseg.core.errors import RunError, RunWriteError
from refseg.core.paths import PROBE_PREFIX

CONFIG = "config.json"
HEAD = "head.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"
STATE = "state.safetensors"
TENSORBOARD = "tb"  # --tensorboard's event files
CHECKPOINTS = {"last": HEAD, "best": BEST}


# ---- creating / checking a directory ------------------------------------------------------------
def has_entries(out: Path) -> bool:
    """Whether folder `out` holds anything (a write check's passing probe file does not count)."""
    out = Path(out)
    return out.is_dir() and any(not p.name.startswith(PROBE_PREFIX) for p in out.iterdir())


def refuse_non_empty(out: Path) -> None:
    """A new run needs `out` absent or empty."""
    if has_entries(out):
        raise RunError(f"run directory {out} already exists and is not empty: pass --resume to continue it, "
                       "or choose a new --out")


def require_run(run: Path) -> Path:
    """`run` if it is a head run directory, else a RunError that says what is there instead."""
    run = Path(run)
    if run.is_file():
        hint = f": pass its folder, --run {run.parent}" if (run.parent / CONFIG).is_file() else ""
        raise RunError(f"run {run} is a file, not a run directory{hint}")
    if not run.exists():
        raise RunError(f"run directory {run} does not exist")
    if not run.is_dir():
        raise RunError(f"run {run} is not a directory")
    if not (run / CONFIG).is_file():
        raise RunError(f"{run} is not a head run directory (no {CONFIG}){_what_else(run)}")
    return run


def _what_else(folder: Path) -> str:
    """What a folder without config.json looks like it is, for the error that refuses it as a run."""
    if (folder / "zarr.json").is_file():
        return ": it is a Zarr store (a cache? pass it as --cache)"
    if (folder / CONFIG).exists():
        return f" ({CONFIG} is not a file)"
    return ""


def remove_run_files(out: Path) -> None:
    """Remove the files a run writes (and their temporary names) from `out`, nothing else: for a new run
    that completed no epoch, so that what is left does not look like a run."""
    out = Path(out)
    for name in (CONFIG, HEAD, BEST, METRICS, STATE):
        for path in (out / name, out / f".{name}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    shutil.rmtree(out / TENSORBOARD, ignore_errors=True)


# ---- one trainer per directory ------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory, held while a trainer writes it; `release()` when done.

    The lock is `flock` on the directory itself, not a lock file: a run directory gains no extra
    file and nothing is left next to it (cache/lock.py's lock file beside a store would be one more
    entry in the user's runs folder), and unlike its POSIX record locks, `flock` also keeps apart two
    trainers in one process (the Python API). The kernel drops it when the process ends, however it
    ends, so a killed trainer leaves no stale lock. A file system that cannot lock a directory (some
    NFS setups) is said so on stderr, and training goes on unguarded.
    """

    def __init__(self, folder: Path, warn: bool = True):
        self.folder = Path(folder)
        self._fd: int | None = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"run directory {self.folder} is being written by another training process right "
                               "now: wait for it to finish, or choose another --out") from None
            if warn:
                print(f"warning: cannot lock run directory {self.folder} ({os.strerror(exc.errno or 0)}): "
                      "a second trainer on it would not be detected", file=sys.stderr, flush=True)

    @classmethod
    def refuse_if_held(cls, folder: Path) -> None:
        """The RunError of a folder another trainer holds now (checked early, before any other)."""
        if Path(folder).is_dir():
            cls(folder, warn=False).release()

    def release(self) -> None:
        # unlock explicitly: DataLoader workers forked meanwhile hold copies of the descriptor, and
        # closing ours alone would leave the lock held until they exit
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ---- atomic writes ------------------------------------------------------------------------------
def _replace_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`: a failed write (a full disk) removes `tmp`, leaves `path` as it
    was, and is a `RunWriteError` (one line: the run, the file, what to do)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600: give the mode open() would
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise _write_error(path, exc) from None


# safetensors reports an I/O error in words: "I/O error: No space left on device (os error 28)"
# (older versions: "IoError(Os { code: 28, kind: StorageFull, ... })")
_RUST_OS_CODE = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def _write_error(path: Path, exc: Exception) -> RunWriteError:
    code = getattr(exc, "errno", None)
    if code is None:
        found = _RUST_OS_CODE.search(str(exc))
        code = int(found.group(1) or found.group(2)) if found else errno.EIO
    return write_failed(path, code)


RUN_FILES = (CONFIG, HEAD, BEST, METRICS, STATE)
RESUME_ADVICE = "the epochs completed before are kept: {remedy}, then rerun the same command with --resume"


def write_failed(path: Path, code: int, advice: str = RESUME_ADVICE) -> RunWriteError:
    """A failed write of `path` (errno `code`) in one line. A run's own file names the run and how to resume
    (`advice`, its remedy left as `{remedy}`: --resume for refseg-train-head; a sweep resumes by its own
    command); any other file (an evaluation's JSON, a sweep's summary) says that nothing of it was kept.
    `.written` is `path`, `.code` the errno (kept where the exception is pickled: a sweep's processes)."""
    path = Path(path)
    cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    remedy = "free space" if code in (errno.ENOSPC, errno.EDQUOT) else "fix the disk or choose another folder"
    if path.name in RUN_FILES:
        err = RunWriteError(f"writing run {path.parent} failed: {cause} at {path}; {advice.format(remedy=remedy)}")
    else:
        err = RunWriteError(f"writing {path} failed: {cause}; nothing of it was kept (a file there before is "
                            f"whole): {remedy}, then run the command again")
    err.errno, err.code, err.written = code, code, path
    return err


_umask_guard = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"^Umask:\s*([0-7]+)$", f.read(), re.M)
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    with _umask_guard:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    def write(tmp):
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    _replace_atomically(Path(path), write)


def write_text(path: Path, text: str) -> None:
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(text))


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _replace_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ---- reading ------------------------------------------------------------------------------------
def read_config(run: Path) -> dict:
    path = require_run(run) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not valid JSON ({exc})") from None
    for key in ("head", "head_args", "spec", "noise_t", "cache"):
        if key not in cfg:
            raise RunError(f"{path} lacks {key!r}: not a refseg head run (or from an incompatible version)")
    return cfg


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint; anything else (a pickle, a truncated file) is a RunError."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"checkpoint {path} is not a valid safetensors file ({' '.join(str(exc).split())})") from None


def checkpoint_path(run: Path, checkpoint: str) -> tuple[Path, str]:
    """The weights file for `checkpoint` ("best" | "last") and the name actually used.

    `best` falls back to `last` when the run had no val cache (then there is no best epoch).
    """
    if checkpoint not in CHECKPOINTS:
        raise RunError(f"unknown checkpoint {checkpoint!r} (choose best or last)")
    run = require_run(run)
    path = run / CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not path.exists() and (run / HEAD).exists():
        return run / HEAD, "last"
    if not path.exists():
        others = sorted(p.name for p in run.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"))
        hint = f" (found {', '.join(others)}: only safetensors checkpoints are read)" if others else \
            " (no epoch has completed yet?)"
        raise RunError(f"run {run} has no {path.name}{hint}")
    return path, checkpoint


def first_mismatch(exc: RuntimeError) -> str:
    """The first line of torch's load_state_dict error that names a tensor (it lists them all)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)


# ---- metrics.jsonl ------------------------------------------------------------------------------
def append_metrics(run: Path, record: dict) -> None:
    path = Path(run) / METRICS
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a line cut short is left out by read_metrics, and dropped on --resume
        raise _write_error(path, exc) from None


def read_metrics(run: Path) -> list[dict]:
    """The logged records; a last line cut short by a failed write (no newline yet) is left out."""
    path = Path(run) / METRICS
    if not path.exists():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    try:
        return [json.loads(line) for line in lines]
    except ValueError as exc:
        raise RunError(f"{path} is not a metrics log (a line is not JSON: {exc})") from None


def truncate_metrics(run: Path, last_epoch: int) -> None:
    """Keep the lines of epochs <= last_epoch (a run killed after logging but before saving state)."""
    records = [r for r in read_metrics(run) if r.get("epoch", 0) <= last_epoch]
    _replace_atomically(Path(run) / METRICS,
                        lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))


# ---- training state -----------------------------------------------------------------------------
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (everything else)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_state(run: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_info = optimizer_to_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"training_state": json.dumps(dict(info, optimizer=opt_info))}
    save_weights(Path(run) / STATE, tensors, metadata=meta)


def completed_epoch(run: Path) -> int:
    """The last epoch whose state was saved (what --resume continues after); 0 when none was. Reads
    the state's JSON header only, not its tensors."""
    path = Path(run) / STATE
    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return int(json.loads(meta["training_state"])["epoch"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return 0  # an unreadable state: as if none (a resume then says what is wrong with it)


def load_state(run: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """-> (info, model_state_dict, optimizer_state_dict, rng tensors) from `RUN/state.safetensors`."""
    path = Path(run) / STATE
    if not path.exists():
        raise RunError(f"run {run} has no {STATE}: no epoch completed, nothing to resume (start it again "
                       "without --resume in an empty directory)")
    tensors = load_weights(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "training_state" not in meta:
        raise RunError(f"{path} has no training state header")
    info = json.loads(meta["training_state"])
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_sd = optimizer_from_tensors(tensors, info.pop("optimizer"))
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return info, model_sd, opt_sd, rng
