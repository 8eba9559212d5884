"""Scoring frames: what the fine-tuned classifier sees (characters, setting), the captioner's
caption, the FID features, and in the story world what the exact detector finds. One call
scores ground-truth and generated frames alike, so the two sides of every metric match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from storygpt.config import StoryConfig

THRESHOLD = 0.5  # a character is present when its sigmoid is above this


class FrameScorer:
    """Build once per worker; call on a list of (H, W, 3) uint8 frames."""

    def __init__(self, cfg: StoryConfig, device: str = "cpu"):
        from storygpt.evaluation.captioner import Captioner
        from storygpt.evaluation.classifier import load_classifier

        cfg = cfg.resolved()
        self.classifier = load_classifier(cfg, device).eval()  # errors name the config key
        self.captioner = Captioner.from_config(cfg, device)
        self.fid = _fid_extractor(cfg.evaluate.fid_weights, device)
        self.world = cfg.data.dataset == "world"
        self.tolerance = cfg.evaluate.detector_tolerance

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], references: int = 0) -> list[dict]:
        """``references`` > 0 (ground-truth frames): each row also gets that many captions of the
        frame, best first, under ``reference_captions``: what a generated frame's caption is scored
        against. The first of them is the frame's own ``generated_caption`` either way."""
        char_probs, setting_probs, pooled = self.classifier.predict_with_features(images)
        features = pooled if self.fid is None else self.fid(images)  # one trunk pass either way
        beams = self.captioner.captions(images, max(references, 1))
        names = self.classifier.characters
        setting_sets = self.classifier.setting_sets(setting_probs) if setting_probs is not None else None
        rows = []
        for k, image in enumerate(images):
            row = {
                "pred_characters": [n for n, p in zip(names, char_probs[k]) if p > THRESHOLD],
                "pred_setting": setting_sets[k] if setting_sets is not None else None,
                "generated_caption": beams[k][0],
                "feature": np.asarray(features[k], dtype=np.float32),
                "detected_characters": None,
                "detected_setting": None,
            }
            if references:
                row["reference_captions"] = beams[k]
            if self.world:
                from storygpt.world.detector import detect

                found = detect(image, tolerance=self.tolerance)
                row["detected_characters"], row["detected_setting"] = found.characters, found.setting
            rows.append(row)
        return rows


def _fid_extractor(weights: str | None, device: str):
    """The standard FID Inception (torch-fidelity's weights, through torchmetrics) when given;
    None: the caller uses the classifier's pooled features."""
    if weights is None:
        return None
    if not Path(weights).is_file():
        from storygpt.config import ConfigError

        raise ConfigError(f"evaluate.fid_weights: expected the FID Inception weights file, got '{weights}'")
    import storygpt  # noqa: F401  (torchvision shim)
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=weights).to(device).eval()

    def features(images: list[np.ndarray]) -> np.ndarray:
        batch = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).to(device)  # uint8, resized inside
        return net(batch).double().cpu().numpy()

    return features
