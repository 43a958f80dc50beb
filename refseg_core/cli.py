"""Shared command-line plumbing: what every refseg command does the same way.

- User errors become one line on stderr and exit 2 (`fail`, `user_errors`).
- Ctrl-C prints what was kept and how to go on, and exits 130; SIGTERM the same, exit 143 (`user_errors`).
- `--threads N` and `--quiet` exist on every command (`user_errors` adds them; `RuntimeSettings`).
- Options are generated from a settings dataclass (`dataclass_options`, `cli`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field

import click
from refseg.core.errors import RefsegError

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
TERMINATED_EXIT = 143  # 128 + SIGTERM, what SLURM and `kill` send to stop (or preempt) a job


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as Ctrl-C does: writes in flight
    finish or are dropped whole, locks are released, and the command says what was kept."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the body runs, SIGTERM raises `Terminated` (only in the main thread, where Python runs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(message: str) -> None:
    """Print `error: message` on one line to stderr and exit 2."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    click.echo(f"error: {line}", err=True)
    sys.exit(USER_ERROR_EXIT)


def warn(message: str) -> None:
    """Print `warning: message` on one line to stderr (shown even with --quiet: it is not progress)."""
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


def say(message: str, enabled: bool | None = None) -> None:
    """A line of progress, or a command's last line naming what it wrote (`wrote DIR: ...`): on stderr, so
    that stdout holds a command's results alone. `enabled` None: the running command's --quiet decides."""
    if current_runtime().progress if enabled is None else enabled:
        click.echo(" ".join(str(message).split()), err=True)


# ---- OS errors, said in the user's terms ---------------------------------------------------------
# A bad path or a missing permission is fixed by choosing another path; a full or failing disk by
# freeing space or repairing it. The errno says which, and the advice must match it.
PATH_ERRNOS = {
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EEXIST: "it exists already",
}


def is_path_error(exc: OSError) -> bool:
    """Whether `exc` comes from the path itself (bad, forbidden, read-only), not from the disk's state."""
    return exc.errno in PATH_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """`exc` in one line: its cause in words, its errno name, the file it names."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    cause = PATH_ERRNOS.get(exc.errno) or " ".join(str(exc.strerror or exc).split())
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{cause}{' [' + code + ']' if code else ''}{where}"


# ---- options generated from a dataclass ---------------------------------------------------------
# One source for each default: a command's settings are a dataclass's fields, and its click options
# are generated from them, so a default or a help text is written once (at the field).


def cli(help: str = "", *, flag: str | None = None, type=None, multiple: bool = False,
        show_default=True) -> dict:
    """Field metadata saying how the field appears on the command line.

        batch_size: int = field(default=4, metadata=cli("Samples per forward pass."))

    `flag` overrides the option's name (default `--field-name`); `type` is a click type (default
    from the annotation: int, float, str, bool; `X | None` allows None); `multiple` repeats it;
    `show_default` may be a string, shown instead of the value (for a default that is computed).
    """
    return {"cli": {"help": help, "flag": flag, "type": type, "multiple": multiple, "show_default": show_default}}


_SCALARS = {"int": int, "float": float, "str": str}


def _click_type(annotation) -> type | None:
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    name = name.replace(" | None", "").replace("None | ", "").strip()
    return _SCALARS.get(name)


def dataclass_options(cls, *, skip=()):
    """Decorate a click command with one option per field of dataclass `cls` (except `skip`).

    A field without a default is a required option; a bool field is an `--x/--no-x` switch (an
    `is_flag` when its default is False and `flag` names one spelling). The command receives each
    value under the field's name, so `cls(**{f: opts[f] ...})` builds the settings.
    """

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            meta = f.metadata.get("cli", {})
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            kwargs = {"help": meta.get("help", ""), "show_default": meta.get("show_default", True)}
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs.update(required=True, show_default=False)
            else:
                kwargs["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            is_bool = _click_type(f.type) is None and str(f.type).startswith("bool")
            if is_bool and meta.get("flag"):
                fn = click.option(flag, f.name, is_flag=True, **kwargs)(fn)
            elif is_bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, **kwargs)(fn)
            else:
                kind = meta.get("type") or _click_type(f.type)
                fn = click.option(flag, f.name, type=kind, multiple=meta.get("multiple", False), **kwargs)(fn)
        return fn

    return decorate


# ---- the options every command has ---------------------------------------------------------------


def default_threads() -> int:
    """Torch CPU threads when --threads is not given: the cores this process may use, less one.

    Why not torch's own default (one per core): OpenMP's threads spin while they wait for each other,
    so when any other runnable thread shares the cores (refseg's own cache-writer thread or DataLoader
    workers, or another process) one of them is descheduled and every parallel region waits a
    scheduler slice for it; a small model then runs many times slower than on one thread (the cause
    and what to do: docs/TROUBLESHOOTING.md, "Extraction, datasets, models, and every command").
    Leaving one core to the rest avoids it; OMP_NUM_THREADS, when set, is taken as the user's choice.
    """
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


@dataclass
class RuntimeSettings:
    """How a command runs, whatever it does: CPU threads and progress output. Every command has these
    options (`user_errors` adds them); the running command's values are `current_runtime()`."""

    threads: int | None = field(default=None, metadata=cli(
        "Torch CPU threads (OMP_NUM_THREADS, when set, is the default).", show_default="usable cores - 1"))
    quiet: bool = field(default=False, metadata=cli("No progress bars or progress messages.", flag="--quiet"))

    @property
    def progress(self) -> bool:
        return not self.quiet

    def check(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise RefsegError(f"--threads must be at least 1 (got {self.threads})")


_RUNTIME = [RuntimeSettings()]  # the settings of the command running now (a stack: commands may nest in tests)


def current_runtime() -> RuntimeSettings:
    """The `--threads`/`--quiet` of the command running now (defaults outside a command)."""
    return _RUNTIME[-1]


@contextlib.contextmanager
def applied(runtime: RuntimeSettings):
    """Run the body with `runtime` in force: torch's thread count set (and restored after)."""
    runtime.check()
    threads = runtime.threads or default_threads()
    restore = None
    if "torch" in sys.modules:
        # only when the command has imported it already (it is heavy)
        import torch

        restore = torch.get_num_threads()
        torch.set_num_threads(threads)
    _RUNTIME.append(runtime)
    # torch not imported yet (refseg-data, refseg-cache): it reads these when the command imports it
    env = {} if restore is not None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield runtime
    finally:
        _RUNTIME.pop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if restore is not None:
            # only when the command has imported it already (it is heavy)
            import torch

            torch.set_num_threads(restore)


class _SharedOptions(list):
    """A command's `__click_params__`, started with the options every command shares.

    click's option decorators append to this list; an option the command declares itself under the
    same name (the demo's own `--threads` default) replaces the shared one, and is remembered in
    `own` so that its value still reaches the command.
    """

    def __init__(self, shared):
        super().__init__(shared)
        self.own: set[str] = set()

    def append(self, param) -> None:
        for i, existing in enumerate(self):
            if existing.name == param.name and param.name in _SHARED_NAMES:
                del self[i]
                self.own.add(param.name)
                break
        super().append(param)


_SHARED_NAMES = tuple(f.name for f in dataclasses.fields(RuntimeSettings))


# ---- Ctrl-C -------------------------------------------------------------------------------------
# What a command keeps when it is interrupted, and how to go on (by the module of its command body).
# Commands not listed keep nothing of use. "rerun": the same command resumes; else the argument to add.
RESUMABLE = {
    "refseg.extract.cli": ("the shards written so far are kept in {out}", "rerun"),
    "refseg.heads.cli_train": ("the epochs completed so far are kept in {out}", "--resume"),
    "refseg.heads.cli_sweep": ("the heads' completed epochs are kept under {out}", "rerun"),
    "refseg.study.cli": ("the caches and runs finished so far are kept under {out}", "rerun"),
}


def command_line(ctx: click.Context, extra: str | None = None) -> str:
    """The running command as a line to type again: its name and every option given (not defaulted),
    plus `extra` (a flag such as --resume) when it is not given already.

    Rebuilt from click's parsed values rather than sys.argv, which names the interpreter's own argv
    when a command is called from Python. A click type that converts text into something else says
    how to write it back with a `to_text(value)` method.
    """
    chain = []
    while ctx is not None:
        chain.append(ctx)
        ctx = ctx.parent
    words: list[str] = []
    for c in reversed(chain):
        words += shlex.split(c.info_name or "") if c is chain[-1] else [c.info_name]
        for param in c.command.params:
            source = c.get_parameter_source(param.name)
            if source is None or source in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP):
                continue
            words += _as_words(param, c.params.get(param.name))
    if extra and extra not in words:
        words.append(extra)
    return shlex.join(words)


def _as_words(param: click.Parameter, value) -> list[str]:
    def text(v) -> str:
        return param.type.to_text(v) if hasattr(param.type, "to_text") else str(v)

    if not isinstance(param, click.Option):
        return [text(v) for v in value] if param.multiple or param.nargs != 1 else [text(value)]
    if param.is_bool_flag:
        if value:
            return [param.opts[0]]
        return [param.secondary_opts[0]] if param.secondary_opts else []
    if param.multiple:
        return [w for v in value for w in (param.opts[0], text(v))]
    return [] if value is None else [param.opts[0], text(value)]


def interrupted_message(module: str, options: dict, ctx: click.Context | None) -> str:
    """What `user_errors` prints on Ctrl-C: what was kept, and the command that goes on from there."""
    if module not in RESUMABLE:
        return "interrupted: nothing was kept"
    kept, how = RESUMABLE[module]
    out = options.get("out") or "the output"
    extra = None if how == "rerun" else how
    again = command_line(ctx, extra) if ctx else "the same command" + (f" with {extra}" if extra else "")
    return f"interrupted: {kept.format(out=out)}; to resume, run: {again}"


# ---- the command body ---------------------------------------------------------------------------


def user_errors(fn):
    """Decorate a click command body (below the option decorators) so that it behaves as every refseg
    command does:

    - refseg's user errors (and bad paths, full disks) exit 2 with one line on stderr; programming
      errors still raise with a traceback: those are bugs to report, not user mistakes;
    - Ctrl-C says what was kept and how to resume, and exits 130 (not click's "Aborted!", exit 1);
      SIGTERM (SLURM's preemption, `kill`) says the same and exits 143;
    - `--threads N` and `--quiet` are added to the command and applied while it runs; the body
      receives them only if it names them as parameters (or declares its own option of that name).
    """
    signature = inspect.signature(fn).parameters
    # click reads (and then deletes) __click_params__, listing options in the reverse of its order:
    # the shared ones, first in the list, come last in --help
    shared = _SharedOptions(reversed(_runtime_options()))
    for param in getattr(fn, "__click_params__", []):  # options declared below this decorator, if any
        shared.append(param)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        own = shared.own
        runtime = RuntimeSettings(**{name: kwargs[name] for name in _SHARED_NAMES if name in kwargs})
        for name in _SHARED_NAMES:
            if name in kwargs and name not in own and name not in signature:
                del kwargs[name]
        try:
            with applied(runtime), sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except RefsegError as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (a preempted job): the same line, its own status
            click.echo(interrupted_message(fn.__module__, kwargs, click.get_current_context(silent=True)), err=True)
            sys.exit(TERMINATED_EXIT if isinstance(exc, Terminated) else INTERRUPTED_EXIT)
        except FileNotFoundError as exc:
            fail(f"file not found: {exc.filename or exc}")
        except PermissionError as exc:
            fail(f"permission denied: {exc.filename or exc}")
        except OSError as exc:
            # a bad path says so; ENOSPC / EIO and friends say what failed: what was written stays valid
            kind = "bad path" if is_path_error(exc) else "I/O error"
            fail(f"{kind}: {describe_os_error(exc)}")

    wrapper.__click_params__ = shared
    return wrapper


def _runtime_options() -> list:
    """The click options of `RuntimeSettings`, as `dataclass_options` makes them."""
    collected = click.command()(dataclass_options(RuntimeSettings)(lambda **_: None))
    return [p for p in collected.params if p.name in _SHARED_NAMES]
