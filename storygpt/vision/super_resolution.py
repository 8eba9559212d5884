"""Upscale dataset frames to the training resolution: LDM 4x super-resolution, or Lanczos.

``ldm`` runs ``LDMSuperResolutionPipeline`` (CompVis/ldm-super-resolution-4x-openimages for the
real presets) and resizes its output to ``out_size`` if the two differ; ``resize`` is plain
Lanczos, for the tiny preset (the world's flat shapes gain nothing from a learned upscaler).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from storygpt.models.loading import load_super_resolution


def lanczos(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


class SuperResolver:
    def __init__(self, backend: str, out_size: int, model_dir: str | None = None, steps: int = 100,
                 device: str = "cpu", seed: int = 0):
        if backend not in ("ldm", "resize"):
            raise ValueError(f"super-resolution backend: expected 'ldm' or 'resize', got {backend!r}")
        self.backend, self.out_size, self.steps, self.device, self.seed = backend, out_size, steps, device, seed
        self.pipeline = None
        if backend == "ldm":
            self.pipeline = load_super_resolution(model_dir).to(device)
            self.pipeline.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Square uint8 (h, w, 3) frames -> (out_size, out_size, 3) uint8, in order."""
        if self.pipeline is None:
            return [lanczos(f, self.out_size) for f in frames]
        out: list[np.ndarray | None] = [None] * len(frames)
        by_size: dict[int, list[int]] = {}
        for i, f in enumerate(frames):
            by_size.setdefault(f.shape[0], []).append(i)
        for size, idx in by_size.items():  # one batched pipeline call per input size
            batch = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2).float()
            batch = batch / 127.5 - 1.0
            # eta=0 (deterministic DDIM); the pipeline does not pass `generator` to scheduler.step
            generator = torch.Generator(self.device).manual_seed(self.seed)
            images = self.pipeline(image=batch, num_inference_steps=self.steps, eta=0.0,
                                   generator=generator, output_type="np").images
            for i, img in zip(idx, images):
                out[i] = lanczos((np.clip(img, 0, 1) * 255).round().astype(np.uint8), self.out_size)
        return out  # type: ignore[return-value]
