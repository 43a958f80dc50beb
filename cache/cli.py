"""`refseg-cache`: look inside a feature cache, or export it to HDF5."""

import click

from refseg.cache.reader import human_bytes, open_cache
from refseg.cache.usage import disk_usage
from refseg.cache.verify import TABLES, describe, repair as repair_store, verify as verify_store
from refseg.core.cli import current_runtime, user_errors
from refseg.core.errors import DamagedCacheError


@click.group()
def main():
    """Inspect and export refseg feature caches (Zarr v3 stores written by refseg-extract)."""


@main.command()
@click.argument("cache_path", metavar="CACHE")
@user_errors
def info(cache_path):
    """Print a cache's settings, tensors, noise levels with done counts, and size on disk."""
    click.echo(open_cache(cache_path).describe())


@main.command()
@click.argument("cache_path", metavar="CACHE")
@click.option("--repair", is_flag=True,
              help="Mend what is damaged so that rerunning the same refseg-extract recomputes exactly it.")
@user_errors
def verify(cache_path, repair):
    """Read every finished row of CACHE and check each chunk's presence and checksum.

    Prints one line per damaged array (rows and sent_ids) and exits 2 if anything is damaged; with
    --repair it rebuilds lost metadata and clears the damaged rows' done flags, then says what to run.
    """
    damage = verify_store(cache_path)
    if not damage:
        click.echo(f"cache {cache_path}: every finished row is present and matches its checksum")
        return
    for line in describe(cache_path, damage):
        click.echo(f"damaged: {line}")
    if not repair:
        raise DamagedCacheError(f"cache {cache_path} is damaged ({len(damage)} finding(s) above); run "
                                f"`refseg-cache verify {cache_path} --repair`, then the refseg-extract command that "
                                "made it, to recompute exactly what is damaged")
    # twice: an array whose metadata is rebuilt is read only then, and may hold damaged rows itself
    for _ in range(2):
        for action in repair_store(cache_path, damage):
            click.echo(f"repaired: {action}")
        damage = [d for d in verify_store(cache_path) if not d.array.startswith(TABLES)]
        for line in describe(cache_path, damage):
            click.echo(f"damaged: {line}")
        if not damage:
            break
    if damage:
        raise DamagedCacheError(f"cache {cache_path} could not be repaired ({len(damage)} finding(s) above); "
                                "extract it again with --overwrite")
    click.echo(f"now rerun the refseg-extract command that made {cache_path}: it recomputes exactly what was damaged")


@main.command()
@click.argument("cache_path", metavar="CACHE")
@user_errors
def du(cache_path):
    """Bytes on disk per group and array of CACHE, largest first, and the total."""
    open_cache(cache_path)  # a refseg cache, or the one line saying what is there instead
    rows = disk_usage(cache_path)
    total = rows[-1][1]
    for name, size in rows[:-1]:
        click.echo(f"{human_bytes(size):>10}  {100 * size / max(total, 1):5.1f}%  {name}")
    click.echo(f"{human_bytes(total):>10}  100.0%  total ({cache_path})")


@main.command("export-h5")
@click.argument("cache_path", metavar="CACHE")
@click.argument("out_path", metavar="OUT.h5")
@click.option("--overwrite", is_flag=True, help="Replace OUT.h5 if it exists.")
@user_errors
def export_h5_command(cache_path, out_path, overwrite):
    """Write every array and attribute of CACHE to one HDF5 file (same groups and names).

    The file is as large as the cache's uncompressed data: check `refseg-cache info` first.
    """
    from refseg.cache.h5export import export_h5  # deferred: h5py and tqdm load for an export only

    export_h5(cache_path, out_path, overwrite=overwrite, progress=current_runtime().progress)
    click.echo(f"wrote {out_path}")


if __name__ == "__main__":
    main()
