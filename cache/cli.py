"""`refseg-cache`: look inside a feature cache, or export it to HDF5."""

import click

from refseg.core.cli import current_runtime, user_errors


@click.group()
def main():
    """Inspect and export refseg feature caches (Zarr v3 stores written by refseg-extract)."""


@main.command()
@click.argument("cache_path", metavar="CACHE")
@user_errors
def info(cache_path):
    """Print a cache's settings, tensors, noise levels with done counts, and size on disk."""
    from refseg.cache.reader import open_cache

    click.echo(open_cache(cache_path).describe())


@main.command("export-h5")
@click.argument("cache_path", metavar="CACHE")
@click.argument("out_path", metavar="OUT.h5")
@click.option("--overwrite", is_flag=True, help="Replace OUT.h5 if it exists.")
@user_errors
def export_h5_command(cache_path, out_path, overwrite):
    """Write every array and attribute of CACHE to one HDF5 file (same groups and names).

    The file is as large as the cache's uncompressed data: check `refseg-cache info` first.
    """
    from refseg.cache.h5export import export_h5

    export_h5(cache_path, out_path, overwrite=overwrite, progress=current_runtime().progress)
    click.echo(f"wrote {out_path}")


if __name__ == "__main__":
    main()
