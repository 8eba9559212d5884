"""The frame classifier behind Char-Acc / Char-F1 and BG-Acc / BG-F1 (paper Table 1), and the
fallback FID features.

An Inception-v3 trunk (torchvision's, ``aux_logits=False``) with two heads on its 2048-d pooled
features: characters (multi-label, one sigmoid logit per character of the dataset's table, BCE)
and setting (one sigmoid logit per setting of the train split, BCE, as the reference script's
323-way head: a frame may be given no setting or several; absent for datasets without settings,
e.g. PororoSV). The paper's reference script trains one Inception-v3 per task; one shared trunk
is half the compute for the same figures. Classifiers saved with the earlier softmax setting
head (``"setting_head": "softmax"``, or no such key) load and predict their argmax.

Input: uint8 ``H x W x 3`` frames, resized (bilinear, antialiased) to ``image_size`` and
ImageNet-normalised; the trunk runs with ``transform_input=True``, torchvision's re-normalisation
to the [-1, 1] range the Google Inception-v3 weights were trained on, so ImageNet weights
(``evaluate.classifier.weights``) see what they expect.

:func:`storygpt.evaluation.classifier_training.train_classifier` fine-tunes it and saves it to
``evaluate.classifier.output`` (``config.json`` + ``model.safetensors``).
``FrameClassifier.from_pretrained(dir)`` (or :func:`load_classifier`) loads it back;
:func:`evaluate_frames` scores it against labelled frames.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from storygpt.config import ConfigError, StoryConfig
from storygpt.evaluation.scores import character_scores, predicted_setting_scores

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FEATURE_DIM = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's Inception-v3 keys that belong to heads we replace (not loaded from ImageNet weights)
_REPLACED_PREFIXES = ("fc.", "AuxLogits.")


def _inception_trunk(init_weights: bool = True) -> nn.Module:
    import storygpt  # noqa: F401  (the torchvision shim first)
    from torchvision.models import inception_v3

    trunk = inception_v3(weights=None, aux_logits=False, init_weights=init_weights, transform_input=True)
    trunk.fc = nn.Identity()  # forward() now ends at the pooled (dropout'd in training) 2048-d features
    return trunk


class FrameClassifier(nn.Module):
    """Inception-v3 trunk + character head (sigmoid) + setting head (sigmoid; optional)."""

    def __init__(self, characters: Sequence[str], settings: Sequence[str] = (), image_size: int = 299,
                 init_weights: bool = True, setting_head: str = "sigmoid"):
        """``init_weights=False`` skips Inception's truncated-normal init (seconds on CPU) when every
        trunk weight is about to be overwritten (from_pretrained, ImageNet weights)."""
        super().__init__()
        if not characters:
            raise ValueError("a frame classifier needs at least one character")
        if image_size < 75:
            raise ValueError(f"image_size: Inception-v3 needs >= 75, got {image_size}")
        self.characters = list(characters)
        self.settings = list(settings)
        self.image_size = int(image_size)
        if setting_head not in ("sigmoid", "softmax"):
            raise ValueError(f"setting_head: expected 'sigmoid' or 'softmax', got {setting_head!r}")
        self.setting_activation = setting_head
        self.trunk = _inception_trunk(init_weights)
        self.character_head = nn.Linear(FEATURE_DIM, len(self.characters))
        self.setting_head = nn.Linear(FEATURE_DIM, len(self.settings)) if self.settings else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.character_head.weight.device

    # ------------------------------------------------------------------ input
    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` (any device) -> normalised float ``[N, 3, S, S]`` on the model's device."""
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    def _batches(self, images, batch_size: int):
        """Yield uint8 ``[B, H, W, 3]`` tensors from a list / array of ``H x W x 3`` uint8 frames."""
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        elif not hasattr(images, "__getitem__"):  # a generator or other one-pass iterable
            images = list(images)
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise ValueError(f"expected a batch of frames [N, H, W, 3]; got shape {images.shape} "
                             "(wrap a single frame in a list)")
        for start in range(0, len(images), batch_size):
            chunk = [np.asarray(im) for im in images[start:start + batch_size]]  # lists, arrays, lazy sequences
            for k, im in enumerate(chunk):
                if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                    raise ValueError(f"frame {start + k}: expected uint8 H x W x 3, got {im.dtype} {im.shape}")
            if len({im.shape for im in chunk}) == 1:
                yield [torch.from_numpy(np.stack(chunk))]
            else:  # mixed sizes: resize one by one (same result, per frame)
                yield [torch.from_numpy(np.array(im, copy=True))[None] for im in chunk]

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[N, 3, S, S]`` -> pooled ``[N, 2048]`` (before the heads)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised ``[N, 3, S, S]`` -> (character logits ``[N, C]``, setting logits ``[N, S]`` or None)."""
        h = self.forward_features(x)
        return self.character_head(h), (self.setting_head(h) if self.setting_head is not None else None)

    def predict(self, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """(character probabilities ``[N, C]``, setting probabilities ``[N, S]`` or None), float32."""
        char_probs, setting_probs, _ = self.predict_with_features(images, batch_size)
        return char_probs, setting_probs

    @torch.inference_mode()
    def predict_with_features(self, images, batch_size: int = 64
                              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """:meth:`predict` and the pooled 2048-d features ``[N, 2048]`` from one trunk pass."""
        was_training = self.training
        self.eval()
        chars, sets, feats = [], [], []
        try:
            for parts in self._batches(images, batch_size):
                h = self.forward_features(torch.cat([self.preprocess(p) for p in parts]))
                feats.append(h.float().cpu())
                chars.append(torch.sigmoid(self.character_head(h)).float().cpu())
                if self.setting_head is not None:
                    logits = self.setting_head(h).float()
                    sets.append((torch.sigmoid(logits) if self.setting_activation == "sigmoid"
                                 else torch.softmax(logits, dim=-1)).cpu())
        finally:
            self.train(was_training)
        char_probs = torch.cat(chars).numpy() if chars else np.zeros((0, len(self.characters)), np.float32)
        features = torch.cat(feats).numpy() if feats else np.zeros((0, FEATURE_DIM), np.float32)
        if self.setting_head is None:
            return char_probs, None, features
        setting_probs = torch.cat(sets).numpy() if sets else np.zeros((0, len(self.settings)), np.float32)
        return char_probs, setting_probs, features

    def predict_labels(self, images, threshold: float = 0.5, batch_size: int = 64
                       ) -> tuple[list[list[str]], list[list[str]] | None]:
        """Per frame: the characters, and the settings, whose probability exceeds ``threshold``."""
        char_probs, setting_probs = self.predict(images, batch_size)
        chars = [[self.characters[j] for j in np.flatnonzero(row > threshold)] for row in char_probs]
        return chars, None if setting_probs is None else self.setting_sets(setting_probs, threshold)

    def setting_sets(self, setting_probs: np.ndarray, threshold: float = 0.5) -> list[list[str]]:
        """The predicted settings of each frame: those above ``threshold`` (a softmax head: its argmax)."""
        if self.setting_activation == "softmax":
            return [[self.settings[j]] for j in setting_probs.argmax(axis=1)]
        return [[self.settings[j] for j in np.flatnonzero(row > threshold)] for row in setting_probs]

    def features(self, images, batch_size: int = 64) -> np.ndarray:
        """Pooled 2048-d features ``[N, 2048]`` (float32): FID features when no FID Inception is given."""
        return self.predict_with_features(images, batch_size)[2]

    # ------------------------------------------------------------------ weights
    def load_imagenet_weights(self, path: str | Path, key: str = "evaluate.classifier.weights") -> dict:
        """Load a torchvision Inception-v3 state dict into the trunk (all but the fc / aux heads, strictly).

        ``.safetensors`` via safetensors; anything else with ``torch.load(..., weights_only=True)``.
        Returns what was skipped. A missing or mismatching file is a ConfigError naming ``key``.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{key}: expected an existing Inception-v3 state dict file, got '{path}'")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (unreadable, or a pickle with more than tensors in it)
            raise ConfigError(f"{key}: cannot read '{path}' as a state dict: {err}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"{key}: '{path}' is not a state dict of tensors")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        skipped = sorted(k for k in state if k.startswith(_REPLACED_PREFIXES))
        trunk_state = {k: v for k, v in state.items() if not k.startswith(_REPLACED_PREFIXES)}
        for k, v in self.trunk.state_dict().items():  # old checkpoints predate BatchNorm's step counter
            bn = k.removesuffix(".num_batches_tracked")
            if bn != k and k not in trunk_state and f"{bn}.running_mean" in trunk_state:
                trunk_state[k] = torch.zeros_like(v)
        try:
            self.trunk.load_state_dict(trunk_state, strict=True)
        except RuntimeError as err:
            raise ConfigError(f"{key}: '{path}' is not a torchvision Inception-v3 state dict: {err}") from None
        return {"loaded": len(trunk_state), "skipped": skipped}

    def config_dict(self) -> dict:
        return {"architecture": "inception_v3", "characters": self.characters, "settings": self.settings,
                "setting_head": self.setting_activation, "image_size": self.image_size, "transform_input": True,
                "feature_dim": FEATURE_DIM}

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=1))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> "FrameClassifier":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"'{directory}' is not a frame classifier dir "
                                    f"(expected {CONFIG_NAME} + {WEIGHTS_NAME}; `storygpt train-classifier` makes one)")
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.get("architecture") != "inception_v3":
            raise ValueError(f"{directory / CONFIG_NAME}: unknown architecture {config.get('architecture')!r}")
        model = cls(config["characters"], config.get("settings") or (), config["image_size"], init_weights=False,
                    setting_head=config.get("setting_head", "softmax"))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
        model.eval()
        return model.to(device) if device is not None else model


def load_classifier(cfg: StoryConfig, device: str | torch.device | None = None) -> FrameClassifier:
    """The fine-tuned classifier at ``evaluate.classifier.output``; a missing one names the key."""
    path = cfg.path(cfg.evaluate.classifier.output)
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"evaluate.classifier.output: expected a trained frame classifier in '{path}' "
                          "(run `storygpt train-classifier` first)")
    return FrameClassifier.from_pretrained(path, device)


def evaluate_frames(model: FrameClassifier, images: list, characters: list[list[str]], settings: list[str | None],
                    batch_size: int = 64) -> dict[str, float | None]:
    """Char-Acc / Char-F1 / BG-Acc / BG-F1 (fractions) of ``model`` on decoded frames and their labels."""
    pred_chars, pred_settings = model.predict_labels(images, batch_size=batch_size)
    known = set(model.characters)
    chars = character_scores(pred_chars, [[c for c in cs if c in known] for cs in characters])
    out = {"char_acc": chars["acc"], "char_f1": chars["f1"], "bg_acc": None, "bg_f1": None}
    if pred_settings is not None and any(s for s in settings):
        bg = predicted_setting_scores(pred_settings, [s or None for s in settings])
        out.update(bg_acc=bg["acc"], bg_f1=bg["f1"])
    return out
