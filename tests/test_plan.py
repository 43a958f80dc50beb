"""`refseg-extract --dry-run` and the space check (issue 24, item 3): the plan is printed and nothing is
written; the planned size is within 10% of the finished store's; a store that cannot fit is refused in
one line before any work, unless --no-space-check."""

from __future__ import annotations

import os
from collections import namedtuple

import pytest
from click.testing import CliRunner

from refseg.cache.layout import store_nbytes
from refseg.extract.cli import main as extract_main


def args(synth_root, out, *extra):
    return ["--data-root", str(synth_root), "--dataset", "refcoco-synth", "--split", "train", "--model", "tiny",
            "--noise-t", "0", "--noise-t", "5", "--noise-t", "500", "--image-size", "64", "--token-length", "16",
            "--limit", "24", "--shard-size", "4", "--quiet", "--out", str(out), *extra]


def planned_total(stdout: str) -> float:
    line = next(line for line in stdout.splitlines() if "the finished store" in line)
    number, unit = line.rsplit("the finished store ", 1)[1].split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.mark.parametrize("extra", [(), ("--cache-dtype", "int8"), ("--prompt", "empty")], ids=["fp16", "int8", "empty"])
def test_a_dry_run_writes_nothing_and_plans_the_store_within_10_percent(synth_root, tmp_path, extra):
    out = tmp_path / "C.zarr"
    dry = CliRunner().invoke(extract_main, args(synth_root, out, "--dry-run", *extra))
    assert dry.exit_code == 0, dry.output
    assert f"plan for {out}: " in dry.stdout and "noise levels [0, 5, 500]" in dry.stdout
    assert "nothing was written (--dry-run)" in dry.stdout and "free at" in dry.stdout
    assert sorted(os.listdir(tmp_path)) == []  # no store, no lock file
    done = CliRunner().invoke(extract_main, args(synth_root, out, *extra))
    assert done.exit_code == 0, done.output
    from refseg.cache import open_cache

    cache = open_cache(out)
    assert f"{cache.n_samples} samples (sentences), {cache.n_images} images" in dry.stdout
    assert abs(planned_total(dry.stdout) - store_nbytes(str(out))) <= 0.10 * store_nbytes(str(out)), (
        planned_total(dry.stdout), store_nbytes(str(out)))
    again = CliRunner().invoke(extract_main, args(synth_root, out, "--dry-run", *extra))
    assert "already in the store: T=0: complete, T=5: complete, T=500: complete" in again.stdout
    assert "to write: 0 B" in again.stdout


def test_a_store_that_cannot_fit_is_refused_before_any_work(synth_root, tmp_path, monkeypatch):
    out = tmp_path / "C.zarr"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("refseg.extract.plan.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 20_000, 20_000))
    refused = CliRunner().invoke(extract_main, args(synth_root, out))
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    line = refused.stderr.strip()
    assert line.startswith(f"error: cache {out} needs ") and "but 20.0 KB are free there" in line, line
    assert "--no-space-check" in line and "\n" not in line
    assert sorted(os.listdir(tmp_path)) == []
    forced = CliRunner().invoke(extract_main, args(synth_root, out, "--no-space-check"))
    assert forced.exit_code == 0, forced.output


def test_du_says_where_the_bytes_are(synth_root, tmp_path):
    from refseg.cache.cli import main as cache_main
    from refseg.cache.usage import disk_usage

    out = tmp_path / "C.zarr"
    assert CliRunner().invoke(extract_main, args(synth_root, out)).exit_code == 0
    rows = disk_usage(str(out))
    sizes = dict(rows[:-1])
    assert rows[-1] == ("", store_nbytes(str(out))) and sum(sizes.values()) == rows[-1][1]
    assert sizes["t0000/s8"] > sizes["t0000/s64"] > 0 and "masks/gt" in sizes and "images/latent" in sizes
    assert rows[0][1] == max(sizes.values())  # largest first
    shown = CliRunner().invoke(cache_main, ["du", str(out)])
    assert shown.exit_code == 0 and "t0000/s8" in shown.stdout and f"total ({out})" in shown.stdout
    bad = CliRunner().invoke(cache_main, ["du", str(tmp_path)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """`--model tiny` written as a diffusers folder: a model whose configs say its shapes."""
    from refseg.backbones.families import FAMILIES
    from refseg.backbones.loading import save_backbone

    return save_backbone(FAMILIES["sd"].build_tiny(), tmp_path_factory.mktemp("model") / "tiny-folder")


def test_every_family_is_planned_from_its_configs_as_from_its_loaded_model(tmp_path):
    from refseg.backbones.config_only import backbone_shapes
    from refseg.backbones.families import FAMILIES
    from refseg.backbones.loading import load_backbone, save_backbone

    def shapes(backbone):
        size = 2 * backbone.max_stride
        return (backbone.family.name, backbone.default_image_size, backbone.max_stride, backbone.max_token_length,
                backbone.schedule_steps, backbone.spec(size, 8), backbone.text_shape(8), backbone.pooled_dim,
                backbone.noise_input(t=5), backbone.noise_input(t=500))

    for name, family in FAMILIES.items():
        folder = save_backbone(family.build_tiny(), tmp_path / name, family=family)
        from_configs = backbone_shapes(str(folder))
        assert from_configs is not None and next(from_configs.denoiser.parameters()).is_meta, name  # no weights
        assert shapes(from_configs) == shapes(load_backbone(str(folder), device="cpu")), name
    assert backbone_shapes("tiny") is None  # built in code: the run plans once it is built
    assert backbone_shapes(str(tmp_path / "absent")) is None  # the full load says what is wrong


def test_a_folder_model_is_planned_and_refused_before_its_weights_load(synth_root, tiny_folder, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "C.zarr"
    planned_after_loading = CliRunner().invoke(extract_main, args(synth_root, out, "--dry-run"))  # --model tiny
    assert planned_after_loading.exit_code == 0, planned_after_loading.output

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("refseg.extract.pipeline.load_backbone", no_weights)
    dry = CliRunner().invoke(extract_main, args(synth_root, out, "--dry-run", "--model", str(tiny_folder)))
    assert dry.exit_code == 0, dry.output
    assert dry.stdout == planned_after_loading.stdout  # the same plan, from the configs alone
    assert sorted(os.listdir(tmp_path)) == []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("refseg.extract.plan.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 20_000, 20_000))
    refused = CliRunner().invoke(extract_main, args(synth_root, out, "--model", str(tiny_folder)))
    assert refused.exit_code == 2 and refused.stderr.startswith(f"error: cache {out} needs "), refused.output
    assert "but 20.0 KB are free there" in refused.stderr and "the weights were loaded" not in refused.output
    assert sorted(os.listdir(tmp_path)) == []


def test_the_readme_disk_table_of_full_refcoco_is_the_plan_of_its_spec():
    """README's full-RefCOCO rows are planned_bytes of SD1.5's spec (512 px, L = 40), not typed in."""
    from pathlib import Path

    from bench.models import SD15_UNET_CONFIG
    from refseg.cache.usage import planned_bytes
    from refseg.core.feature_spec import FeatureSpec

    def size(n: float) -> str:  # three significant digits, as the table shows them
        unit = next(u for u, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)) if n >= scale)
        return f"{n / {'TB': 1e12, 'GB': 1e9, 'MB': 1e6}[unit]:#.3g}".rstrip(".") + f" {unit}"

    spec = FeatureSpec.from_unet_config(dict(SD15_UNET_CONFIG), 512, 40)
    assert spec.bytes_per_sample() == 4_853_760  # the 4.85 MB per sample per level
    sentences, images = 120_624, 16_994  # RefCOCO unc train
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for store, options, rows, what in (("float16 (default)", {}, sentences, "sentences"),
                                       ("`--cache-dtype int8`", {"cache_dtype": "int8"}, sentences, "sentences"),
                                       ("no-sentence baseline", {"per_image_levels": True}, images, "images")):
        one, three = (planned_bytes(spec, sentences, images, levels, **options) for levels in ([0], [0, 5, 500]))
        row = (f"| {size(one['per_level'] / rows)} | {rows:,} {what} | {size(one['per_level'])} | "
               f"{size(one['total'])} | {size(three['total'])} |")
        line = next(line for line in readme.splitlines() if line.startswith(f"| {store}"))
        assert line.endswith(row), (line, row)
    assert f"adds, once, {size(one['store'])} of GT masks" in readme
