"""The reference the capture tests compare with: a UNet run without capture, with ordinary hooks."""

from __future__ import annotations

import torch


def plain_unet_forward(unet, latents, t, text, modules=(), attn_modules=(), **unet_kwargs):
    """The UNet without capture, with ordinary hooks: (output, module outputs, attn2 inputs).

    `unet_kwargs`: passed on to the UNet (SDXL's `added_cond_kwargs`)."""
    outputs, attn_inputs, handles = {}, {}, []
    for name in modules:
        def keep(mod, args, out, name=name):
            outputs[name] = (out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out).clone()
        handles.append(unet.get_submodule(name).register_forward_hook(keep))
    for name in attn_modules:
        def keep_in(mod, args, kwargs, name=name):
            attn_inputs[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])
        handles.append(unet.get_submodule(name).register_forward_pre_hook(keep_in, with_kwargs=True))
    try:
        with torch.inference_mode():
            out = unet(latents, t, encoder_hidden_states=text, **unet_kwargs).sample
    finally:
        for h in handles:
            h.remove()
    return out, outputs, attn_inputs
