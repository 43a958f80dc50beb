"""SDXL- and FLUX-architecture capture at 1024²: FLOPs per sample, samples/s and peak memory, random weights.

    python bench/families.py --device cuda          # full-size SDXL UNet and FLUX.1-dev transformer, bf16
    python bench/families.py --tiny                 # tiny-sdxl / tiny-flux topologies on the CPU (a test runs it)
    python bench/families.py --table                # README's SD3/FLUX rows: bytes, GFLOPs (meta tensors), FLUX peak

Each model is built on the meta device from its config (written out below, from the models'
`config.json`), materialised on the device (`to_empty`) in bf16 and randomly initialised in place
under `torch.no_grad()`: nothing is downloaded and the 12 B FLUX weights are allocated once.
Per model, one captured forward (features and text-token maps at the default layers, maps on) at
batch 1, and 2 when it fits: FLOPs per sample (torch.utils.flop_counter), samples/s (median of
interleaved repeats, CUDA events) and peak device memory (max_memory_allocated, weights included).
Prints one JSON line per model and batch; with `--device cuda` it fits in ~3 minutes on an H100.
FLUX's analytic peak (`flux_capture_peak`, backbones/joint_capture.py's `capture_peak_bytes` with the
text encoders left resident) is printed beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
)
SDXL_POOLED = 1280
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# FLUX.1-dev's text encoders and VAE, for the analytic peak (they may stay on the device)
FLUX_T5_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl encoder
FLUX_CLIP_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77)  # openai/clip-vit-large-patch14
FLUX_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def on_meta(build):
    with torch.device("meta"):
        return build()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def materialise(module, device, dtype, seed: int = 0):
    """A meta-device module on `device` in `dtype`, randomly initialised in place (no second copy)."""
    module = module.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("weight"):  # norms
                p.fill_(1.0)
            else:
                p.zero_()
        for b in module.buffers():  # none persistent in these two, but never leave memory uninitialised
            b.zero_()
    return module.eval().requires_grad_(False)


def flux_capture_peak(image_size: int = 1024, token_length: int = 512, batch: int = 1, itemsize: int = 2,
                      config: dict = FLUX_DEV_CONFIG, n_blocks: int = 3) -> dict[str, int]:
    """FLUX.1-dev's analytic capture peak (bytes by part) with T5-XXL, CLIP-L and the VAE left on the device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from refseg.backbones.joint_capture import capture_peak_bytes

    transformer = n_params(on_meta(lambda: FluxTransformer2DModel(**config)))
    resident = (n_params(on_meta(lambda: T5EncoderModel(T5Config(**FLUX_T5_CONFIG))))
                + n_params(on_meta(lambda: CLIPTextModel(CLIPTextConfig(**FLUX_CLIP_CONFIG))))
                + n_params(on_meta(lambda: AutoencoderKL(**FLUX_VAE_CONFIG))))
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return capture_peak_bytes(params=transformer, resident_params=resident, hidden=hidden,
                              heads=config["num_attention_heads"], image_tokens=(image_size // 16) ** 2,
                              text_tokens=token_length, n_features=n_blocks, n_maps=n_blocks, batch=batch,
                              itemsize=itemsize)


# ---- the two models ------------------------------------------------------------------------------
def sdxl_case(tiny: bool, image: int, device, dtype):
    from diffusers import UNet2DConditionModel

    from refseg.backbones.families.sdxl import UNET_CONFIG as TINY_SDXL, time_ids
    from refseg.core.feature_spec import FeatureSpec
    from refseg.backbones.capture import UNetCapture

    config = TINY_SDXL if tiny else SDXL_UNET_CONFIG
    unet = materialise(on_meta(lambda: UNet2DConditionModel(**config)), device, dtype)
    tokens, pooled = 77, config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    spec = FeatureSpec.from_unet_config(dict(unet.config), image, tokens, 8, (8, 16, 32), (16, 32))

    def make(batch):
        g = torch.Generator(device=device).manual_seed(batch)
        latents = torch.randn(batch, 4, image // 8, image // 8, device=device, dtype=dtype, generator=g)
        context = torch.randn(batch, tokens, config["cross_attention_dim"], device=device, dtype=dtype, generator=g)
        added = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype, generator=g),
                 "time_ids": time_ids(image, batch, dtype, device)}
        steps = torch.full((batch,), 500, dtype=torch.long, device=device)
        cap = UNetCapture(unet, spec).__enter__()
        return lambda: cap.run(latents, steps, context, added_cond_kwargs=added), cap.__exit__

    return "sdxl", unet, spec, make


def flux_case(tiny: bool, image: int, device, dtype):
    from diffusers import FluxTransformer2DModel

    from refseg.backbones.families import FAMILIES, TextConditioning
    from refseg.backbones.families.flux import FLUX_TRANSFORMER_CONFIG
    from refseg.core.feature_spec import FeatureSpec
    from refseg.core.noise import noise_input

    config = FLUX_TRANSFORMER_CONFIG if tiny else FLUX_DEV_CONFIG
    transformer = materialise(on_meta(lambda: FluxTransformer2DModel(**config)), device, dtype)
    tokens = 8 if tiny else 512
    spec = FeatureSpec.from_transformer(dict(transformer.config), image, tokens)
    family = FAMILIES["flux"]
    noise = noise_input(kind="flow", t=500, timestep_scale=family.flow_timestep_scale)  # σ at SD's SNR of T = 500

    def make(batch):
        g = torch.Generator(device=device).manual_seed(batch)
        latents = torch.randn(batch, 16, image // 8, image // 8, device=device, dtype=dtype, generator=g)
        text = TextConditioning(
            torch.randn(batch, tokens, config["joint_attention_dim"], device=device, dtype=dtype, generator=g),
            torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype, generator=g))
        cap = family.capture({"transformer": transformer}, spec).__enter__()
        return lambda: cap.run(latents, noise, text), cap.__exit__

    return "flux", transformer, spec, make


# ---- measuring -----------------------------------------------------------------------------------
def measure(case, args, device, dtype) -> list[dict]:
    name, model, spec, make = case(args.tiny, args.image_size, device, dtype)
    rows = []
    for batch in args.batch_sizes:
        row = dict(model=name, arch="tiny" if args.tiny else "full", image_size=args.image_size, batch=batch,
                   dtype=common.dtype_name(dtype), device=str(device), params=n_params(model),
                   tensors=spec.names, bytes_per_sample_fp16=spec.bytes_per_sample())
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            fn, close = make(batch)
            try:
                row["flops_per_sample"] = common.count_flops(fn) // batch
                times = common.interleaved({"capture": fn}, device, repeats=args.repeats, warmup=1, min_time=0.0)
                if isinstance(times["capture"], str):
                    raise RuntimeError(times["capture"])
                row["samples_per_s"] = batch / common.median(times["capture"])
                row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            finally:
                close()
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc).splitlines()[0][:120]}"
        if name == "flux" and not args.tiny:
            row["analytic_peak_bytes"] = flux_capture_peak(
                args.image_size, spec.token_length, batch, itemsize=torch.finfo(dtype).bits // 8,
                n_blocks=len(spec.features))["total"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        if "error" in row:
            break  # a larger batch will not fit either
    del model
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny-sdxl / tiny-flux topologies (CPU-sized)")
    parser.add_argument("--image-size", type=int, default=None, help="default 1024 (64 with --tiny)")
    parser.add_argument("--batch-sizes", type=common.int_list, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="sdxl,flux")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true",
                        help="only the README families table's SD3/FLUX figures (meta tensors, any machine)")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (64 if args.tiny else 1024)
    common.set_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to(bf16)
    if args.table:
        rows = table_rows(args.image_size)
        peak = flux_capture_peak(args.image_size)
        rows.append({"model": "flux", "analytic_capture_peak_bytes": peak})
        for row in rows:
            print(json.dumps(row), flush=True)
        return rows
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cases = {"sdxl": sdxl_case, "flux": flux_case}
    rows = []
    for name in args.models.split(","):
        rows += measure(cases[name], args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows



# ---- README's families table: bytes and FLOPs per sample per T at the default layers (meta tensors) -----
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)


def table_rows(image_size: int = 1024, token_length: int = 40) -> list[dict]:
    """SD3-medium and FLUX.1-dev at the default layers: bytes per sample per T (float16) and the FLOPs of
    one captured forward (early exit after the last captured block, as extraction runs) and of the plain
    full forward, counted on meta tensors (no memory, no weights)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from refseg.backbones.families import FAMILIES, TextConditioning
    from refseg.core.feature_spec import FeatureSpec
    from refseg.core.noise import noise_input

    rows = []
    for name, cls, config, text_length, pooled in (
            ("sd3", SD3Transformer2DModel, SD3_MEDIUM_CONFIG, 77 + token_length, 2048),
            ("flux", FluxTransformer2DModel, FLUX_DEV_CONFIG, token_length, 768)):
        family = FAMILIES[name]
        model = on_meta(lambda: cls(**config)).eval()
        spec = FeatureSpec.from_transformer(config, image_size, text_length)
        with torch.device("meta"):
            latents = torch.zeros(1, 16, image_size // 8, image_size // 8)
            text = TextConditioning(torch.zeros(1, text_length, 4096), torch.zeros(1, pooled))
        noise = noise_input(kind="flow", t=500, timestep_scale=family.flow_timestep_scale)
        components = {"transformer": model}
        with family.capture(components, spec) as cap:
            captured = common.count_flops(lambda: cap.run(latents, noise, text))
        with torch.inference_mode():
            plain = common.count_flops(lambda: family.forward(components, latents, noise, text))
        rows.append(dict(model=name, image_size=image_size, token_length=token_length, tensors=spec.names,
                         bytes_per_sample=spec.bytes_per_sample(), gflops_capture=captured / 1e9,
                         gflops_full_forward=plain / 1e9, params=n_params(model)))
    return rows


if __name__ == "__main__":
    main()
