"""VPD's tiny fixture (tests/fixtures/vpd-tiny) through refseg on any device and precision (issue 12).

For each (compute dtype, cache dtype): `refseg-import vpd` at that precision, `refseg-extract --preset
vpd` of the fixture's two samples, the head's masks from the cache (what `refseg-eval` scores), and
against VPD's recorded forward pass (io.npz): the relative error of every cached tensor
(max |refseg - VPD| / max |VPD|), the flipped mask pixels, and the largest VPD logit margin among them.
First, how far this machine's decoded and resized input images are from those VPD consumed (another
Pillow resizes differently), and the TF32 settings the process starts with (refseg turns TF32 off
itself for --dtype fp32: refseg_core/precision.py).

    python bench/vpd_fixture.py --device cuda --json out.json       # the GPU check runs this
    python bench/vpd_fixture.py --device cpu --variants fp32/fp32    # tests/test_vpd_import.py runs this

Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _vpd_util import BASE, CKPT, DATASET_NAME, FIXTURE, write_fixture_dataset  # noqa: E402

TENSORS = {"latent": "latents", "embedding": "c_crossattn", "s8": "s8", "s16": "s16", "s32": "s32", "s64": "s64",
           "attn_s16": "attn_s16", "attn_s32": "attn_s32"}


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def run_variant(device: str, dtype: str, cache_dtype: str, work: Path, io: dict) -> dict:
    from refseg.cache import open_cache
    from refseg.extract.config import ExtractionConfig, with_preset
    from refseg.extract.pipeline import run_extraction
    from refseg.heads.evaluate import predict
    from refseg.study.vpd_run import import_vpd

    imported = work / f"imported-{dtype}"
    if not imported.exists():
        import_vpd(CKPT, str(BASE), imported, dtype=dtype)
    data = work / "data"
    if not data.exists():
        write_fixture_dataset(data)
    out = work / f"{dtype}-{cache_dtype}.zarr"
    cfg = ExtractionConfig(data_root=str(data), dataset=DATASET_NAME, split="val", model=str(imported / "model"),
                           image_size=256, device=device, dtype=dtype, out=str(out), progress=False,
                           cache_dtype=cache_dtype)
    run_extraction(with_preset(cfg, "vpd", {"image_size", "device", "dtype"}))
    cache = open_cache(out)
    rows = list(range(cache.n_samples))
    ours = {"latent": cache.latents(rows), "embedding": cache.embeddings(rows),
            **{name: cache.read_rows(0, rows, name) for name in TENSORS if name.startswith(("s", "attn"))}}
    # the head as `refseg-eval --head-dtype fp32` runs it for fp32 variants (else bf16 autocast on a GPU)
    head_dtype = "fp32" if dtype == "fp32" else "auto"
    masks = np.stack([p["pred"] for p in predict(imported / "run", out, device=device, head_dtype=head_dtype)])
    flipped = masks.astype(bool) != io["mask"].astype(bool)
    margin = np.abs(io["logits"][:, 1] - io["logits"][:, 0])
    return {"device": device, "dtype": dtype, "cache_dtype": cache_dtype, "head_dtype": head_dtype,
            "relative_error": {name: relative_error(ours[name], io[ref]) for name, ref in TENSORS.items()},
            "flipped_pixels": int(flipped.sum()), "pixels": int(flipped.size),
            "largest_margin_flipped": float(margin[flipped].max()) if flipped.any() else 0.0}


def preprocessing(io: dict) -> dict:
    """How far refseg's image tensors (decode, squash to 256², normalise) are from those VPD consumed, and
    the library versions that decide it: another Pillow's resize is a different input for everything after."""
    import PIL
    import torch

    from refseg.core.transforms import image_to_tensor, load_image

    x = torch.stack([image_to_tensor(load_image(FIXTURE / "images" / f"sample{i}.png", target_size=256), 256)
                     for i in range(len(io["image"]))])
    return {"input_image_max_abs_difference": float(np.abs(x.numpy() - io["image"]).max()),
            "pillow": PIL.__version__, "numpy": np.__version__, "torch": torch.__version__,
            "float32_matmul_precision_at_start": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32_at_start": torch.backends.cudnn.allow_tf32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default="fp32/fp32,fp32/fp16,bf16/fp32,bf16/fp16",
                   help="comma list of COMPUTE/CACHE dtypes")
    p.add_argument("--json", default=None, help="also write the results (a list) here")
    args = p.parse_args(argv)
    io = dict(np.load(FIXTURE / "io.npz"))
    print(json.dumps(preprocessing(io)), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="vpd-fixture-") as work:
        for variant in args.variants.split(","):
            dtype, cache_dtype = variant.split("/")
            results.append(run_variant(args.device, dtype, cache_dtype, Path(work), io))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
