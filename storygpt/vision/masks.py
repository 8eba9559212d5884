"""Character masks from boxes: SAM prompted with the boxes, or the boxes themselves.

SAM computes one image embedding per frame (``set_image``) and decodes all of the frame's
boxes against it in one batched prompt; ``encoder_runs`` counts image-encoder passes. A SAM mask
is clipped to its box: the box says where the character is, SAM says which of its pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from storygpt.data.records import Box
from storygpt.models.loading import load_sam


def box_masks(boxes: list[Box], height: int, width: int) -> np.ndarray:
    """A pixel belongs to a box when its centre does: pixels ceil(lo - 0.5) .. ceil(hi - 0.5) - 1."""
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        rows = slice(max(math.ceil(y0 - 0.5), 0), max(math.ceil(y1 - 0.5), 0))
        cols = slice(max(math.ceil(x0 - 0.5), 0), max(math.ceil(x1 - 0.5), 0))
        masks[k, rows, cols] = True
    return masks


class BoxMasker:
    def __init__(self, backend: str, sam_dir: str | None = None, device: str = "cpu"):
        if backend not in ("sam", "box"):
            raise ValueError(f"mask backend: expected 'sam' or 'box', got {backend!r}")
        self.backend, self.device, self.encoder_runs = backend, device, 0
        self.predictor = None
        if backend == "sam":
            from segment_anything import SamPredictor

            sam = load_sam(sam_dir).to(device).eval()
            sam.image_encoder.register_forward_hook(self._count_encoder_run)
            self.predictor = SamPredictor(sam)

    def _count_encoder_run(self, *_) -> None:
        self.encoder_runs += 1

    @torch.no_grad()
    def __call__(self, image: np.ndarray, boxes: list[Box]) -> np.ndarray:
        """(K, H, W) bool masks for ``boxes`` (x0, y0, x1, y1 in ``image`` pixels)."""
        h, w = image.shape[:2]
        if not boxes:
            return np.zeros((0, h, w), dtype=bool)
        if self.predictor is None:
            return box_masks(boxes, h, w)
        self.predictor.set_image(image)  # the one image-encoder pass for this frame
        prompts = self.predictor.transform.apply_boxes_torch(
            torch.tensor(boxes, dtype=torch.float32, device=self.device), (h, w))
        masks, _, _ = self.predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=prompts, multimask_output=False)
        return masks[:, 0].cpu().numpy() & box_masks(boxes, h, w)
