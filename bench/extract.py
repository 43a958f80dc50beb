"""Extraction throughput against the FLOP limit (issue 6, item 1).

    python bench/extract.py                                  # tiny on CPU (the default; ~2 min on 2 cores)
    python bench/extract.py --arch sd15 --image-size 64      # SD1.5 architecture, CPU-sized (harness check)
    python bench/extract.py --arch sd15 --flops-only         # FLOPs of one SD1.5 sample at 512² (no compute)
    python bench/extract.py --arch sd15 --device cuda --batch-sizes 1,8,32 --channels-last both --compile both

What one run measures, in one process, with the variants' repeats interleaved:
  - FLOPs of one sample (torch.utils.flop_counter on a meta-device copy of the model, so SD1.5 at 512²
    costs nothing to count): VAE encoder, text encoder, UNet forward, UNet forward with capture;
  - the device's matmul peak in the run's dtype (bf16 on a GPU, fp32 on the CPU): the MFU denominator;
  - per batch size: samples/s of the plain UNet forward ("unet"), of UNetCapture.run ("capture": the
    features + attn2 maps, forward stopped after the last captured layer), of that plus the float16
    copy to host memory the writer needs ("capture+host"), of the VAE encoder and the text encoder;
    on the CPU also the pipeline's batch-invariant mode (backbone one sample at a time, so cache
    bytes do not depend on --batch-size) against the batched call;
  - MFU = (FLOPs of the variant's own work per sample x samples/s) / measured matmul peak;
  - optionally (--pipeline-images N) refseg-extract end to end (run_extraction on synthetic images:
    VAE, text, UNet, float16 conversion, Zarr writes) per batch size.
Levers (--channels-last, --compile) are configurations of the UNet; `both` measures off and on in
the same run, interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
import tempfile
import time
import types

import torch

# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the `extract`
# package: import from the repository root instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common, models  # noqa: E402

REFCOCO_SENTENCES_PER_IMAGE = 7.1  # RefCOCO: 142,210 sentences over 19,994 images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=models.ARCHS, default="tiny")
    p.add_argument("--image-size", type=int, default=None, help="default: 128 for tiny, 512 for sd15")
    p.add_argument("--token-length", type=int, default=40)
    p.add_argument("--batch-sizes", default=None, help="comma list; default 1,4,8 on CPU, 1,8,32 on GPU")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on GPU, fp32 on CPU (refseg-extract's defaults)")
    p.add_argument("--channels-last", choices=("off", "on", "both"), default="off")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off", help="torch.compile the UNet")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (reduce-overhead = CUDA graphs)")
    p.add_argument("--compile-scope", choices=("unet", "resnets"), default="resnets",
                   help="unet: the whole UNet (UNet.compile(); UNetCapture's hooks are traced into one graph, "
                        "with no early exit: see BENCHMARKS.md); resnets: each ResnetBlock2D.forward (regional; the capture's hooks stay "
                        "outside compiled code)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (eager: checks tracing without code generation)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (refseg-extract leaves it off)")
    p.add_argument("--noise-t", type=int, default=5, help="UNet timestep")
    p.add_argument("--sentences-per-image", type=float, default=REFCOCO_SENTENCES_PER_IMAGE,
                   help="to amortise the VAE (run once per image) in the per-sample estimate")
    p.add_argument("--pipeline-images", type=int, default=None,
                   help="also time run_extraction on this many synthetic images (default 16 for tiny on CPU, else 0)")
    p.add_argument("--variants", default="all",
                   help="comma list of unet,capture,capture+host,per-sample,vae,text (default all)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs per sample and stop (no model is run)")
    common.add_common_args(p)
    return p.parse_args(argv)


# ---- FLOPs -------------------------------------------------------------------------------------
def count_sample_flops(arch: str, image_size: int, token_length: int, spec) -> dict[str, int]:
    """FLOPs of one sample for each piece, counted on meta tensors (shapes only, no arithmetic)."""
    from refseg.backbones.capture import UNetCapture

    m = models.build_modules(arch, device="meta")
    unet, vae, text = m["unet"], m["vae"], m["text_encoder"]
    h = image_size // 8
    z = torch.zeros(1, unet.config.in_channels, h, h, device="meta")
    emb = torch.zeros(1, token_length, unet.config.cross_attention_dim, device="meta")
    steps = torch.zeros(1, dtype=torch.long, device="meta")
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    ids = torch.zeros(1, token_length, dtype=torch.long, device="meta")

    def capture():
        with UNetCapture(unet, spec) as cap:
            cap.run(z, steps, emb)

    with torch.inference_mode():
        return {
            "unet": common.count_flops(lambda: unet(z, steps, encoder_hidden_states=emb, return_dict=False)),
            "capture": common.count_flops(capture),
            "vae": common.count_flops(lambda: vae.encode(x).latent_dist.mode()),
            "text": common.count_flops(lambda: text(ids).last_hidden_state),
        }


# ---- the timed calls ---------------------------------------------------------------------------
def unet_configs(args, device) -> list[tuple[bool, bool]]:
    pick = {"off": [False], "on": [True], "both": [False, True]}
    return [(cl, comp) for cl in pick[args.channels_last] for comp in pick[args.compile]]


COMPILE_SCOPE = "resnets"  # set from --compile-scope in main


def config_name(channels_last: bool, compiled: bool) -> str:
    return ("channels_last" if channels_last else "contiguous") + (f" + compile ({COMPILE_SCOPE})" if compiled else "")


def prepare_unet(base, channels_last: bool, args, copy_needed: bool):
    unet = copy.deepcopy(base) if copy_needed else base
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def compile_unet(unet, args) -> None:
    import torch._dynamo

    # every (batch size, memory format, capture on/off) is its own graph; past the default limit of 8
    # dynamo silently runs the rest eagerly, which would make the 'compile' rows eager rows
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    if args.compile_scope == "unet":
        unet.compile(mode=args.compile_mode, backend=args.compile_backend)
        return
    from diffusers.models.resnet import ResnetBlock2D

    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):  # forward, not the module: forward hooks run outside
            module.forward = torch.compile(module.forward, mode=args.compile_mode, backend=args.compile_backend)


def capture_twin(unet, spec, exits: contextlib.ExitStack):
    """(a UNet sharing `unet`'s weights with UNetCapture installed for the whole run, the capture).

    The pipeline also installs the capture once per noise level. A separate module tree keeps the
    plain variant free of hooks, and keeps each tree's hooks fixed, so a compiled UNet is not
    re-traced every time the capture would come and go.
    """
    from refseg.backbones.capture import UNetCapture

    shared = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    twin = copy.deepcopy(unet, memo=shared)
    return twin, exits.enter_context(UNetCapture(twin, spec))


def make_variants(args, backbone, unet, cap, channels_last: bool, bs: int, device, dtype) -> dict:
    from refseg.extract.pipeline import batch_invariant

    h = args.image_size // backbone.vae_scale_factor
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(bs)
    z = torch.randn(bs, unet.config.in_channels, h, h, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    emb = torch.randn(bs, args.token_length, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    steps = torch.full((bs,), args.noise_t, dtype=torch.long, device=device)
    x = (torch.rand(bs, 3, args.image_size, args.image_size, generator=g) * 2 - 1).to(device, dtype)
    x = x.contiguous(memory_format=fmt)
    ids = torch.randint(0, len(backbone.tokenizer), (bs, args.token_length), generator=g).to(device)

    def plain():
        with torch.inference_mode():
            return unet(z, steps, encoder_hidden_states=emb, return_dict=False)[0]

    def capture():
        return cap.run(z, steps, emb)

    def capture_host():
        return {k: v.to(torch.float16).cpu().numpy() for k, v in cap.run(z, steps, emb).items()}

    def vae():
        with torch.inference_mode():
            return backbone.vae.encode(x).latent_dist.mode()

    def text():
        with torch.inference_mode():
            return backbone.text_encoder(ids).last_hidden_state

    variants = {"unet": plain, "capture": capture, "capture+host": capture_host}
    if device.type == "cpu" and bs > 1:
        on_cpu = types.SimpleNamespace(device=device)

        def per_sample():  # what extract/pipeline.py does on the CPU: batch_invariant(...)
            return batch_invariant(on_cpu, cap.run, z, steps, emb)

        variants["capture, 1 at a time"] = per_sample
    variants["vae"] = vae
    variants["text"] = text
    return variants


VARIANT_KEYS = {"unet": "unet", "capture": "capture", "capture+host": "capture+host",
                "capture, 1 at a time": "per-sample", "vae": "vae", "text": "text"}
FLOPS_OF = {"unet": "unet", "capture": "capture", "capture+host": "capture", "capture, 1 at a time": "capture",
            "vae": "vae", "text": "text"}


# ---- refseg-extract end to end -----------------------------------------------------------------
def time_pipeline(args, backbone, batch_sizes, repeats) -> dict:
    """Seconds of run_extraction per (batch size, mode), rounds interleaved; the first round is warm-up.

    Modes: "shipped" is refseg-extract as it is; on the CPU, "batched" is the same run with
    refseg.extract.pipeline.batch_invariant patched (in this process only) to call the backbone on the whole
    batch: the end-to-end price of batch-size-independent cache bytes. On CUDA, "synchronous host
    copies" sets refseg.extract.pipeline.OVERLAP_HOST_COPIES = False: the price of a GPU that waits for each
    batch's copy to the host and its hand-over to the writer (extract/host_copy.py).
    """
    import refseg.extract.pipeline as pipeline
    from refseg.extract.pipeline import ExtractionConfig, run_extraction
    from refseg.core.synthetic import generate

    modes = {"shipped": {}}  # mode -> attributes of refseg.extract.pipeline to patch for its runs
    if backbone.device.type == "cpu":
        modes["batched (bench patch)"] = {"batch_invariant": lambda _backbone, fn, *batch: fn(*batch)}
    if backbone.device.type == "cuda":
        modes["synchronous host copies"] = {"OVERLAP_HOST_COPIES": False}
    work = tempfile.mkdtemp(prefix="refseg-bench-extract-")
    try:
        generate(os.path.join(work, "data"), images=args.pipeline_images, seed=0, image_size=args.image_size)
        results = {}
        for r in range(repeats + 1):
            for bs in batch_sizes:
                for mode, patch in modes.items():
                    if bs == 1 and mode != "shipped":
                        continue  # the same thing at batch 1
                    out = os.path.join(work, f"b{bs}-r{r}.zarr")
                    cfg = ExtractionConfig(data_root=os.path.join(work, "data"), dataset="refcoco-synth",
                                           split="train", out=out, noise_ts=(args.noise_t,), image_size=args.image_size,
                                           token_length=args.token_length, batch_size=bs, progress=False)
                    saved = {name: getattr(pipeline, name) for name in patch}
                    for name, value in patch.items():
                        setattr(pipeline, name, value)
                    try:
                        t = time.perf_counter()
                        report = run_extraction(cfg, backbone=backbone)
                        seconds = time.perf_counter() - t
                    finally:
                        for name, value in saved.items():
                            setattr(pipeline, name, value)
                    shutil.rmtree(out)
                    if r > 0:
                        results.setdefault((bs, mode), []).append(seconds)
        return {"seconds": results, "samples": report.n_samples, "images": report.n_images}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- main --------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    args.image_size = args.image_size or models.DEFAULT_IMAGE_SIZE[args.arch]
    batch_sizes = common.int_list(args.batch_sizes or ("1,8,32" if device.type == "cuda" else "1,4,8"))
    if args.pipeline_images is None:
        args.pipeline_images = 16 if (args.arch == "tiny" and device.type == "cpu") else 0
    info = common.RunInfo(device)
    global COMPILE_SCOPE
    COMPILE_SCOPE = args.compile_scope

    from refseg.backbones import tiny
    from refseg.core.feature_spec import FeatureSpec

    unet_cfg = models.SD15_UNET_CONFIG if args.arch == "sd15" else tiny.UNET_CONFIG
    spec = FeatureSpec.from_unet_config(dict(unet_cfg), args.image_size, args.token_length)
    flops = count_sample_flops(args.arch, args.image_size, args.token_length, spec)
    flop_table = common.Table(["piece", "GFLOP per sample", "runs"])
    runs_per = {"vae": "once per image", "text": "once per sentence", "unet": "once per (sentence, T)",
                "capture": "once per (sentence, T)"}
    names = {"vae": "VAE encoder", "text": "text encoder", "unet": "UNet forward",
             "capture": "UNet forward with capture (stops after the last captured layer)"}
    for k in ("vae", "text", "unet", "capture"):
        flop_table.add(**{"piece": names[k], "GFLOP per sample": flops[k] / 1e9, "runs": runs_per[k]})
    title = f"Extraction: {args.arch} at {args.image_size}², L={args.token_length}"
    if args.compile != "off":
        title += f" — torch.compile check (scope {args.compile_scope}, backend {args.compile_backend})"
    if args.flops_only:
        common.publish(title + " — FLOPs per sample", info, [("", flop_table)],
                       ["counted with torch.utils.flop_counter.FlopCounterMode on meta tensors (2 FLOPs per "
                        "multiply-add; matmuls, convolutions and SDPA; elementwise ops are not counted)"],
                       append=not args.no_append, json_out=args.json)
        return

    print(f"measuring the {common.dtype_name(dtype)} matmul peak on {device} ...", flush=True)
    peak = common.matmul_peak(device, dtype)
    print(f"  {peak / 1e9:.1f} GFLOP/s", flush=True)
    print(f"building {args.arch} ({common.dtype_name(dtype)}) on {device} ...", flush=True)
    backbone = models.build_backbone(args.arch, device, dtype)

    configs = unet_configs(args, device)
    if configs[0][0]:  # the VAE and text rows are measured once, in the first configuration's memory format
        backbone.vae.to(memory_format=torch.channels_last)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    unets = {c: prepare_unet(backbone.unet, c[0], args, copy_needed=len(configs) > 1) for c in configs}
    exits = contextlib.ExitStack()
    captures = {c: capture_twin(unets[c], spec, exits) for c in configs}
    for c in configs:
        if c[1]:
            compile_unet(unets[c], args)
            compile_unet(captures[c][0], args)

    wanted = "all" if args.variants == "all" else set(args.variants.split(","))
    variants = {}
    for c in configs:
        for bs in batch_sizes:
            for name, fn in make_variants(args, backbone, unets[c], captures[c][1], c[0], bs, device, dtype).items():
                if name in ("vae", "text") and c != configs[0]:
                    continue  # not affected by the UNet's configuration: measured once
                if wanted != "all" and VARIANT_KEYS[name] not in wanted:
                    continue
                variants[(c, bs, name)] = fn
    print(f"timing {len(variants)} variants x {args.repeats} interleaved repeats ...", flush=True)
    times = common.interleaved(variants, device, repeats=args.repeats, warmup=3 if device.type == "cuda" else 2,
                               min_time=0.2 if device.type == "cuda" else 0.1,
                               on_error=lambda name, exc: print(f"  {name}: failed: {exc}", flush=True))
    exits.close()

    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    table = common.Table(["UNet config", "batch", "variant", "ms/batch", "spread", "samples/s", "GFLOP/sample",
                          f"achieved {unit}", "MFU % of measured peak", "vs unet"])
    estimate = common.Table(["UNet config", "batch", "s/sample: UNet capture+host", "text", "VAE / sents-per-image",
                             "samples/s (one noise level)"])
    for c in configs:
        for bs in batch_sizes:
            base = times.get((c, bs, "unet"))
            for (cc, b, name), t in times.items():
                if cc != c or b != bs:
                    continue
                row = {"UNet config": config_name(*c) if name not in ("vae", "text") else
                       ("channels_last" if c[0] else "contiguous"), "batch": bs, "variant": name}
                if isinstance(t, str):
                    row["variant"] = f"{name} (failed: {t})"
                    table.add(**row)
                    continue
                sec = common.median(t)
                sps = bs / sec
                f = flops[FLOPS_OF[name]]
                row.update({"ms/batch": sec * 1e3, "spread": common.spread(t), "samples/s": sps,
                            "GFLOP/sample": f / 1e9, f"achieved {unit}": f * sps / scale,
                            "MFU % of measured peak": 100 * f * sps / peak})
                if isinstance(base, list) and name.startswith("capture"):
                    row["vs unet"] = f"{common.median(base) / sec:.2f}x"
                table.add(**row)
            parts = [times.get((c, bs, "capture+host")), times.get((configs[0], bs, "text")),
                     times.get((configs[0], bs, "vae"))]
            if all(isinstance(p, list) for p in parts):
                u, tx, v = (common.median(p) / bs for p in parts)
                v /= args.sentences_per_image
                estimate.add(**{"UNet config": config_name(*c), "batch": bs, "s/sample: UNet capture+host": u,
                                "text": tx, "VAE / sents-per-image": v,
                                "samples/s (one noise level)": 1 / (u + tx + v)})

    sections = [("FLOPs per sample", flop_table),
                ("", f"Measured {common.dtype_name(dtype)} matmul peak on {device.type}: **{peak / scale:.3g} {unit}** "
                     f"({'8192' if device.type == 'cuda' else '1024'}² matmul, median of 5)"),
                (f"Throughput ({common.dtype_name(dtype)}; median of {args.repeats} interleaved repeats)", table)]
    if estimate.rows:
        sections.append((f"Per-sample estimate, VAE amortised over {args.sentences_per_image} sentences per image "
                         "(model time only, batched)", estimate))

    if args.pipeline_images:
        pipe_bs = batch_sizes
        print(f"timing run_extraction on {args.pipeline_images} synthetic images, batch sizes {pipe_bs} ...",
              flush=True)
        res = time_pipeline(args, backbone, pipe_bs, max(1, min(args.repeats, 3)))
        pt = common.Table(["batch", "mode", "s per run", "spread", "samples/s", "vs shipped",
                           "images", "samples"])
        for (bs, mode), s in res["seconds"].items():
            ref = common.median(res["seconds"][(bs, "shipped")])
            pt.add(batch=bs, **{"mode": mode if bs > 1 else "shipped (batch 1)",
                                "s per run": common.median(s), "spread": common.spread(s),
                                "samples/s": res["samples"] / common.median(s),
                                "vs shipped": f"{ref / common.median(s):.2f}x", "images": res["images"],
                                "samples": res["samples"]})
        sections.append((f"refseg-extract end to end (run_extraction, synthetic train split, T={args.noise_t}, "
                         f"codec none; VAE + text + UNet + float16 + Zarr writes)", pt))

    notes = [
        "MFU = (FLOPs of the variant's own work per sample x samples/s) / the matmul peak measured in this run "
        f"({common.dtype_name(dtype)}, square matmul); FLOPs from torch.utils.flop_counter (2 per multiply-add; "
        "elementwise ops, norms and softmax not counted), so MFU is a model-FLOP utilisation",
        "'capture' = UNetCapture.run (decoder features + attn2 maps; the forward stops after the last captured "
        "layer); 'capture+host' adds the float16 copy to host memory the cache writer needs; 'vs unet' = "
        "plain-forward time / variant time at the same batch (above 1 = faster)",
    ]
    if device.type == "cpu" and len(batch_sizes) > 1:
        notes.append("'capture, 1 at a time' is extract/pipeline.py's batch_invariant() on the CPU (one sample per "
                     "backbone call, so the cache bytes do not depend on --batch-size): compare its samples/s with "
                     "'capture' at the same batch for the price of that guarantee; the end-to-end table's "
                     "'batched (bench patch)' rows are refseg-extract with batch_invariant replaced by a plain "
                     "batched call in this process (not a shipped option)")
    if args.cudnn_benchmark:
        notes.append("torch.backends.cudnn.benchmark = True in this run")
    if any(c[1] for c in configs):
        notes.append(f"compile: scope '{args.compile_scope}', backend {args.compile_backend}, mode "
                     f"{args.compile_mode or 'default'}; the first calls (compilation) are warm-up, not timed")
    if device.type == "cpu":
        notes.append("CPU rows: the machine is shared (see the load average); variants are interleaved so the "
                     "ratios hold better than the absolute figures")
    common.publish(title, info, sections, notes, append=not args.no_append, json_out=args.json)


if __name__ == "__main__":
    main()
