"""Cached vs in-loop head training: one epoch from the cache against one epoch with the backbone in
the loop (issue 6, item 3).

    python bench/train.py                                   # tiny on CPU, the demo's head (~2 min on 2 cores)
    python bench/train.py --arch sd15 --device cuda         # SD1.5 architecture at 512², VPD's head (hidden 640)

One process, one machine, the same samples in the same order, the same head:
  1. synthetic images -> refseg's extraction (run_extraction) -> a cache at one noise level (timed:
     the one-off cost the cache has to repay);
  2. one copy of the head per side, built by heads.build_head under the same seed, each with its own
     AdamW (refseg.heads.settings' defaults: lr 5e-5, wd 1e-2);
  3. epoch rounds; in each, every side trains one epoch in turn; round 0 is warm-up:
       cache:   FeatureDataset (as refseg-train-head reads it without preload: direct shard reads;
                also with preload, and through zarr) -> refseg.heads.batches.make_loader -> head step
       in-loop: decode + resize the image (DataLoader), tokenize, text encoder, VAE encoder, noise,
                UNet with UNetCapture (batched: no byte-invariance needed here) -> the same head step
     The head step is refseg.heads.train's loop body: batch_to_device, autocast (bf16 on a GPU), the head,
     refseg.heads.losses.segmentation_loss, backward, AdamW step. The GT masks come from the cache on both
     sides (the in-loop side gets them for free: a conservative ratio).
Reported: seconds per epoch (median) per side, the ratio in-loop / cached, the backbone's share of
the in-loop epoch, and after how many epochs the extraction has paid for itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common, models  # noqa: E402

DEFAULTS = {  # per arch: what the demo trains on CPU / what VPD trains on a GPU
    "tiny": dict(image_size=128, token_length=16, hidden=64, batch_size=16, images=24, samples=64),
    "sd15": dict(image_size=512, token_length=40, hidden=640, batch_size=8, images=48, samples=128),
}


IN_LOOP = "backbone in the loop"
CACHED_SIDES = {"direct": "cache: FeatureDataset (direct shard reads)", "preload": "cache: FeatureDataset, preload",
                "zarr": "cache: FeatureDataset through zarr (direct_reads=False)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=models.ARCHS, default="tiny")
    p.add_argument("--head", default="vpd")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--token-length", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None,
                   help="head width (default: 64 for tiny as the demo, 640 for sd15 as VPD)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="synthetic images to generate")
    p.add_argument("--samples", type=int, default=None, help="samples per epoch (the first N of the train split)")
    p.add_argument("--noise-t", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (both sides)")
    p.add_argument("--cached-readers", default="direct,preload,zarr",
                   help="cached sides, each trained in the same run: direct = FeatureDataset (what "
                        "refseg-train-head reads with --no-preload: rows straight from the shard files), "
                        "preload = FeatureDataset(preload=True) (--preload), "
                        "zarr = FeatureDataset(direct_reads=False) (every read through zarr)")
    p.add_argument("--flops-only", action="store_true",
                   help="count FLOPs per sample of both sides and stop (nothing is run; SD1.5 at 512² in seconds)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="backbone dtype; auto: bf16 on GPU, fp32 on CPU")
    common.add_common_args(p)
    p.set_defaults(repeats=5)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def flops_per_sample(args, spec) -> dict[str, int]:
    """FLOPs of one sample on each side, counted on meta tensors: the backbone's forward (VAE + text +
    UNet with capture, as in the loop) and the head's training step (forward, loss, backward)."""
    from bench.extract import count_sample_flops
    from refseg.heads import build_head
    from refseg.heads.losses import segmentation_loss

    with torch.device("meta"):
        head = build_head(args.head, spec, hidden=args.hidden)
    b = 2  # BatchNorm in train mode needs more than one sample
    features = {t.name: torch.zeros(b, *t.shape, device="meta") for t in spec.tensors if t.name in head.tensor_names}
    text = torch.zeros(b, spec.token_length, spec.text_dim, device="meta") if head.uses_text else None
    mask = torch.ones(b, spec.token_length, dtype=torch.bool, device="meta") if head.uses_text else None
    gt = torch.zeros(b, spec.image_size, spec.image_size, dtype=torch.uint8, device="meta")

    def step():
        segmentation_loss(head(features, text, mask), gt).backward()

    backbone = count_sample_flops(args.arch, args.image_size, args.token_length, spec)
    return {"backbone": backbone["vae"] + backbone["text"] + backbone["capture"],
            "head": common.count_flops(step) // b}


FLOP_RATIO_NOTE = ("FLOP ratio = (backbone + head step) / head step: the time ratio if both sides ran at the "
                   "same FLOP/s and reading the cache cost nothing")


def flop_table(args, spec) -> "common.Table":
    flops = flops_per_sample(args, spec)
    table = common.Table(["per sample", "GFLOP", "FLOP ratio in-loop / cached"])
    table.add(**{"per sample": "backbone forward (VAE + text + UNet with capture)", "GFLOP": flops["backbone"] / 1e9})
    table.add(**{"per sample": f"head training step ({args.head}, hidden {args.hidden}: forward + loss + backward)",
                 "GFLOP": flops["head"] / 1e9,
                 "FLOP ratio in-loop / cached": f"{(flops['backbone'] + flops['head']) / flops['head']:.1f}x"})
    return table


class ImagesAndText(torch.utils.data.Dataset):
    """The in-loop side's data: for cache row r, the image (decoded, squashed to S x S, in [-1, 1]),
    the sentence's token ids, and the GT mask."""

    def __init__(self, image_paths: list[str], texts: list[str], image_ids, gt_source: str, tokenizer, size: int,
                 length: int):
        self.image_paths, self.texts, self.image_ids = image_paths, texts, image_ids
        self.gt_source, self.tokenizer, self.size, self.length = gt_source, tokenizer, size, length
        self._cache, self._pid = None, None

    def __len__(self):
        return len(self.texts)

    def __getstate__(self):
        return dict(self.__dict__, _cache=None, _pid=None)

    def __getitem__(self, row):
        from refseg.cache import open_cache
        from refseg.core.transforms import image_to_tensor, load_image

        if self._cache is None or self._pid != os.getpid():
            self._cache, self._pid = open_cache(self.gt_source), os.getpid()
        x = image_to_tensor(load_image(self.image_paths[row], target_size=self.size), self.size)
        tok = self.tokenizer(self.texts[row], padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="pt")
        return {"image": x, "input_ids": tok["input_ids"][0], "attention_mask": tok["attention_mask"][0].bool(),
                "image_id": int(self.image_ids[row]), "gt": torch.from_numpy(self._cache.gt(row))}


def main(argv=None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    info = common.RunInfo(device)
    if args.flops_only:
        from refseg.backbones import tiny
        from refseg.core.feature_spec import FeatureSpec

        unet_cfg = models.SD15_UNET_CONFIG if args.arch == "sd15" else tiny.UNET_CONFIG
        spec = FeatureSpec.from_unet_config(dict(unet_cfg), args.image_size, args.token_length)
        common.publish(f"Cached vs in-loop head training: {args.arch} at {args.image_size}², {args.head} head "
                       f"hidden {args.hidden} — FLOPs per sample", info, [("", flop_table(args, spec))],
                       [FLOP_RATIO_NOTE], append=not args.no_append, json_out=args.json)
        return

    from refseg.cache import FeatureDataset, open_cache
    from refseg.backbones.capture import UNetCapture
    from refseg.extract.pipeline import ExtractionConfig, run_extraction
    from refseg.heads import build_head
    from refseg.heads.batches import autocast, batch_to_device, make_loader
    from refseg.heads.losses import segmentation_loss
    from refseg.heads.settings import OPTIMIZERS
    from refseg.heads.train_setup import EpochShuffle
    from refseg.core.noise import add_noise, alphas_cumprod, make_noise
    from refseg.core.refer import ReferDataset
    from refseg.core.synthetic import generate

    work = tempfile.mkdtemp(prefix="refseg-bench-train-")
    try:
        print(f"synthetic data ({args.images} images at {args.image_size}²) and {args.arch} backbone "
              f"({common.dtype_name(dtype)}, {device}) ...", flush=True)
        generate(os.path.join(work, "data"), images=args.images, seed=0, image_size=args.image_size)
        backbone = models.build_backbone(args.arch, device, dtype)
        cache_path = os.path.join(work, "train.zarr")
        cfg = ExtractionConfig(data_root=os.path.join(work, "data"), dataset="refcoco-synth", split="train",
                               out=cache_path, noise_ts=(args.noise_t,), image_size=args.image_size,
                               token_length=args.token_length, batch_size=args.batch_size, limit=args.samples,
                               progress=False)
        t = time.perf_counter()
        report = run_extraction(cfg, backbone=backbone)
        extraction_s = time.perf_counter() - t
        n = report.n_samples
        print(f"  extracted {n} samples ({report.n_images} images) in {extraction_s:.1f} s", flush=True)

        cache = open_cache(cache_path)
        spec = cache.spec
        refer = ReferDataset(cfg.data_root, cfg.dataset)
        path_of = {s.image_id: str(s.image_path) for s in refer.samples("train")}
        image_ids = cache.index["image_id"]
        in_loop_data = ImagesAndText([path_of[int(i)] for i in image_ids], cache.texts, image_ids, cache_path,
                                     backbone.tokenizer, args.image_size, args.token_length)

        readers = [r for r in args.cached_readers.split(",") if r]
        unknown = set(readers) - set(CACHED_SIDES)
        if unknown:
            raise SystemExit(f"unknown --cached-readers {sorted(unknown)} (choose from {', '.join(CACHED_SIDES)})")
        sides = [CACHED_SIDES[r] for r in readers] + [IN_LOOP]
        lr, weight_decay, _ = OPTIMIZERS["adamw"]
        heads_, opts = {}, {}
        for side in sides:  # the same head, initialised the same way, for every side
            torch.manual_seed(0)
            heads_[side] = build_head(args.head, spec, hidden=args.hidden).to(device).train()
            opts[side] = torch.optim.AdamW(heads_[side].parameters(), lr=lr, weight_decay=weight_decay)
        model = heads_[IN_LOOP]
        n_params = sum(p.numel() for p in model.parameters())

        sampler = EpochShuffle(n, seed=0)
        loaders = {}
        for r in readers:
            ds = FeatureDataset(cache_path, args.noise_t, names=model.tensor_names, text=model.uses_text,
                                preload=r == "preload", direct_reads=r != "zarr")
            loaders[CACHED_SIDES[r]] = make_loader(ds, args.batch_size, device, sampler=sampler, workers=args.workers)
        in_loop_loader = make_loader(in_loop_data, args.batch_size, device, sampler=sampler, workers=args.workers)

        acp = alphas_cumprod(backbone.scheduler_config)
        scale = backbone.scaling_factor

        def head_step(side, features, text, text_mask, gt):  # refseg.heads.train's loop body
            head, opt = heads_[side], opts[side]
            with autocast(device):
                logits = head(features, text, text_mask)
            loss = segmentation_loss(logits, gt, "ce")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        def cached_epoch(side) -> dict:
            t0 = time.perf_counter()
            for batch in loaders[side]:
                features, text, mask = batch_to_device(batch, device, non_blocking=True)
                head_step(side, features, text, mask, batch["gt"].to(device, non_blocking=True))
            common.sync(device)
            return {"total": time.perf_counter() - t0}

        def in_loop_epoch() -> dict:
            t0, backbone_s = time.perf_counter(), 0.0
            for batch in in_loop_loader:
                common.sync(device)
                tb = time.perf_counter()
                with torch.inference_mode():
                    x = batch["image"].to(device, dtype, non_blocking=True)
                    z0 = backbone.vae.encode(x).latent_dist.mode().float() * scale
                    eps = torch.stack([make_noise(tuple(z0.shape[1:]), 0, int(i), args.noise_t)
                                       for i in batch["image_id"]]).to(device)
                    zt = add_noise(z0, args.noise_t, eps, acp).to(dtype)
                    emb = backbone.text_encoder(batch["input_ids"].to(device))[0]
                    steps = torch.full((len(zt),), args.noise_t, dtype=torch.long, device=device)
                    with UNetCapture(backbone.unet, spec) as cap:
                        captured = cap.run(zt, steps, emb)
                # clones: inference-mode tensors cannot be saved for the head's backward
                features = {k: captured[k].float().clone() for k in model.tensor_names}
                text = emb.float().clone() if model.uses_text else None
                mask = batch["attention_mask"].to(device) if model.uses_text else None
                common.sync(device)
                backbone_s += time.perf_counter() - tb
                head_step(IN_LOOP, features, text, mask, batch["gt"].to(device, non_blocking=True))
            common.sync(device)
            return {"total": time.perf_counter() - t0, "backbone": backbone_s}

        times = {side: [] for side in sides}
        for epoch in range(args.repeats + 1):  # epoch 0 is warm-up for every side
            line = []
            for side in sides:
                sampler.set_epoch(epoch)
                result = in_loop_epoch() if side == IN_LOOP else cached_epoch(side)
                if epoch > 0:
                    times[side].append(result)
                line.append(f"{side} {result['total']:.2f} s")
            print(f"  epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: " + ", ".join(line), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    seconds = {side: [t["total"] for t in times[side]] for side in sides}
    in_loop = common.median(seconds[IN_LOOP])
    backbone_share = common.median([t["backbone"] / t["total"] for t in times[IN_LOOP]])
    table = common.Table(["side", "s/epoch", "spread", "samples/s", "in-loop / this (median epochs)",
                          "per-epoch ratios", "epochs until extraction is repaid"])
    for side in sides:
        sec = common.median(seconds[side])
        row = {"side": side, "s/epoch": sec, "spread": common.spread(seconds[side]), "samples/s": n / sec}
        if side != IN_LOOP:
            ratios = [b / a for a, b in zip(seconds[side], seconds[IN_LOOP])]
            saved = in_loop - sec
            row.update({"in-loop / this (median epochs)": f"**{in_loop / sec:.1f}x**",
                        "per-epoch ratios": ", ".join(f"{r:.1f}" for r in ratios),
                        "epochs until extraction is repaid": f"{extraction_s / saved:.1f}" if saved > 0 else "never"})
        else:
            row["side"] = f"{side} (backbone {100 * backbone_share:.0f}% of it)"
        table.add(**row)
    notes = [
        f"{args.arch} backbone ({common.dtype_name(dtype)}) at {args.image_size}², L={args.token_length}, "
        f"T={args.noise_t}; "
        f"head {args.head} hidden {args.hidden} ({n_params / 1e6:.2f}M parameters), batch {args.batch_size}, "
        f"AdamW, {n} samples per epoch, DataLoader workers {args.workers}",
        f"median of {args.repeats} epochs per side after one warm-up epoch each; the sides take turns within "
        "every epoch round",
        "in-loop = image decode + text encoder + VAE encoder + UNet with capture, batched, then the identical head "
        "step; its backbone share is synchronised wall time in the backbone",
        f"extraction (one-off) = run_extraction on the same samples: {extraction_s:.1f} s (VAE + text + UNet + "
        "writes; on the CPU one sample per backbone call for batch-size-independent bytes)",
        "cached sides: FeatureDataset = refseg-train-head's reader with --no-preload (direct shard reads); "
        "preload = its --preload (the default when the samples fit in half the free RAM); through zarr = "
        "FeatureDataset(direct_reads=False)",
    ]
    notes.append(FLOP_RATIO_NOTE)
    common.publish(f"Cached vs in-loop head training: {args.arch} at {args.image_size}², {args.head} head "
                   f"hidden {args.hidden}", info,
                   [("", table), ("FLOPs per sample (torch.utils.flop_counter, meta tensors)", flop_table(args, spec))],
                   notes, append=not args.no_append, json_out=args.json)


if __name__ == "__main__":
    main()
