"""`refseg-data`: write the synthetic dataset, or print what a RefCOCO-format dataset holds."""

from __future__ import annotations

import time
from pathlib import Path

import click

from refseg.core.cli import user_errors
from refseg.core.errors import DataError
from refseg.core.paths import check_output_path
from refseg.core.refer import ReferDataset
from refseg.core.synthetic import DATASET_NAME, existing_dataset, generate


@click.group(name="refseg-data")
def main():
    """Datasets in the RefCOCO format (refs(<split_by>).p + instances.json + images)."""


@main.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Root folder; the dataset goes to OUT/refcoco-synth/.")
@click.option("--images", default=200, show_default=True, type=click.IntRange(min=1), help="Number of scenes.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Same seed, same bytes in every file.")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(min=32, max=4096),
              help="Side of the square images in pixels.")
@click.option("--overwrite", is_flag=True, help="Replace the dataset already in OUT/refcoco-synth/.")
@user_errors
def synth(out: Path, images: int, seed: int, image_size: int, overwrite: bool):
    """Write the deterministic synthetic dataset (coloured shapes + referring sentences).

    Then: refseg-data info --data-root OUT --dataset refcoco-synth
    """
    check_output_path(out / DATASET_NAME, "the dataset")
    found = existing_dataset(out)
    if found and not overwrite:
        raise DataError(f"{out / DATASET_NAME} already holds a dataset ({found}); refusing to replace it: pass "
                        "--overwrite to replace it (caches made from it will then say that the dataset changed), "
                        "or choose another --out")
    start = time.perf_counter()
    root = generate(out, images=images, seed=seed, image_size=image_size)
    click.echo(f"wrote {images} images to {root} in {time.perf_counter() - start:.1f}s")
    _print_table(_load(out, root.name, "unc", None))


@main.command()
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="Folder holding <dataset>/refs(<split_by>).p and <dataset>/instances.json.")
@click.option("--dataset", required=True, help="refcoco, refcoco+, refcocog, refcoco-synth ...")
@click.option("--split-by", default="unc", show_default=True, help="unc, google or umd (names refs(<split_by>).p).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None, help="Folder of the images.",
              show_default="<data-root>/<dataset>/images if present, else <data-root>/images/mscoco/images/train2014")
@user_errors
def info(data_root: Path, dataset: str, split_by: str, image_root: Path | None):
    """Print refs / sentences / images per split, and totals."""
    ds = _load(data_root, dataset, split_by, image_root)
    click.echo(f"{ds.dataset} ({ds.refs_path.name}); images under {ds.image_root}")
    if ds.polygons:  # degenerate polygons skipped when rasterising (docs/DESIGN.md §3)
        click.echo(f"polygons: {ds.polygons.describe()}")
    _print_table(ds)


def _load(data_root, dataset, split_by, image_root):

    return ReferDataset(data_root, dataset, split_by=split_by, image_root=image_root)


def _print_table(ds) -> None:
    splits = ds.splits()
    rows = [(name, s["refs"], s["sentences"], s["images"]) for name, s in splits.items()]
    # images are counted once in the total even if refs of two splits shared one
    all_images = len({r["image_id"] for name in splits for r in ds.refs(name)})
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows), all_images))
    width = max(8, *(len(r[0]) for r in rows))
    click.echo(f"{'split':<{width}} {'refs':>8} {'sentences':>10} {'images':>8}")
    for name, refs, sents, imgs in rows:
        click.echo(f"{name:<{width}} {refs:>8} {sents:>10} {imgs:>8}")
