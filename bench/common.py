"""What every benchmark script shares: machine facts, timing, FLOP counting, tables, BENCHMARKS.md.

Rules the scripts follow (the project's benchmark standard):
  - variants are compared inside ONE run, repeats interleaved (A B A B ...), medians reported, and the
    headline figure is a ratio of two medians taken under the same load;
  - every table is printed and appended to BENCHMARKS.md with the machine (nproc, CPU model, GPU),
    the date, the torch/zarr/diffusers versions, the exact command and the load average.
GPU times come from CUDA events around the timed calls (after a synchronize); CPU times from
time.perf_counter.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from refseg.core.device import resolve_device  # noqa: F401  (the scripts call common.resolve_device)

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"


# ---- machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("zarr", "numpy", "diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def gpu_name(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"


class RunInfo:
    """Facts recorded with every table: taken when the run starts; `finish()` adds the end load."""

    def __init__(self, device: torch.device):
        self.device = device
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
        self.load_start = load_average()
        self.load_end = None
        self.t0 = time.perf_counter()
        self.seconds = None

    def finish(self) -> None:
        self.load_end = load_average()
        self.seconds = time.perf_counter() - self.t0

    def lines(self) -> list[str]:
        v = versions()
        machine = f"{os.cpu_count()} CPUs (nproc), {cpu_model()}"
        if gpu_name(self.device):
            machine += f"; GPU {gpu_name(self.device)}"
        out = [
            f"- date: {self.date}",
            f"- machine: {machine}; torch threads {torch.get_num_threads()}",
            "- versions: " + ", ".join(f"{k} {v[k]}" for k in v),
            f"- command: `{self.command}`",
            f"- load average (1/5/15 min): {self.load_start} at start"
            + (f", {self.load_end} at end" if self.load_end else ""),
        ]
        if self.seconds is not None:
            out.append(f"- wall time of the run: {self.seconds:.0f} s")
        return out


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


# ---- timing -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, calls: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `calls` back-to-back calls (CUDA events on a GPU)."""
    if device.type == "cuda":
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / calls
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def interleaved(variants: dict, device: torch.device, *, repeats: int = 5, warmup: int = 2,
                min_time: float = 0.05, on_error=None) -> dict[str, list[float] | str]:
    """Time every variant `repeats` times, round-robin (A B C A B C ...), so load changes hit all alike.

    Each timed sample is a run of back-to-back calls lasting at least ~`min_time` seconds (calibrated
    in the warm-up); returns {name: [seconds per call, ...]}, or {name: "error text"} for a variant
    that failed (the others go on: a lever that does not work here is a row, not a crash).
    """
    calls, times = {}, {}

    def failed(name, exc):
        times[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if on_error:
            on_error(name, exc)

    for name, fn in variants.items():
        try:
            for _ in range(max(0, warmup - 1)):
                fn()
            t = time_calls(fn, 1, device)
            calls[name] = max(1, int(min_time / max(t, 1e-9)))
            times[name] = []
        except Exception as exc:
            failed(name, exc)
    for _ in range(repeats):
        for name, fn in variants.items():
            if isinstance(times[name], list):
                try:
                    times[name].append(time_calls(fn, calls[name], device))
                except Exception as exc:
                    failed(name, exc)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    """min–max of the repeats relative to the median, e.g. '±4%'."""
    m = median(xs)
    if len(xs) < 2 or m == 0:
        return ""
    return f"±{100 * max(m - min(xs), max(xs) - m) / m:.0f}%"


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s for `dtype` on `device` (median of repeats): the MFU denominator."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    fn = lambda: torch.matmul(a, b, out=out)  # noqa: E731
    t = interleaved({"mm": fn}, device, repeats=repeats, warmup=3, min_time=0.2)["mm"]
    return 2 * n**3 / median(t)


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (torch.utils.flop_counter: matmuls, convolutions, SDPA; 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- tables -------------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value == 0:
            return "0"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


class Table:
    def __init__(self, columns: list[str]):
        self.columns = list(columns)
        self.rows: list[dict] = []

    def add(self, **row) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"unknown columns {sorted(unknown)}")
        self.rows.append(row)

    def as_dict(self) -> dict:
        """The table as plain data (bench/gpu_check.py collects these): numbers stay numbers."""
        return {"columns": self.columns, "rows": [{c: row.get(c) for c in self.columns} for row in self.rows]}

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(row.get(c)) for c in self.columns) + " |")
        return "\n".join(lines)


def publish(title: str, info: RunInfo, sections: list, notes: list[str] = (), append: bool = True,
            json_out: str | None = None) -> str:
    """Print a benchmark's result and append it to BENCHMARKS.md (and, with `json_out`, write it as JSON).

    `sections` is a list of (caption, Table or str). Returns the markdown text.
    """
    info.finish()
    parts = [f"### {title} ({info.date})", "", *info.lines(), ""]
    for caption, body in sections:
        if caption:
            parts += [f"**{caption}**", ""]
        parts += [body.markdown() if isinstance(body, Table) else str(body), ""]
    if notes:
        parts += [f"- {n}" for n in notes] + [""]
    text = "\n".join(parts)
    print("\n" + text, flush=True)
    if append:
        with open(BENCHMARKS, "a", encoding="utf-8") as f:
            f.write("\n" + text)
        print(f"(appended to {BENCHMARKS})", flush=True)
    if json_out:
        write_json(json_out, title, info, sections, notes)
    return text


def write_json(path: str, title: str, info: RunInfo, sections: list, notes) -> None:
    import json

    body = {"title": title, "info": info.lines(), "notes": list(notes),
            "sections": [{"caption": c, **(b.as_dict() if isinstance(b, Table) else {"text": str(b)})}
                         for c, b in sections]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1, default=str)


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the dev machine's 2 cores are shared)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    parser.add_argument("--no-append", action="store_true", help="print the table only; leave BENCHMARKS.md alone")
    parser.add_argument("--json", default=None, help="also write the tables to this JSON file (bench/gpu_check.py)")
