"""gpu_check.json -> gpu_check.md: the GPU check's figures as markdown, ready for BENCHMARKS.md."""

from __future__ import annotations

import json

from bench.common import fmt

SAMPLE_WORK = {  # how many samples a stage's command processes: what its samples/s is of
    "refseg-extract train": ("train", 3), "refseg-extract val": ("val", 3),
    "refseg-train-head": ("train", 1), "refseg-eval": ("val", 1),
}


def table(columns: list[str], rows: list[dict]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return out + [""]


def stage_rows(step: dict, samples: dict) -> list[dict]:
    rows = []
    for c in step["commands"]:
        row = {"stage": c["label"], "exit": "killed (time limit)" if c["timed_out"] else c["exit"],
               "s": c.get("wall_s", c["seconds"]), "peak GPU MiB (torch)": c.get("peak_gpu_allocated_mib"),
               "peak host RSS MiB": c.get("peak_host_rss_mib")}
        for prefix, (split, per_sample) in SAMPLE_WORK.items():
            if c["label"].startswith(prefix) and samples.get(split) and c["exit"] == 0:
                row["samples/s"] = samples[split] * per_sample / row["s"]
                row["samples"] = f"{samples[split]}" + (" x 3 T" if per_sample == 3 else "")
        rows.append(row)
    return rows


def end_to_end(step: dict) -> list[str]:
    samples = step.get("samples", {})
    cols = ["stage", "exit", "s", "samples", "samples/s", "peak GPU MiB (torch)", "peak host RSS MiB"]
    lines = table(cols, stage_rows(step, samples))
    cb = step.get("cache_bytes") or {}
    if cb:
        spec = cb["spec_bytes_per_sample"]
        rows = [{"noise group": k.split("_")[0], "bytes on disk per sample": v, "FeatureSpec bytes per sample": spec,
                 "ratio": v / spec} for k, v in cb.items() if k != "spec_bytes_per_sample"]
        lines += table(["noise group", "bytes on disk per sample", "FeatureSpec bytes per sample", "ratio"], rows)
    evals = [{"head": h, **{k: ((e or {}).get("summary") or {}).get(k) for k in ("P@0.5", "oIoU", "mIoU", "n")}}
             for h, e in (step.get("eval") or {}).items()]
    if evals:
        lines += table(["head", "P@0.5", "oIoU", "mIoU", "n"], evals)
    return lines


def bench(step: dict) -> list[str]:
    data = step.get("bench")
    if not data:
        return []
    lines = [f"_{data['title']}_", ""]
    for section in data["sections"]:
        if section.get("caption"):
            lines += [f"{section['caption']}:", ""]
        lines += table(section["columns"], section["rows"]) if "columns" in section else [section["text"], ""]
    return lines + [f"- {n}" for n in data.get("notes", [])] + [""]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"### GPU check ({results['mode']}): {m.get('gpu', 'no GPU: ' + str(m['cpus']) + ' CPUs')} "
             f"({m['date']})", "",
             "- versions: " + ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "diffusers", "transformers",
                                                                  "zarr", "numpy") if m.get(k)),
             f"- command: `{results['command']}`; budget "
             f"{results['budget_s']:.0f} s, install {results['install_s']:.0f} s, steps "
             f"{results.get('total_s', '?')} s", ""]
    for name, step in results["steps"].items():
        lines += [f"**{name}**: {step['status']}" + (f" ({step['why']})" if step.get("why") else ""), ""]
        if step.get("summary"):
            lines += [f"pytest: {step['summary']}", ""]
        for fig in step.get("figures", []):
            values = ", ".join(f"{k} {fmt(v) if not isinstance(v, list) else v}" for k, v in fig.items() if k != "figure")
            lines.append(f"- {fig['figure']}: {values}")
        if step.get("figures"):
            lines.append("")
        if "weight_difference_vs_one_process" in step:
            d = step["weight_difference_vs_one_process"]
            lines += [f"- saved tensors against the one-process run: max relative difference {d['max_relative']:.3g} "
                      f"({d['worst_tensor']}), max absolute {d['max_abs']:.3g}", ""]
        if name.startswith("b. end to end"):
            lines += end_to_end(step)
        elif step.get("commands") and not step.get("bench"):
            lines += table(["stage", "exit", "s"], stage_rows(step, {}))
        lines += bench(step)
        for row in step.get("results", []):  # d, e, f: one JSON object per line of the script
            lines.append("- `" + json.dumps(row, default=str) + "`")
        if step.get("results"):
            lines.append("")
    return "\n".join(lines)
