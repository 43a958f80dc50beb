"""`refseg-eval`: metrics of a trained head on a cache, as the report's table."""

from __future__ import annotations

import click

from refseg.core.cli import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--run", required=True, type=click.Path(), help="Run directory written by refseg-train-head.")
@click.option("--cache", "cache_path", required=True, type=click.Path(), help="Cache to evaluate on.")
@click.option("--noise-t", type=int, default=None, help="Noise level [default: the run's].")
@click.option("--allow-noise-mismatch", is_flag=True,
              help="Evaluate at a noise level other than the run's (transfer studies).")
@click.option("--protocol", type=click.Choice(["vpd", "original"]), default="vpd", show_default=True,
              help="vpd: S x S vs the cached GT (LAVT/VPD); original: original size vs the union GT.")
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset root for --protocol original and --overlays [default: the cache's].")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="best = best val oIoU during training (last when trained without val).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write summary + run/cache info as JSON.")
@click.option("--per-sample", type=click.Path(), default=None, help="Write sent_id,ref_id,iou,i,u per sentence.")
@click.option("--overlays", type=click.Path(), default=None, help="Write overlay PNGs (GT green, prediction red).")
@click.option("--max-overlays", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="auto", show_default=True)
@user_errors
def main(run, cache_path, noise_t, allow_noise_mismatch, protocol, data_root, checkpoint, json_out, per_sample,
         overlays, max_overlays, batch_size, device):
    """Evaluate RUN on CACHE: P@0.5..P@0.9, oIoU, mIoU in percent."""
    from refseg.heads.evaluate import evaluate
    from refseg.heads.run_dir import read_config
    from refseg.core.metrics import format_table

    summary = evaluate(run, cache_path, noise_t, protocol=protocol, checkpoint=checkpoint, json_out=json_out,
                       per_sample=per_sample, overlays=overlays, max_overlays=max_overlays, data_root=data_root,
                       device=device, batch_size=batch_size, allow_noise_mismatch=allow_noise_mismatch,
                       progress=True)
    t = noise_t if noise_t is not None else read_config(run)["noise_t"]
    click.echo(format_table([(f"T={t}", summary)], first_col="Noise"))
    click.echo(f"{summary['n']} sentences, protocol {protocol}")


if __name__ == "__main__":
    main()
