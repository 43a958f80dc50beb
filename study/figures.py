"""Figures a researcher would rather look at than read: ablation table + plot, training curves,
noise strip, feature view (PCA), best/worst overlays.

Each function takes plain inputs (paths, caches, summaries) and writes one file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from refseg.core.metrics import TABLE_COLUMNS, format_table  # noqa: E402
from refseg.heads.run_dir import read_metrics  # noqa: E402


# ---- ablation table ------------------------------------------------------------------------------

def ablation_markdown(results: list[dict]) -> str:
    """`results`: [{"head", "noise_t", "summary"}] -> one table per head in the report's layout."""
    parts = []
    for head in dict.fromkeys(r["head"] for r in results):
        rows = [(str(r["noise_t"]), r["summary"]) for r in results if r["head"] == head]
        parts.append(f"### head `{head}`\n\n{format_table(rows, first_col='Noise')}\n")
    return "\n".join(parts)


def write_ablation_csv(results: list[dict], path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["head", "noise_t", *TABLE_COLUMNS, "n"])
        for r in results:
            s = r["summary"]
            w.writerow([r["head"], r["noise_t"], *[f"{s[k]:.2f}" for k in TABLE_COLUMNS], s["n"]])
    return path


def plot_ablation(results: list[dict], path) -> Path:
    """oIoU and mIoU against the noise level, one line per head (T on a categorical axis: 0, 5, 500)."""
    noise = sorted({r["noise_t"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, key in zip(axes, ("oIoU", "mIoU")):
        for head in dict.fromkeys(r["head"] for r in results):
            by_t = {r["noise_t"]: r["summary"][key] for r in results if r["head"] == head}
            ax.plot(range(len(noise)), [by_t.get(t, np.nan) for t in noise], marker="o", label=head)
        ax.set_xticks(range(len(noise)), [f"T={t}" for t in noise])
        ax.set_title(key)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Noise ablation (val)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---- training curves -----------------------------------------------------------------------------

def plot_curves(runs: dict[str, Path], path) -> Path:
    """Training loss and val oIoU per epoch from each run's metrics.jsonl."""
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, run in runs.items():
        records = read_metrics(run)
        epochs = [m["epoch"] for m in records]
        ax_loss.plot(epochs, [m["loss"] for m in records], label=label)
        val = [(m["epoch"], m["val"]["oIoU"]) for m in records if m.get("val")]
        if val:
            ax_iou.plot(*zip(*val), marker=".", label=label)
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_iou.set(title="val oIoU (%)", xlabel="epoch")
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
    ax_iou.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---- noise strip ---------------------------------------------------------------------------------

def _to_pil(x) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> PIL image."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def noise_strip(backbone, cache, row: int, noise_ts, image_path, path) -> Path:
    """One image's stored latent at each T decoded back through the VAE: what the UNet sees.

    Uses the cache's own z0 and the same ε the extractor drew, so the strip shows exactly the inputs
    behind the stored features.
    """
    import torch

    from refseg.core.noise import add_noise, alphas_cumprod, make_noise
    from refseg.core.transforms import image_to_tensor, load_image

    image_row = int(cache.index["image_row"][row])
    image_id = int(cache.index["image_id"][row])
    extraction = cache.settings["extraction"]
    scale = backbone.scaling_factor if extraction["latent_scaling"] == "sd" else 1.0
    z0 = torch.from_numpy(cache.latents([image_row])).float()
    acp = alphas_cumprod(backbone.scheduler_config)
    size = cache.spec.image_size
    tiles = [(_to_pil(image_to_tensor(load_image(image_path), size)), "input")]
    with torch.inference_mode():
        for t in noise_ts:
            eps = make_noise(tuple(z0.shape[1:]), extraction["noise_seed"], image_id, t)[None]
            zt = add_noise(z0, t, eps, acp) / scale
            x = backbone.vae.decode(zt.to(backbone.device, backbone.dtype)).sample[0]
            tiles.append((_to_pil(x), f"T={t}"))
    fig, axes = plt.subplots(1, len(tiles), figsize=(2.2 * len(tiles), 2.5))
    for ax, (img, title) in zip(axes, tiles):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("latent at each noise level, decoded by the VAE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---- feature view --------------------------------------------------------------------------------

def pca_rgb(feature: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1]: the first three principal components of the pixels' features."""
    from sklearn.decomposition import PCA

    c, h, w = feature.shape
    pixels = feature.reshape(c, h * w).T.astype(np.float32)
    if h * w < 2:  # a 1×1 level has no spatial variance to project
        return np.full((h, w, 3), 0.5, dtype=np.float32)
    n = min(3, pixels.shape[0], pixels.shape[1])
    comps = PCA(n_components=n, random_state=0).fit_transform(pixels)
    if n < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - n)))
    lo, hi = comps.min(0), comps.max(0)
    return ((comps - lo) / np.where(hi > lo, hi - lo, 1)).reshape(h, w, 3)


def feature_view(cache, t: int, row: int, tokens: list[str], path, max_tokens: int = 4) -> Path:
    """Each cached level of one sample as PCA-RGB, next to its cross-attention maps for content tokens.

    `tokens`: the sample's token strings (position i = token i of input_ids); special and padding
    tokens and a few stop words are left out of the attention panels.
    """
    sample = cache.read(t, row)
    features = cache.spec.features
    attention = cache.spec.attention
    stop = {"the", "a", "an", "of", "to", "on", "at", "in", "one", "shape", ""}
    content = [i for i, tok in enumerate(tokens) if tok and not tok.startswith("<|") and tok not in stop][:max_tokens]
    att = attention[-1] if attention else None  # the finest attention stride
    n = len(features) + (len(content) if att is not None else 0)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(2.1 * max(n, 1), 2.6))
    axes = np.atleast_1d(axes)
    for ax, info in zip(axes, features):
        ax.imshow(pca_rgb(sample[info.name].astype(np.float32)), interpolation="nearest")
        ax.set_title(f"{info.name} ({info.channels} ch)", fontsize=8)
    for ax, i in zip(axes[len(features):], content):
        ax.imshow(sample[att.name][i].astype(np.float32), cmap="magma", interpolation="nearest")
        ax.set_title(f"{att.name}: '{tokens[i]}'", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"T={t}: \"{cache.texts[row]}\"", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---- best / worst overlays -----------------------------------------------------------------------

def overlay_grid(records: list[dict], cache, image_path_of, path, k: int = 4) -> Path:
    """The k best and k worst samples by IoU: image, GT green, prediction red, sentence and IoU.

    `records`: [{"row", "pred" (bool S×S), "iou"}]; `image_path_of(image_id)` gives the file.
    """
    from refseg.heads.overlays import overlay_image
    from refseg.core.transforms import load_image

    ranked = sorted(records, key=lambda r: (r["iou"], r["row"]))
    worst, best = ranked[:k], ranked[::-1][:k]
    size = cache.spec.image_size
    tiles = []
    for r in best + worst:
        row = r["row"]
        gt = cache.gt([row])[0] != 0
        image = load_image(image_path_of(int(cache.index["image_id"][row]))).convert("RGB").resize((size, size))
        tiles.append(overlay_image(image, r["pred"], gt, f"{cache.texts[row]} (IoU {100 * r['iou']:.0f})"))
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    cols = max(len(best), len(worst), 1)
    grid = Image.new("RGB", (cols * width, 2 * height + 20), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols) if i < len(best) else (1, i - len(best))
        grid.paste(tile, (c * width, 10 + r * height))
    draw.text((2, 0), "best (top row) and worst (bottom row) val samples", fill="black")
    grid.save(path)
    return Path(path)
