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
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from refseg.core.metrics import TABLE_COLUMNS  # noqa: E402
from refseg.core.noise import add_noise, alphas_cumprod, make_noise  # noqa: E402
from refseg.core.transforms import image_to_tensor, load_image, to_rgb8  # noqa: E402
from refseg.heads.overlays import font, legend, overlay_image  # noqa: E402
from refseg.heads.run_dir import read_metrics  # noqa: E402


# ---- ablation table (mean ± std over seeds) ---------------------------------------------------------
# A cell is one (head, T, baseline or not) of the sweep: {"head", "noise_t", "text_blind", "n_seeds",
# "<metric>_mean", "<metric>_std"} for each metric of TABLE_COLUMNS (refseg.heads.sweep's summary rows).
# The demo's baseline cells (text_blind) are its no-sentence baseline: a text-blind head trained on the
# empty prompt's features (study/demo_config.py, `DemoConfig.extractions`).
BASELINE = "no sentence"


def cell_label(cell: dict) -> str:
    return f"{cell['head']} ({BASELINE})" if cell.get("text_blind") else str(cell["head"])


def mean_std(cell: dict, metric: str) -> str:
    """'23.41 ± 1.20': the mean and sample std over the cell's seeds ('23.41' alone for one seed)."""
    mean, std = float(cell[f"{metric}_mean"]), cell[f"{metric}_std"]
    return f"{mean:.2f}" if std == "" or np.isnan(float(std)) else f"{mean:.2f} ± {float(std):.2f}"


def ablation_markdown(cells: list[dict]) -> str:
    """One table per head (and per no-sentence baseline): Noise, P@0.5..P@0.9, oIoU, mIoU as mean ± std, seeds."""
    parts = []
    for label in dict.fromkeys(cell_label(c) for c in cells):
        lines = ["| Noise | " + " | ".join(TABLE_COLUMNS) + " | seeds |",
                 "|---|" + "---:|" * (len(TABLE_COLUMNS) + 1)]
        for c in cells:
            if cell_label(c) == label:
                lines.append(f"| {c['noise_t']} | " + " | ".join(mean_std(c, k) for k in TABLE_COLUMNS)
                             + f" | {int(c['n_seeds'])} |")
        parts.append(f"### head `{label}`\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def write_ablation_csv(cells: list[dict], path) -> Path:
    """head, text_blind, noise_t, n_seeds, then <metric>_mean and <metric>_std per metric (2 decimals)."""
    path = Path(path)
    stats = [f"{k}_{s}" for k in TABLE_COLUMNS for s in ("mean", "std")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["head", "text_blind", "noise_t", "n_seeds", *stats])
        for c in cells:
            w.writerow([c["head"], int(bool(c.get("text_blind"))), c["noise_t"], int(c["n_seeds"]),
                        *["" if c[k] == "" or np.isnan(float(c[k])) else f"{float(c[k]):.2f}" for k in stats]])
    return path


def plot_ablation(cells: list[dict], path, chance: dict | None = None, every_object: dict | None = None) -> Path:
    """oIoU and mIoU against the noise level, one line per head (dashed: no sentence), error bars = std
    over seeds; `chance` ({"oIoU", "mIoU"}: predicting every pixel, %) as a dotted line, `every_object`
    (predicting every object of the image) as a dash-dotted one. T on a categorical axis."""
    noise = sorted({c["noise_t"] for c in cells})
    labels = list(dict.fromkeys(cell_label(c) for c in cells))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key in zip(axes, ("oIoU", "mIoU")):
        for n, label in enumerate(labels):
            by_t = {c["noise_t"]: c for c in cells if cell_label(c) == label}
            x = np.arange(len(noise)) + 0.06 * (n - (len(labels) - 1) / 2)  # bars side by side, not on top
            mean = [float(by_t[t][f"{key}_mean"]) if t in by_t else np.nan for t in noise]
            std = [float(by_t[t][f"{key}_std"]) if t in by_t else np.nan for t in noise]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=4, label=label,
                        linestyle="--" if BASELINE in label else "-")
        if chance is not None and key in chance:
            ax.axhline(chance[key], color="grey", linestyle=":", label="chance (predict every pixel)")
        if every_object is not None and key in every_object:
            ax.axhline(every_object[key], color="black", linestyle="-.", linewidth=1,
                       label="every object (sentence unread)")
        ax.set_xticks(range(len(noise)), [f"T={t}" for t in noise])
        ax.set_title(f"val {key} (mean ± std over seeds)")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Noise ablation (val)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---- training curves -----------------------------------------------------------------------------

def plot_curves(groups: dict[str, list[Path]], path) -> Path:
    """Training loss and val oIoU per epoch, one line per group of runs (the seeds of one cell: their
    mean, with the band between the lowest and highest seed). Integer epoch ticks, a legend on each panel."""
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, runs in groups.items():
        for ax, value in ((ax_loss, lambda m: m["loss"]),
                          (ax_iou, lambda m: m["val"]["oIoU"] if m.get("val") else None)):
            per_run = [{m["epoch"]: value(m) for m in read_metrics(run) if value(m) is not None} for run in runs]
            epochs = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
            if not epochs:
                continue
            values = np.array([[r[e] for e in epochs] for r in per_run], dtype=float)
            line, = ax.plot(epochs, values.mean(0), marker=".", label=label)
            if len(runs) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax_loss.set(title="training loss (mean over seeds, band: min-max)", xlabel="epoch")
    ax_iou.set(title="val oIoU % (mean over seeds, band: min-max)", xlabel="epoch")
    for ax in (ax_loss, ax_iou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
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
    image_row = int(cache.index["image_row"][row])
    image_id = int(cache.index["image_id"][row])
    extraction = cache.extraction_record["extraction"]
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
    from sklearn.decomposition import PCA  # deferred: scikit-learn is slow to import and only this view needs it

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


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """An attention map over an image: `heat` (h, w) normalised to [0, 1], upsampled (bilinear) to the
    image's (H, W, 3) in [0, 1], coloured with magma and alpha-blended where it is high."""
    heat = heat.astype(np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    up = F.interpolate(torch.from_numpy(heat)[None, None], size=image.shape[:2], mode="bilinear",
                       align_corners=False)[0, 0].clamp(0, 1).numpy()
    colour = plt.get_cmap("magma")(up)[..., :3]
    weight = alpha * up[..., None]  # low attention leaves the image visible
    return (1 - weight) * image + weight * colour


def feature_view(cache, t: int, row: int, tokens: list[str], path, image=None, max_tokens: int = 4) -> Path:
    """One sample: the input image and each cached level as PCA-RGB (top row), and the cross-attention
    map of each content word laid over the image (bottom row), titled with the word.

    `tokens`: the sample's token strings (position i = token i of input_ids); special and padding
    tokens and a few stop words are left out. `image`: the input as a PIL image (the cache's S x S).
    """
    sample = cache.read(t, row)
    features = cache.spec.features
    attention = cache.spec.attention
    stop = {"the", "a", "an", "of", "to", "on", "at", "in", "one", "shape", ""}
    content = [i for i, tok in enumerate(tokens) if tok and not tok.startswith("<|") and tok not in stop][:max_tokens]
    att = attention[-1] if attention else None  # the finest attention stride
    size = cache.spec.image_size
    rgb = (np.asarray(to_rgb8(image).resize((size, size)), dtype=np.float32) / 255 if image is not None
           else np.full((size, size, 3), 0.5, dtype=np.float32))
    top = [("input", rgb)] + [(f"{info.name} ({info.channels} ch, PCA)", pca_rgb(sample[info.name].astype(np.float32)))
                              for info in features]
    bottom = [(f"'{tokens[i]}' ({att.name})", blend(rgb, sample[att.name][i])) for i in content] if att else []
    cols = max(len(top), len(bottom), 1)
    rows = 2 if bottom else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.4 * rows + 0.4), squeeze=False)
    for r, panels in enumerate((top, bottom)[:rows]):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(panels):
                title, picture = panels[c]
                ax.imshow(picture, interpolation="nearest")
                ax.set_title(title, fontsize=8)
    if bottom:
        axes[1, 0].text(-0.05, 0.5, "cross-attention\nover the image", transform=axes[1, 0].transAxes,
                        ha="right", va="center", fontsize=8)
    fig.suptitle(f"T={t}: \"{cache.texts[row]}\"", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---- best / worst overlays -----------------------------------------------------------------------

def overlay_grid(records: list[dict], cache, image_path_of, path, title: str, k: int = 4) -> Path:
    """The k best and k worst samples by IoU (ties: lower row first), under `title` (the head and T
    shown) and a colour key: GT as a white outline, prediction as a cyan hatch, sentence and IoU wrapped.

    `records`: [{"row", "pred" (bool S×S), "iou"}]; `image_path_of(image_id)` gives the file.
    """
    ranked = sorted(records, key=lambda r: (-r["iou"], r["row"]))
    best, worst = ranked[:k], sorted(ranked[k:], key=lambda r: (r["iou"], r["row"]))[:k]
    size = cache.spec.image_size
    scale = max(1, 256 // size)  # small synthetic images are enlarged so outlines and hatch stay visible
    tiles = []
    for r in best + worst:
        row = r["row"]
        gt = cache.gt([row])[0] != 0
        image = to_rgb8(load_image(image_path_of(int(cache.index["image_id"][row])))).resize((size, size))
        tiles.append(overlay_image(image, r["pred"], gt, f"{cache.texts[row]} (IoU {100 * r['iou']:.0f})",
                                   scale=scale, key=False))
    width = max(t.width for t in tiles) + 6  # a white gap between tiles
    height = max(t.height for t in tiles)
    cols = max(len(best), len(worst), 1)
    header = 18
    key = legend(cols * width)
    grid = Image.new("RGB", (cols * width, header + key.height + 2 * height + 16), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((3, 3), title, fill="black", font=font())
    grid.paste(key, (0, header))
    y0 = header + key.height
    for i, tile in enumerate(tiles):
        r, c = (0, i) if i < len(best) else (1, i - len(best))
        grid.paste(tile, (c * width, y0 + r * (height + 16)))
    draw.text((3, y0 + height + 2), "worst val samples:", fill="black", font=font())
    grid.save(path)
    return Path(path)
