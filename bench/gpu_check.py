"""The GPU check (issue 16): correctness, end to end at real size, throughput, under a hard budget.

    bench/gpu_check.sh            # on a GPU machine (installs what it lacks from .whl/ first)
    bench/gpu_check.sh --tiny     # the same steps at tiny size on the CPU (tests/test_gpu_check.py)

Steps, most important first. Each has a time budget; a command that outruns it is killed (its whole
process group) and recorded as timed out, and the check goes on with the next step. Once the whole
budget (--budget) is spent, the steps left are recorded as skipped. gpu_check.json and gpu_check.md
are rewritten after every step, so a run stopped from outside still returns what it measured.

  a  correctness: `pytest -m gpu` (tests/test_gpu.py: capture on CUDA against CPU fp32, in fp32 and
     bf16; UNet output unchanged by the capture; pipelined host copies write the same cache bytes;
     tests/test_joint_capture.py: the same for the SD3/FLUX joint-attention capture)
  b  end to end through the CLI at real size: a random-weight SD1.5 diffusers folder, refseg-data
     synth, refseg-extract (T = 0, 5, 500), refseg-train-head vpd and film (1 epoch, bf16 autocast),
     refseg-eval; then the same training under torchrun (NCCL, SyncBatchNorm) against the one-process
     weights. Per stage: seconds, samples/s, peak GPU memory (torch allocator), peak host RSS; cache
     bytes per sample against FeatureSpec (the README's disk table)
  c  throughput: bench/extract.py (capture on/off, batch 8 and 32, channels_last), torch.compile
     (whole UNet), the host-copy overlap end to end, bench/train.py's cached vs in-loop ratio, then
     CUDA graphs while budget remains
  d  VPD's tiny fixture imported, extracted and scored in fp32 and bf16, float32 and float16 caches
  e  the sweep: K heads trained in one pass against K solo runs
  f  the backbone families' FLOPs, samples/s and peak memory at 1024 px (random weights)
  g  the demo's study (film and its no-sentence baseline × T × 3 seeds) past the CPU budget: 3000
     training sentences from 2800 images, 10 epochs, ~2,200 val sentences (bench/demo_scale.py)

Outputs in $OUT (else gpu-out/): gpu_check.json, gpu_check.md, gpu_check.log.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {  # what each mode runs: the real check, and the CPU rehearsal that keeps the script from rotting
    "full": dict(device="cuda", arch="sd15", image_size=512, tokens=40, images=100, limit=None, extract_batch=16,
                 train_batch=8, hidden=640, budget=450),
    "tiny": dict(device="cpu", arch="tiny", image_size=64, tokens=16, images=8, limit=12, extract_batch=4,
                 train_batch=4, hidden=16, budget=400),
}
NOISE_TS = (0, 5, 500)
TRAIN_T = 5


@dataclass
class Command:
    label: str
    argv: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    stats: dict = field(default_factory=dict)  # from --measure: peak GPU memory, host RSS

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class Check:
    """The run's state: sizes, folders, deadline, and every figure so far (written after each step)."""

    def __init__(self, mode: str, out: Path, budget: float):
        self.mode, self.size = mode, SIZES[mode]
        self.out = out
        self.work = Path(tempfile.mkdtemp(prefix="refseg-gpu-check-"))
        self.deadline = time.monotonic() + budget
        self.py = sys.executable
        self.log = open(out / "gpu_check.log", "a", encoding="utf-8")
        self.measured = 0
        self.results: dict = {"mode": mode, "budget_s": budget, "machine": machine(), "steps": {},
                              "command": " ".join(["bench/gpu_check.sh", *sys.argv[1:]]),
                              "install_s": float(os.environ.get("GPU_CHECK_INSTALL_SECONDS", "0"))}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, label: str, argv: list[str], timeout: float, env: dict | None = None,
            measure: bool = False) -> Command:
        """Run one command in its own process group, killed at `timeout` or at the deadline."""
        cmd = Command(label, [str(a) for a in argv])
        if measure:  # run the console script inside this file's --measure wrapper
            self.measured += 1
            stats_path = self.work / f"stats-{self.measured}.json"
            cmd.argv = [self.py, str(Path(__file__)), "--measure", str(stats_path), *cmd.argv]
        limit = max(1.0, min(timeout, self.left()))
        self.log.write(f"\n$ {' '.join(cmd.argv)}   # {label}, limit {limit:.0f} s\n")
        self.log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd.argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            cmd.returncode = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            cmd.timed_out = True
        cmd.seconds = time.monotonic() - start
        self.log.write(f"# -> exit {cmd.returncode}{' (killed: time limit)' if cmd.timed_out else ''}, "
                       f"{cmd.seconds:.1f} s\n")
        self.log.flush()
        if measure and stats_path.exists():
            cmd.stats = json.loads(stats_path.read_text())
        return cmd

    def log_lines(self) -> list[str]:
        return (self.out / "gpu_check.log").read_text(encoding="utf-8", errors="replace").splitlines()

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))
        from bench.gpu_check_report import markdown

        (self.out / "gpu_check.md").write_text(markdown(self.results))


def machine() -> dict:
    import platform

    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    for name in ("diffusers", "transformers", "zarr", "numpy"):
        try:
            facts[name] = __import__(name).__version__
        except ImportError:
            facts[name] = None
    return facts


def record(check: Check, step: str, commands: list[Command], **figures) -> dict:
    entry = {"status": "ok" if all(c.ok for c in commands) else
             "timed out" if any(c.timed_out for c in commands) else "failed",
             "commands": [{"label": c.label, "seconds": round(c.seconds, 2), "exit": c.returncode,
                           "timed_out": c.timed_out, **c.stats} for c in commands], **figures}
    check.results["steps"][step] = entry
    check.save()
    return entry


# ---- a: correctness -----------------------------------------------------------------------------
def step_tests(check: Check) -> None:
    figures_path = check.work / "test-figures.jsonl"
    cmd = check.run("pytest -m gpu", [check.py, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                                      "tests/test_gpu.py", "tests/test_joint_capture.py"], timeout=120, env={"GPU_CHECK_FIGURES": str(figures_path)})
    summary = next((line for line in reversed(check.log_lines()) if " in " in line and ("passed" in line or
                    "failed" in line or "skipped" in line or "error" in line)), "")
    figures = [json.loads(x) for x in figures_path.read_text().splitlines()] if figures_path.exists() else []
    record(check, "a. correctness (pytest -m gpu)", [cmd], summary=summary.strip("= "), figures=figures)


# ---- b: end to end through the CLI ----------------------------------------------------------------
def step_end_to_end(check: Check) -> None:
    s, w = check.size, check.work
    model, data = w / "model", w / "data"
    caches = {split: w / f"{split}.zarr" for split in ("train", "val")}
    cmds = [check.run("save a random-weight model folder", [check.py, "bench/models.py", s["arch"], model,
                                                            "--device", s["device"]], timeout=90)]
    cmds.append(check.run("refseg-data synth", ["refseg-data", "synth", "--out", data, "--images", s["images"],
                                                "--image-size", s["image_size"]], timeout=60, measure=True))
    for split, path in caches.items():
        argv = ["refseg-extract", "--data-root", data, "--dataset", "refcoco-synth", "--split", split,
                "--model", model, *[x for t in NOISE_TS for x in ("--noise-t", t)], "--image-size", s["image_size"],
                "--token-length", s["tokens"], "--batch-size", s["extract_batch"], "--device", s["device"],
                "--out", path, "--quiet"]
        if s["limit"]:
            argv += ["--limit", s["limit"]]
        if s["device"] == "cuda":
            argv += ["--dtype", "bf16"]
        cmds.append(check.run(f"refseg-extract {split} (T = {', '.join(map(str, NOISE_TS))})", argv, timeout=150,
                              measure=True))
    runs = {}
    for head in ("vpd", "film"):
        runs[head] = w / "runs" / head
        cmds.append(check.run(f"refseg-train-head {head} (1 epoch)", train_argv(check, caches, head, runs[head]),
                              timeout=90, measure=True))
    for head, run in runs.items():
        cmds.append(check.run(f"refseg-eval {head}", ["refseg-eval", "--run", run, "--cache", caches["val"],
                                                      "--device", s["device"], "--json", w / f"eval-{head}.json"],
                              timeout=60, measure=True))
    figures = {"samples": samples_per_split(caches), "cache_bytes": cache_bytes(caches["train"]),
               "eval": {h: read_json(w / f"eval-{h}.json") for h in runs}}
    record(check, "b. end to end through the CLI", cmds, **figures)
    step_torchrun(check, caches, runs["vpd"])


def train_argv(check: Check, caches: dict, head: str, out: Path) -> list:
    s = check.size
    return ["refseg-train-head", "--cache", caches["train"], "--val-cache", caches["val"], "--noise-t", TRAIN_T,
            "--head", head, "--out", out, "--epochs", 1, "--batch-size", s["train_batch"], "--hidden", s["hidden"],
            "--device", s["device"], "--seed", 0]


def step_torchrun(check: Check, caches: dict, solo_run: Path) -> None:
    """The DDP path (NCCL and SyncBatchNorm on CUDA) with one rank: the weights a single process gets."""
    out = check.work / "runs" / "vpd-torchrun"
    argv = ["torchrun", "--standalone", "--nproc_per_node", "1", "--no-python", *train_argv(check, caches, "vpd", out)]
    cmd = check.run("torchrun refseg-train-head vpd (1 rank)", argv, timeout=90)
    figures = {}
    if cmd.ok:
        figures["weight_difference_vs_one_process"] = weight_difference(solo_run, out)
    record(check, "b. torchrun (DDP, NCCL on CUDA)", [cmd], **figures)


def weight_difference(a: Path, b: Path) -> dict:
    """How far two runs' saved tensors are apart: the largest absolute difference, and the largest
    relative one (||a - b|| / ||a|| per tensor), which is what to judge: BatchNorm running variances are
    large numbers, so a max absolute difference alone overstates a tiny relative one."""
    import numpy as np
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a / "head.safetensors")), load_file(str(b / "head.safetensors"))
    assert wa.keys() == wb.keys(), "the two runs saved different tensors"
    absolute, relative = {}, {}
    for k in wa:
        x, y = wa[k].astype("float64"), wb[k].astype("float64")
        absolute[k] = float(np.abs(x - y).max()) if x.size else 0.0
        relative[k] = float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
    worst = max(relative, key=relative.get)
    return {"max_abs": max(absolute.values()), "max_relative": relative[worst], "worst_tensor": worst}


def samples_per_split(caches: dict) -> dict:
    from refseg.cache import open_cache

    return {split: open_cache(str(p)).n_samples for split, p in caches.items() if p.exists()}


def cache_bytes(path: Path) -> dict:
    """Bytes on disk per sample of each noise group, against FeatureSpec.bytes_per_sample()."""
    from refseg.cache import open_cache

    if not path.exists():
        return {}
    cache = open_cache(str(path))
    out = {"spec_bytes_per_sample": cache.spec.bytes_per_sample()}
    for group in sorted(path.glob("t[0-9][0-9][0-9][0-9]")):
        size = sum(f.stat().st_size for f in group.rglob("*") if f.is_file())
        out[f"{group.name}_bytes_per_sample"] = size / cache.n_samples
    return out


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# ---- c: throughput --------------------------------------------------------------------------------
BENCHES = {  # name -> (mode -> arguments, step budget in s); run in this order while budget remains
    "c. extraction throughput (bench/extract.py)": (
        {"full": ["--arch", "sd15", "--batch-sizes", "8,32", "--channels-last", "both",
                  "--variants", "unet,capture,capture+host,vae,text"],
         "tiny": ["--arch", "tiny", "--image-size", "64", "--batch-sizes", "2", "--repeats", "1",
                  "--variants", "unet,capture+host", "--pipeline-images", "0"]}, 150),
    "c. torch.compile, whole UNet (bench/extract.py --compile on)": (
        {"full": ["--arch", "sd15", "--batch-sizes", "32", "--compile", "both", "--compile-scope", "unet",
                  "--variants", "capture,capture+host"]}, 150),
    "c. host-copy overlap end to end (bench/extract.py --pipeline-images)": (
        {"full": ["--arch", "sd15", "--batch-sizes", "32", "--channels-last", "on", "--variants", "capture+host",
                  "--pipeline-images", "12", "--repeats", "2"],
         "tiny": ["--arch", "tiny", "--image-size", "64", "--batch-sizes", "2", "--repeats", "1",
                  "--variants", "capture+host", "--pipeline-images", "2"]}, 120),
    "c. cached vs in-loop training (bench/train.py)": (
        {"full": ["--arch", "sd15", "--workers", "4", "--repeats", "3", "--cached-readers", "direct,preload"],
         "tiny": ["--arch", "tiny", "--image-size", "64", "--images", "4", "--samples", "8", "--repeats", "1",
                  "--cached-readers", "direct", "--batch-size", "4"]}, 120),
    "c. torch.compile, the capture alone at batch 32 and 64 (bench/extract.py --compile on)": (
        {"full": ["--arch", "sd15", "--batch-sizes", "32,64", "--compile", "both", "--compile-scope", "unet",
                  "--channels-last", "on", "--variants", "capture"]}, 150),
    "c. store write path on the host, stand-in denoiser (bench/write.py)": (
        {"full": ["--samples", "96", "--shard-sizes", "16,8", "--repeats", "2"],
         "tiny": ["--image-size", "64", "--samples", "8", "--shard-sizes", "4", "--repeats", "1", "--no-tmpfs",
                  "--engines", "tensorstore"]}, 90),
    "c. CUDA graphs (torch.compile mode reduce-overhead)": (
        {"full": ["--arch", "sd15", "--batch-sizes", "32", "--channels-last", "on", "--compile", "on",
                  "--compile-scope", "unet", "--compile-mode", "reduce-overhead", "--variants", "capture+host"]}, 240),
}


# ---- d, e, f, g: the later issues' checks: each script prints one JSON object per line, collected here --------
SCRIPTS = {  # name -> (script, mode -> arguments, step budget in s)
    "d. VPD fixture in fp32 and bf16 (bench/vpd_fixture.py)": (
        # not in tiny mode: tests/test_vpd_import.py runs its fp32 variant on the CPU
        "bench/vpd_fixture.py", {"full": []}, 120),
    "e. sweep: K heads in one pass vs K solo runs (bench/sweep.py)": (
        "bench/sweep.py", {"full": ["--quick", "--no-append"],
                           "tiny": ["--quick", "--no-append", "--heads", "2", "--cases", "sd15-disk"]}, 120),
    "f. backbone families at 1024 px, random weights (bench/families.py)": (
        "bench/families.py", {"full": [], "tiny": ["--tiny"]}, 240),
    "g. the demo's study at 5x the data, 10 epochs, 6.6x the val set (bench/demo_scale.py)": (
        "bench/demo_scale.py", {"full": [], "tiny": ["--tiny"]}, 420),
}


def step_script(check: Check, name: str) -> None:
    script, args_by_mode, budget = SCRIPTS[name]
    if check.mode not in args_by_mode or not (REPO / script).exists():
        why = f"not run in {check.mode} mode" if (REPO / script).exists() else f"{script} is not in this checkout"
        check.results["steps"][name] = {"status": "skipped", "why": why}
        return
    lines = check.work / f"script-{len(check.results['steps'])}.jsonl"
    argv = ["bash", "-c", 'out="$1"; shift; "$@" > "$out"', "_", lines, check.py, script,
            *args_by_mode[check.mode], "--device", check.size["device"]]
    cmd = check.run(name, argv, timeout=budget)
    rows = []
    for line in (lines.read_text().splitlines() if lines.exists() else []):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a script's own progress text
    record(check, name, [cmd], results=rows)


def step_bench(check: Check, name: str) -> None:
    args_by_mode, budget = BENCHES[name]
    if check.mode not in args_by_mode:
        check.results["steps"][name] = {"status": "skipped", "why": f"not run in {check.mode} mode"}
        return
    script = name[name.index("(bench/") + 1:].split(" ")[0].rstrip(")")  # the script the step names
    json_out = check.work / f"bench-{len(check.results['steps'])}.json"
    argv = [check.py, script, *args_by_mode[check.mode], "--device", check.size["device"], "--no-append",
            "--json", json_out]
    cmd = check.run(name, argv, timeout=budget)
    record(check, name, [cmd], bench=read_json(json_out))


# ---- main -----------------------------------------------------------------------------------------
STEPS = ([("a", step_tests), ("b", step_end_to_end)] + [("c", name) for name in BENCHES]
         + [(name[0], name) for name in SCRIPTS])
MIN_SECONDS_TO_START = 20  # a step started with less than this left would only be killed


def measure(stats_path: str, argv: list[str]) -> None:
    """Run console script argv[0] in this process; write seconds, exit code, peak memory to stats_path."""
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == argv[0]]
    main = entry.load()
    start, code = time.perf_counter(), 0
    try:
        main.main(args=argv[1:], prog_name=argv[0], standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    stats = {"wall_s": round(time.perf_counter() - start, 2),
             "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    import torch

    if torch.cuda.is_initialized():
        stats["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    Path(stats_path).write_text(json.dumps(stats))
    sys.exit(code)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny backbone on the CPU (the rehearsal a test runs)")
    p.add_argument("--budget", type=float, default=None, help="seconds in all (default 450 full, 400 tiny)")
    p.add_argument("--only", default=None, help="comma list of steps to run: letters (a,b,c) or words of a step's name (compile)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (caches, runs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        measure(argv[1], argv[2:])
    args = parse_args(argv)
    mode = "tiny" if args.tiny else "full"
    out = Path(os.environ.get("OUT") or REPO / "gpu-out")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(mode, out, args.budget or SIZES[mode]["budget"])
    only = args.only.split(",") if args.only else None
    try:
        for letter, step in STEPS:
            name = step if isinstance(step, str) else step.__name__
            if only and not any(x == letter or (len(x) > 1 and x in name) for x in only):
                continue
            if check.left() < MIN_SECONDS_TO_START:
                check.results["steps"][name] = {"status": "skipped", "why": "the check's time budget was spent"}
                continue
            if isinstance(step, str):
                (step_script if step in SCRIPTS else step_bench)(check, step)
            else:
                step(check)
    finally:
        check.results["total_s"] = round(time.monotonic() - (check.deadline - check.results["budget_s"]), 1)
        check.save()
        if not args.keep_work:
            shutil.rmtree(check.work, ignore_errors=True)
    print((out / "gpu_check.md").read_text())
    return 0 if all(s.get("status") in ("ok", "skipped") for s in check.results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
