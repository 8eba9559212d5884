"""Fine-tuning the frame classifier of :mod:`storygpt.evaluation.classifier`.

``train_classifier(cfg, records_dir)`` fine-tunes it on the records' train split (AdamW with a
cosine decay to 0 over ``max_steps``; BCE summed over characters + cross-entropy; random horizontal
flips, label-preserving: a mirrored character or setting is the same one), scores the val
split and saves it atomically to ``evaluate.classifier.output`` (``config.json`` +
``model.safetensors``). ``FrameClassifier.from_pretrained(dir)`` loads it back.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from storygpt.atomic import replace_dir
from storygpt.config import ConfigError, StoryConfig
from storygpt.evaluation.classifier import FrameClassifier, evaluate_frames
from storygpt.training import pick_device, warmup_lambda

TRAINING_NAME = "training.json"


def _read_frames(records_dir: Path, splits: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """PNG bytes, character lists and settings of the given splits, file by file (keeps memory to them)."""
    from storygpt.data import parts
    from storygpt.data.record_schema import RECORDS

    if not parts.finished_files(records_dir, "records"):
        raise ConfigError(f"no records in '{records_dir / 'records'}' (run `storygpt preprocess` first)")
    columns = ["id", "split", "characters", "setting", "image"]
    out = {s: {"id": [], "characters": [], "setting": [], "image": []} for s in splits}
    for table in parts.tables(records_dir, "records", RECORDS, columns, filters=[("split", "in", list(splits))]):
        for row in table.to_pylist():
            part = out[row["split"]]
            for key in part:
                part[key].append(row[key])
    return out


class _PNGFrames(torch.utils.data.Dataset):
    def __init__(self, images: list[bytes]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        from storygpt.data.record_schema import decode_png

        return i, torch.from_numpy(np.array(decode_png(self.images[i]), dtype=np.uint8, copy=True))


class _DecodedPNGs(Sequence):
    """PNG bytes seen as a sequence of decoded frames, decoded when read (a split never held decoded)."""

    def __init__(self, images: list[bytes]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from storygpt.data.record_schema import decode_png

        if isinstance(i, slice):
            return [decode_png(b) for b in self.images[i]]
        return decode_png(self.images[i])


def _labels(table, characters: list[list[str]]) -> torch.Tensor:
    return torch.tensor([table.to_multi_hot(c) for c in characters], dtype=torch.float32)


def train_classifier(cfg: StoryConfig, records_dir: str | Path, device: str | None = None,
                     threads: int | None = 1) -> dict:
    """Fine-tune the frame classifier on the records' train split; score val; save atomically.

    Returns the figures: steps, first / last loss (means of the first / last ``min(10, steps)``
    steps), val Char-Acc / Char-F1 / BG-Acc / BG-F1 (fractions; BG-F1 macro, see scores.py),
    frame counts, seconds and steps/s. ``threads``: torch CPU threads while training (restored after).
    """
    from storygpt.data.characters import get_table

    started = time.perf_counter()
    cc = cfg.evaluate.classifier
    records_dir = Path(records_dir)
    output = cfg.path(cc.output)
    if cc.weights and not cfg.path(cc.weights).is_file():  # before reading any data
        raise ConfigError(f"evaluate.classifier.weights: expected an existing Inception-v3 state dict file, "
                          f"got '{cfg.path(cc.weights)}'")
    device = torch.device(device or pick_device())
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        table = get_table(cfg.data.dataset)
        data = _read_frames(records_dir, ("train", "val"))
        train, val = data["train"], data["val"]
        if not train["image"]:
            raise ConfigError(f"no train-split records in '{records_dir / 'records'}'")
        settings = sorted({s for s in train["setting"] if s})
        setting_index = {s: i for i, s in enumerate(settings)}

        torch.manual_seed(cfg.seed)
        model = FrameClassifier(table.names, settings, cc.image_size, init_weights=not cc.weights)
        loaded = model.load_imagenet_weights(cfg.path(cc.weights)) if cc.weights else None
        model.to(device).train()

        char_targets = _labels(table, train["characters"])
        setting_targets = torch.zeros(len(train["setting"]), len(settings))  # one-hot; all zero: none known
        for k, s in enumerate(train["setting"]):
            if s in setting_index:
                setting_targets[k, setting_index[s]] = 1.0
        loader = _loader(train["image"], cc.batch_size, cfg.seed, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cc.learning_rate)
        cosine = warmup_lambda(0, cc.max_steps)
        flips = torch.Generator().manual_seed(cfg.seed + 1)
        losses: list[float] = []
        train_started, train_cpu = time.perf_counter(), time.process_time()
        for step, (index, frames) in zip(range(cc.max_steps), loader):
            x = model.preprocess(frames)
            flip = (torch.rand(len(x), generator=flips) < 0.5).to(device)
            # horizontal flips only: a mirrored character or setting is still the same one (the
            # world's shapes are even symmetric); a vertical flip would swap sky and ground
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            char_logits, setting_logits = model(x)
            # summed over characters (one binary task each), averaged over frames: the mean over
            # characters left the character head at the label prior while the setting head learned
            loss = F.binary_cross_entropy_with_logits(char_logits, char_targets[index].to(device),
                                                      reduction="sum") / len(index)
            if setting_logits is not None:  # one binary task per setting, summed like the characters'
                loss = loss + F.binary_cross_entropy_with_logits(
                    setting_logits, setting_targets[index].to(device), reduction="sum") / len(index)
            for group in optimizer.param_groups:  # cosine decay to 0 over max_steps
                group["lr"] = cc.learning_rate * cosine(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        train_seconds, train_cpu = time.perf_counter() - train_started, time.process_time() - train_cpu

        model.eval()
        figures_val = {"char_acc": None, "char_f1": None, "bg_acc": None, "bg_f1": None}
        unseen_val_settings = 0
        if val["image"]:
            figures_val = evaluate_frames(model, _DecodedPNGs(val["image"]), val["characters"], val["setting"],
                                          cc.batch_size)
            unseen_val_settings = sum(1 for s in val["setting"] if s and s not in setting_index)
        window = min(10, len(losses))
        figures = {
            "output": str(output),
            "device": str(device),
            "steps": len(losses),
            "first_loss": float(np.mean(losses[:window])),
            "last_loss": float(np.mean(losses[-window:])),
            "train_frames": len(train["image"]),
            "val_frames": len(val["image"]),
            "characters": len(table.names),
            "settings": len(settings),
            "unseen_val_settings": unseen_val_settings,
            **{f"val_{k}": v for k, v in figures_val.items()},
            "bg_scores": "sigmoid exact match + micro F1 (the reference script)",
            "imagenet_weights": None if loaded is None else str(cfg.path(cc.weights)),
            "train_seconds": round(train_seconds, 2),
            "train_cpu_seconds": round(train_cpu, 2),  # this process's CPU time: wall time on an idle core
            "steps_per_s": round(len(losses) / train_seconds, 3) if train_seconds > 0 else None,
        }
        figures["seconds"] = round(time.perf_counter() - started, 2)
        _save_atomically(model, output, figures)
        figures["seconds"] = round(time.perf_counter() - started, 2)
        return figures
    finally:
        torch.set_num_threads(previous_threads)


class _EndlessBatches(torch.utils.data.Sampler):
    """Full batches of indices (BatchNorm wants no stragglers), reshuffled every epoch, forever."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch = n, min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            order = torch.randperm(self.n, generator=self.generator).tolist()
            for i in range(0, self.n - self.batch + 1, self.batch):
                yield order[i:i + self.batch]


def _collate(items):
    return torch.tensor([i for i, _ in items]), torch.stack([f for _, f in items])


def _loader(images: list[bytes], batch_size: int, seed: int, device: torch.device):
    """Endless (indices, uint8 frames [B, H, W, 3]) batches; PNGs are decoded in worker processes
    on GPU machines, in-process on CPU."""
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    return torch.utils.data.DataLoader(
        _PNGFrames(images), batch_sampler=_EndlessBatches(len(images), batch_size, seed), num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )


def _save_atomically(model: FrameClassifier, output: Path, figures: dict) -> None:
    """The weights and the training figures, swapped in whole (:func:`replace_dir`)."""
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        (staging / TRAINING_NAME).write_text(json.dumps({k: v for k, v in figures.items() if k != "seconds"}, indent=1))

    replace_dir(output, write)
