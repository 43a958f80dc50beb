"""Test helpers: write a diffusers backbone as an original (LDM / CompVis) single-file checkpoint.

The inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py), for SD 1.x's topology with
any channel widths and layers per block: the key layout a real `v1-5-pruned.safetensors` has.
"""

from __future__ import annotations

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _resnet(rest: str) -> str:
    for hf, ldm in _RESNET:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf):]
    return rest


def unet_key_to_ldm(key: str, config) -> str:
    lpb = config["layers_per_block"]
    p = key.split(".")
    for hf, ldm in _UNET_TOP.items():
        if key.startswith(hf + "."):
            return ldm + key[len(hf):]
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":  # down_blocks.b.downsamplers.0.conv.* -> input_blocks.N.0.op.*
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op." + ".".join(p[5:])
        n = 1 + b * (lpb + 1) + int(p[3])
        rest = ".".join(p[4:])
        return f"input_blocks.{n}.0.{_resnet(rest)}" if p[2] == "resnets" else f"input_blocks.{n}.1.{rest}"
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        return f"middle_block.{2 * int(p[2])}.{_resnet(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}"
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":  # after the block's last layer: slot 1 with no attention, else 2
            has_attn = "CrossAttn" in config["up_block_types"][b]
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}." + ".".join(p[4:])
        n = b * (lpb + 1) + int(p[3])
        rest = ".".join(p[4:])
        return f"output_blocks.{n}.0.{_resnet(rest)}" if p[2] == "resnets" else f"output_blocks.{n}.1.{rest}"
    raise KeyError(key)


def vae_key_to_ldm(key: str, config) -> str:
    n = len(config["block_out_channels"])
    for hf, ldm in (("conv_norm_out.", "norm_out."),):
        key = key.replace(hf, ldm)
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out", "norm_out"):
        return key
    coder = p[0]
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return f"{coder}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
        rest = ".".join(p[4:])
        for hf, ldm in _VAE_ATTN:
            rest = rest.replace(hf, ldm) if rest.startswith(hf) else rest
        return f"{coder}.mid.attn_1.{rest}"
    b = int(p[2])
    if coder == "decoder":
        b = n - 1 - b  # decoder up blocks are numbered in reverse in LDM
    level = "down" if coder == "encoder" else "up"
    if p[3] in ("downsamplers", "upsamplers"):
        return f"{coder}.{level}.{b}.{'downsample' if level == 'down' else 'upsample'}." + ".".join(p[5:])
    return f"{coder}.{level}.{b}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")


def to_ldm_state_dict(unet, vae, text_encoder) -> dict:
    """One state dict with LDM's prefixes: model.diffusion_model., first_stage_model., cond_stage_model."""
    out = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + unet_key_to_ldm(k, unet.config)] = v.clone().contiguous()
    for k, v in vae.state_dict().items():
        ldm = vae_key_to_ldm(k, vae.config)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out["first_stage_model." + ldm] = v.clone().contiguous()
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k  # transformers >= 5.6 flattened CLIPTextModel
        out["cond_stage_model.transformer." + k] = v.clone().contiguous()
    return out
