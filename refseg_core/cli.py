"""The command wrapper: what every refseg command does the same way (`user_errors`).

- User errors become one line on stderr and exit 2 (`fail`, `user_errors`); an OSError says whether
  the path or the disk is at fault (`refseg.core.os_errors`).
- Ctrl-C prints what was kept and how to go on, and exits 130; SIGTERM the same, exit 143. What a
  command keeps is its module's `ON_INTERRUPT` (a `Resumable`); a command without one keeps nothing.
- `--threads N` and `--quiet` exist on every command (`user_errors` adds them; `RuntimeSettings`).
- Progress lines and warnings go to stderr (`say`, `warn`).

A command's options are generated from its settings dataclass by `refseg.core.options`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field

import click

from refseg.core.errors import RefsegError
from refseg.core.options import cli, dataclass_options
from refseg.core.os_errors import describe_os_error, is_path_error

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
@dataclass(frozen=True)
class Resumable:
    """What a command keeps when it is interrupted, and how to go on: the `ON_INTERRUPT` of the module
    holding its command body. `kept` may name `{out}` (the --out given); `how` is "rerun" (the same
    command resumes) or the option to add (e.g. "--resume"). A module without one keeps nothing of use."""

    kept: str
    how: str = "rerun"


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
    """What `user_errors` prints on Ctrl-C: what was kept (the `ON_INTERRUPT` of `module`, the command
    body's), and the command that goes on from there."""
    resumable = vars(importlib.import_module(module)).get("ON_INTERRUPT")
    if resumable is None:
        return "interrupted: nothing was kept"
    out = options.get("out") or "the output"
    extra = None if resumable.how == "rerun" else resumable.how
    again = command_line(ctx, extra) if ctx else "the same command" + (f" with {extra}" if extra else "")
    return f"interrupted: {resumable.kept.format(out=out)}; to resume, run: {again}"


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
