"""`tiny-synth`: train the tiny Stable-Diffusion-topology backbone on the synthetic world.

Stage A trains the KL autoencoder (×8, 4 latent channels) to reconstruct synthetic scenes; stage B
trains the text-conditioned UNet (DDPM epsilon objective on the autoencoder's scaled latents) and
the CLIP text encoder together, on captions that name every object of a scene. Stage C (`ground`)
fine-tunes that UNet and text encoder with an added attention-localisation loss, so that each object
word's cross-attention map falls on its object. The result is an ordinary diffusers folder, shipped
as `backbones/assets/tiny-synth` (`--model tiny-synth`).

    python -m refseg.backbones.tiny_synth train --work DIR [--resume] [--out FOLDER]
    python -m refseg.backbones.tiny_synth ground --base FOLDER --work DIR_C [--resume] [--out FOLDER_C]
    python -m refseg.backbones.tiny_synth sample --model FOLDER --out grid.png

Imports diffusers and transformers: never imported from `refseg_core/__init__`.
"""
