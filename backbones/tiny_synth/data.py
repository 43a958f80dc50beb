"""Training scenes for tiny-synth: images and captions from `refseg.core.synthetic`, by seed and index.

Scene i comes from `np.random.default_rng([seed, SCENE_STREAM, i])`, a stream distinct from the one
`synthetic.generate` uses (`[seed, i]`), so the pretraining scenes are the same world as the
referring dataset but never its images.
"""

from __future__ import annotations

import numpy as np
import torch

from refseg.core.synthetic import describe_scene
from refseg.core.synthetic_scenes import render_scene

SCENE_STREAM = 1
SAMPLE_STREAM = 2  # the generator grid's reference scenes: neither training nor referring-dataset images


def render_scenes(seed: int, count: int, image_size: int, stream: int = SCENE_STREAM) -> tuple[np.ndarray, list[str]]:
    """(count, size, size, 3) uint8 images and their captions (every object: size, colour, shape, position)."""
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    captions = []
    for i in range(count):
        scene = render_scene(np.random.default_rng([seed, stream, i]), image_size)
        images[i] = np.asarray(scene.image)
        captions.append(describe_scene(scene))
    return images, captions


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], as Stable Diffusion's VAE takes images."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The random numbers of one training step depend on (seed, stage, step) only, so a resumed
    run draws exactly what an uninterrupted one would."""
    entropy = np.random.SeedSequence([seed, stage, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(entropy))

