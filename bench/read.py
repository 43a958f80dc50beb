"""Cache read throughput through the training DataLoader against the I/O floor (issue 6, item 2).

    python bench/read.py                          # SD1.5 shapes at 512², L=40; 64 samples per store (~2 GB on disk)
    python bench/read.py --samples 300 --repeats 5   # bigger stores (~1.6 GB each)

One run writes, under --dir (default: the system temp dir; removed at the end):
  - a cache store per layout variant (codec none/zstd/blosc at the default shard size, and shard
    sizes 4/16/64 without a codec), all holding the same random float16 data, written with refseg's
    CacheWriter exactly as extraction writes it;
  - the floor: the same bytes as raw .npy files (one per tensor), a sample's rows read with one
    pread each (what a memmap slice costs, without the mapping that would keep pages cached).
Then every variant is read through the same DataLoader (refseg.heads.batches.make_loader: what
refseg-train-head uses), shuffled as training shuffles, with workers 0 and 2, items exactly as
FeatureDataset yields them (all feature tensors + GT mask + text embedding + mask). Passes are
interleaved across variants and repeated; medians are reported.

"warm" = the files are in the page cache (reads are decode/copy bound); "cold" = each file was
evicted from this machine's page cache (posix_fadvise DONTNEED after a sync) before the pass, so
the reads go to the disk (a virtual disk may still be cached by its host).
Data are random: N(0,1) features, softmax attention maps, blob masks. Random mantissas do not
compress; real features may compress somewhat better (their exponents are as narrow or narrower).

A store on S3 against the local disk, as a ratio measured in one run (FeatureDataset, and every request
at once through zarr's async API; moto's S3 server on 127.0.0.1): bench/remote_read.py, which reuses
this file's store writer and data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common, models  # noqa: E402
from refseg.cache import FeatureDataset  # noqa: E402
from refseg.cache.fastread import ShardFiles  # noqa: E402

NOISE_T = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="samples per store (SD1.5: ~5.2 MB each, uncompressed)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--token-length", type=int, default=40)
    p.add_argument("--codecs", default="none,zstd,blosc,int8",
                   help="codecs to compare at the default shard size (int8: --cache-dtype int8, no codec)")
    p.add_argument("--shard-sizes", default="4,16,64", help="shard sizes to compare with codec none")
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--modes", default="warm,cold", help="warm (page cache) and/or cold (evicted before each pass)")
    p.add_argument("--dir", default=None, help="where to write the stores (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the stores (default: removed at the end)")
    p.add_argument("--real-model", default="tiny-synth",
                   help="also compare codecs on features extracted by this trained backbone ('' to skip)")
    p.add_argument("--no-zarr-path", action="store_true",
                   help="leave out the reference row that reads codec none through zarr (direct_reads=False)")
    common.add_common_args(p)
    p.set_defaults(repeats=3)
    return p.parse_args(argv)


# ---- data ----------------------------------------------------------------------------------------
def spec_for(image_size: int, token_length: int):
    from refseg.core.feature_spec import FeatureSpec

    return FeatureSpec.from_unet_config(dict(models.SD15_UNET_CONFIG), image_size, token_length)


def random_data(spec, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random sample data with the statistics of the real thing where it matters for compression."""
    rng = np.random.default_rng(seed)
    data = {}
    for t in spec.tensors:
        if t.kind == "attention":  # softmax over the L tokens at every pixel, as the captured maps are
            logits = rng.standard_normal((n, *t.shape), dtype=np.float32) * 2
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            data[t.name] = (e / e.sum(axis=1, keepdims=True)).astype(np.float16)
        else:
            data[t.name] = rng.standard_normal((n, *t.shape), dtype=np.float32).astype(np.float16)
    S, L, D = spec.image_size, spec.token_length, spec.text_dim
    yy, xx = np.mgrid[0:S, 0:S]
    cy, cx, r = rng.uniform(0.2, 0.8, (3, n)) * np.array([[S], [S], [S / 3]])
    data["gt"] = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
                  < r[:, None, None] ** 2).astype(np.uint8)
    data["embedding"] = rng.standard_normal((n, L, D), dtype=np.float32).astype(np.float16)
    lengths = rng.integers(4, L, n)
    data["attention_mask"] = (np.arange(L)[None] < lengths[:, None]).astype(np.uint8)
    data["input_ids"] = rng.integers(0, 1000, (n, L)).astype(np.int32)
    data["latent"] = rng.standard_normal((n, spec.latent_channels, spec.latent_size, spec.latent_size),
                                         dtype=np.float32).astype(np.float16)
    return data


def write_store(path: str, spec, data: dict, codec: str, shard_size: int) -> None:
    """A cache store with one image per sample, written shard by shard with refseg's CacheWriter.
    `codec` "int8": no codec, features stored as int8 codes + scales (--cache-dtype int8)."""
    from refseg.cache.layout import ImageTable, SampleTable
    from refseg.cache.opening import NewStore
    from refseg.cache.writer import CacheWriter, shard_slices

    n = len(data["gt"])
    ids = np.arange(n)
    samples = SampleTable(sent_id=ids, ref_id=ids, ann_id=ids, image_id=ids, image_row=ids,
                          text=[f"sentence {i}" for i in ids])
    images = ImageTable(image_id=ids, orig_hw=np.full((n, 2), spec.image_size))
    extraction = {"image_size": spec.image_size, **({"cache_dtype": "int8"} if codec == "int8" else {})}
    settings = {"backbone": {"model": "bench-random"}, "extraction": extraction,
                "dataset": {"dataset": "bench", "n": n}}
    codec = "none" if codec == "int8" else codec
    with CacheWriter.open(path, NewStore(spec=spec, extraction_record=settings, samples=samples, images=images,
                                         codec=codec, shard_size=shard_size), overwrite=True) as w:
        for s in shard_slices(n, shard_size):
            w.write_latents(s, data["latent"][s])
            w.write_text(s, data["input_ids"][s], data["attention_mask"][s], data["embedding"][s], data["gt"][s])
        w.add_noise_level(NOISE_T, NOISE_T)
        for s in shard_slices(n, shard_size):
            w.write_features(NOISE_T, s, {t.name: data[t.name][s] for t in spec.tensors})


def write_floor(folder: str, spec, data: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for key in [*spec.names, "gt", "embedding", "attention_mask"]:
        np.save(os.path.join(folder, f"{key}.npy"), data[key])


class RawFileDataset(torch.utils.data.Dataset):
    """The floor: FeatureDataset's items read from raw .npy files, one os.preadv per tensor per item
    (the same single copy from the page cache a memmap slice makes, but evictable: pages a process
    keeps mapped cannot be dropped from the page cache, which would make every 'cold' pass warm)."""

    KEYS = ("gt", "embedding", "attention_mask")

    def __init__(self, folder: str, names: list[str]):
        self.folder, self.names = folder, names
        self.layout = {}
        for key in [*names, *self.KEYS]:
            mm = np.load(os.path.join(folder, f"{key}.npy"), mmap_mode="r")
            self.layout[key] = (int(mm.offset), mm.shape[1:], mm.dtype)
            del mm
        self.n = len(np.load(os.path.join(folder, "gt.npy"), mmap_mode="r"))
        self._fds, self._pid = None, None

    def _open(self):
        if self._fds is None or self._pid != os.getpid():
            self._fds = {k: os.open(os.path.join(self.folder, f"{k}.npy"), os.O_RDONLY) for k in self.layout}
            self._pid = os.getpid()
        return self._fds

    def __getstate__(self):
        return dict(self.__dict__, _fds=None, _pid=None)

    def __len__(self):
        return self.n

    def _row(self, key, i):
        offset, shape, dtype = self.layout[key]
        out = np.empty(shape, dtype)
        os.preadv(self._open()[key], [memoryview(out).cast("B")], offset + i * out.nbytes)
        return out

    def __getitem__(self, i):
        return {"features": {k: torch.from_numpy(self._row(k, i)) for k in self.names},
                "gt": torch.from_numpy(self._row("gt", i)), "row": int(i),
                "text_embedding": torch.from_numpy(self._row("embedding", i)),
                "text_mask": torch.from_numpy(self._row("attention_mask", i).astype(bool))}


class ReopeningFeatureDataset(FeatureDataset):
    """FeatureDataset whose reader keeps one shard file open (the default keeps 64): a shuffled pass
    over a real training cache (~7,500 shards of 16 samples for RefCOCO train) opens a file, reads
    its index and closes one for nearly every tensor read; a 128-sample bench store would not."""

    def _open(self):
        fresh = self._cache is None or self._pid != os.getpid()
        cache = super()._open()
        if fresh:
            cache._shard_files = ShardFiles(capacity=1)
        return cache


def same_items(a, b, indices) -> bool:
    for i in indices:
        x, y = a[i], b[i]
        if x["row"] != y["row"] or not all(torch.equal(x["features"][k], y["features"][k]) for k in x["features"]):
            return False
        if not (torch.equal(x["gt"], y["gt"]) and torch.equal(x["text_embedding"], y["text_embedding"])
                and torch.equal(x["text_mask"], y["text_mask"])):
            return False
    return True


# ---- reading -------------------------------------------------------------------------------------
def evict(path: str) -> None:
    """Drop `path`'s files (a file or a directory tree) from the page cache."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def one_pass(loader) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch["row"])
    return time.perf_counter() - t, n


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def real_feature_codecs(model: str, codecs: list[str], images: int, work: str) -> "common.Table":
    """Bytes per sample of each codec on features of a trained backbone (refseg-extract on synthetic
    images): random data says nothing about how real activations compress."""
    from refseg.cache.layout import store_nbytes
    from refseg.extract.pipeline import ExtractionConfig, run_extraction
    from refseg.backbones.loading import load_backbone
    from refseg.core.synthetic import generate

    data = os.path.join(work, "real-data")
    generate(data, images=images, seed=0, image_size=128)
    backbone = load_backbone(model, device="cpu")
    table = common.Table(["model", "codec", "features MB/sample", "vs none", "extraction s"])
    sizes = {}
    for codec in codecs:
        out = os.path.join(work, f"real-{codec}.zarr")
        cfg = ExtractionConfig(data_root=data, dataset="refcoco-synth", split="train", out=out, noise_ts=(NOISE_T,),
                               image_size=128, token_length=16, codec=codec, progress=False)
        t = time.perf_counter()
        report = run_extraction(cfg, backbone=backbone)
        seconds = time.perf_counter() - t
        sizes[codec] = store_nbytes(os.path.join(out, f"t{NOISE_T:04d}")) / report.n_samples
        table.add(model=f"{model} (128², L=16, {report.n_samples} samples)", codec=codec,
                  **{"features MB/sample": sizes[codec] / 1e6, "extraction s": seconds,
                     "vs none": f"{sizes[codec] / sizes[codecs[0]]:.3f}" if codecs[0] == "none" else None})
        shutil.rmtree(out)
    return table


def main(argv=None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    info = common.RunInfo(torch.device("cpu"))
    from refseg.cache.layout import DEFAULT_SHARD_SIZE
    from refseg.heads.batches import make_loader

    spec = spec_for(args.image_size, args.token_length)
    codecs = [c for c in args.codecs.split(",") if c]
    shard_sizes = common.int_list(args.shard_sizes)
    workers = common.int_list(args.workers)
    modes = [m for m in args.modes.split(",") if m]
    layouts = [(c, DEFAULT_SHARD_SIZE) for c in codecs]
    layouts += [("none", s) for s in shard_sizes if ("none", s) not in layouts]
    if ("none", DEFAULT_SHARD_SIZE) not in layouts:
        layouts.insert(0, ("none", DEFAULT_SHARD_SIZE))  # the reference for the item check and the zarr-path row

    work = tempfile.mkdtemp(prefix="refseg-bench-read-", dir=args.dir)
    try:
        print(f"generating {args.samples} random samples (SD1.5 shapes at {args.image_size}², "
              f"L={args.token_length}) ...",
              flush=True)
        data = random_data(spec, args.samples)
        item_bytes = sum(data[k][0].nbytes for k in [*spec.names, "gt", "embedding", "attention_mask"])
        feature_bytes = sum(data[k][0].nbytes for k in spec.names)
        paths, write_s, disk = {}, {}, {}
        for codec, shard in layouts:
            name = f"zarr {codec}, shard {shard}"
            paths[name] = os.path.join(work, f"{codec}-{shard}.zarr")
            t = time.perf_counter()
            write_store(paths[name], spec, data, codec, shard)
            write_s[name] = time.perf_counter() - t
            disk[name] = dir_bytes(os.path.join(paths[name], f"t{NOISE_T:04d}")) / args.samples
            print(f"  wrote {name}: {write_s[name]:.1f} s, {disk[name] / 1e6:.2f} MB/sample of features", flush=True)
        floor = "raw .npy files, one pread per tensor (floor)"
        paths[floor] = os.path.join(work, "floor")
        t = time.perf_counter()
        write_floor(paths[floor], spec, data)
        write_s[floor] = time.perf_counter() - t
        disk[floor] = sum(os.path.getsize(os.path.join(paths[floor], f"{k}.npy")) for k in spec.names) / args.samples
        del data
        os.sync()
        total_gb = dir_bytes(work) / 1e9
        print(f"  {total_gb:.2f} GB on disk under {work}", flush=True)

        base = f"zarr none, shard {DEFAULT_SHARD_SIZE}"
        through_zarr = f"{base}, through zarr (direct_reads=False)"
        reopening = f"{base}, every shard file reopened (as in a cache of thousands of shards)"
        for name in ([] if args.no_zarr_path else [through_zarr]) + [reopening]:
            paths[name], disk[name], write_s[name] = paths[base], disk[base], None

        def dataset(name):
            # codec none reads rows straight from the shard files (cache/fastread.py); zstd/blosc through zarr
            if name == floor:
                return RawFileDataset(paths[name], spec.names)
            if name == reopening:
                return ReopeningFeatureDataset(paths[name], NOISE_T)
            return FeatureDataset(paths[name], NOISE_T, direct_reads=name != through_zarr)

        reference = FeatureDataset(paths[base], NOISE_T, direct_reads=False)
        for name in paths:
            if "int8" in name:  # 8-bit codes read back within half a step, not exactly (cache/quantize.py)
                continue
            if not same_items(reference, dataset(name), [0, args.samples - 1]):
                raise SystemExit(f"{name}: items differ from FeatureDataset's")

        order = torch.randperm(args.samples, generator=torch.Generator().manual_seed(0)).tolist()
        cpu = torch.device("cpu")
        loaders = {(name, w): make_loader(dataset(name), args.batch_size, cpu, sampler=order, workers=w)
                   for name in paths for w in workers}
        print("warm-up pass over every variant (starts the persistent workers, fills the page cache) ...", flush=True)
        for key, loader in loaders.items():
            one_pass(loader)
        times = {(mode, key): [] for mode in modes for key in loaders}
        for r in range(args.repeats):
            for mode in modes:
                for key, loader in loaders.items():
                    if mode == "cold":
                        evict(paths[key[0]])
                    seconds, n = one_pass(loader)
                    assert n == args.samples
                    times[(mode, key)].append(seconds)
            print(f"  repeat {r + 1}/{args.repeats} done", flush=True)
        # sequential raw read of the floor's feature files in one process: the disk/page-cache limit itself
        raw = {}
        for mode in modes:
            files = [os.path.join(paths[floor], f"{k}.npy") for k in [*spec.names, "gt", "embedding", "attention_mask"]]
            samples_s = []
            for _ in range(args.repeats):
                if mode == "cold":
                    for f in files:
                        evict(f)
                t = time.perf_counter()
                for f in files:
                    with open(f, "rb") as fh:
                        while fh.read(16 << 20):
                            pass
                samples_s.append(time.perf_counter() - t)
            raw[mode] = samples_s
        # Cache.read_rows / FeatureDataset preload take a list of rows or a slice
        rows_col = f"read 8 rows of s8 ({spec['s8'].nbytes(2) / 1e6:.2g} MB each, warm)"
        selection = common.Table([rows_col, "ms", "spread", "vs zarr"])
        from refseg.cache import open_cache

        direct_cache, zarr_cache = open_cache(paths[base]), open_cache(paths[base], direct_reads=False)
        rows = np.sort(np.array(order[:8]))
        picks, zarr_row_of = {}, {}
        for what, sel_rows in (("8 scattered rows", rows), ("slice of 8 contiguous rows", slice(0, 8))):
            direct_name = f"{what}, Cache.read_rows (direct reads, default)"
            zarr_name = f"{what}, Cache.read_rows through zarr (direct_reads=False)"
            picks[direct_name] = lambda c=direct_cache, r=sel_rows: c.read_rows(NOISE_T, r, "s8")
            picks[zarr_name] = lambda c=zarr_cache, r=sel_rows: c.read_rows(NOISE_T, r, "s8")
            zarr_row_of[direct_name] = zarr_row_of[zarr_name] = zarr_name
        sel = common.interleaved(picks, torch.device("cpu"), repeats=args.repeats, warmup=1, min_time=0.0)
        for name, t in sel.items():
            reference = common.median(sel[zarr_row_of[name]])
            selection.add(**{rows_col: name, "ms": common.median(t) * 1e3,
                             "spread": common.spread(t), "vs zarr": f"{reference / common.median(t):.2f}x"})
        real = None
        if args.real_model:
            print(f"codecs on features of {args.real_model} ...", flush=True)
            try:
                real = real_feature_codecs(args.real_model, ["none", *[c for c in codecs if c != "none"]], 24, work)
            except Exception as exc:  # tiny-synth is optional in an installation
                print(f"  skipped: {exc}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    table = common.Table(["read", "workers", "layout", "MB/sample on disk (features)", "vs raw size",
                          "samples/s", "GB/s", "spread", "% of floor"])
    for mode in modes:
        for w in workers:
            floor_sps = args.samples / common.median(times[(mode, (floor, w))])
            for name in paths:
                t = times[(mode, (name, w))]
                sps = args.samples / common.median(t)
                table.add(**{"read": mode, "workers": w, "layout": name,
                             "MB/sample on disk (features)": disk[name] / 1e6,
                             "vs raw size": f"{disk[name] / feature_bytes:.3f}", "samples/s": sps,
                             "GB/s": sps * item_bytes / 1e9, "spread": common.spread(t),
                             "% of floor": f"{100 * sps / floor_sps:.0f}%"})
        table.add(**{"read": mode, "workers": "–", "layout": "sequential file read, 1 process (no DataLoader)",
                     "samples/s": args.samples / common.median(raw[mode]),
                     "GB/s": args.samples * item_bytes / common.median(raw[mode]) / 1e9,
                     "spread": common.spread(raw[mode])})
    writes = common.Table(["layout", "write s (all arrays)", "MB/s (features)"])
    for name in paths:
        if write_s[name] is None:
            continue
        writes.add(**{"layout": name, "write s (all arrays)": write_s[name],
                      "MB/s (features)": feature_bytes * args.samples / write_s[name] / 1e6})
    notes = [
        f"{args.samples} samples per store; an item = {len(spec.names)} feature/attention tensors "
        f"({feature_bytes / 1e6:.2f} MB f16) + GT mask + text embedding + mask = {item_bytes / 1e6:.2f} MB, "
        f"read in shuffled order, batch {args.batch_size}, through refseg.heads.batches.make_loader (persistent workers)",
        f"{len(paths)} readers (floor included), {total_gb:.2f} GB on disk in all; median of {args.repeats} passes, "
        "interleaved across layouts; '% of floor' compares with the raw-file row at the same workers/mode",
        "cold = files evicted from the page cache (posix_fadvise DONTNEED) before each pass; warm = in the page cache",
        "random float16 data: the codec ratios are those of noise-like mantissas (real features may compress a "
        "little better); zstd = ZstdCodec(level=1), blosc = Blosc(zstd, clevel 1, bitshuffle)",
    ]
    sections = [("DataLoader throughput", table), ("Write time (CacheWriter, single process)", writes)]
    sections.append(("Reading several rows at once (what FeatureDataset preload does)", selection))
    if real is not None:
        sections.append(("Codecs on real features (a trained backbone's, extracted by refseg-extract)", real))
    common.publish(f"Cache reads: SD1.5 shapes at {args.image_size}², L={args.token_length}", info, sections, notes,
                   append=not args.no_append, json_out=args.json)


if __name__ == "__main__":
    main()
