"""Stage-2 targets (paper §3.3): per frame, the fused embedding c_i and the CLIP frame feature.

c_i is the trained Char-LDM's conditioning of the frame's *original* caption S'_i (names, not
pronouns) with every named character fused with its masked crop from that frame: exactly what
stage 1 trains on in FUSED mode (:func:`~storygpt.char_ldm.data.collate` +
:func:`~storygpt.char_ldm.encoders.encode_prompts`). The aligner regresses onto it (L_align).
The frame feature is ``image_embeds`` of the *pretrained*, frozen ``models.clip_vision``: the
aligner's visual input, which at inference :func:`frame_features` computes on generated frames.

Only the conditioning parts load (text encoder, vision tower, fuser; no UNet, no VAE), so the
targets are computed once and stage 2 never touches the diffusion model. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from storygpt.char_ldm.data import collate, reference_character_inputs, tokenize
from storygpt.char_ldm.encoders import Conditioning, encode_prompts, train_last_vision_layers
from storygpt.char_ldm.fuser import CharacterFuser
from storygpt.char_ldm.export import check_index
from storygpt.char_ldm.model import CONFIG, _load_weights, _require
from storygpt.config import StoryConfig
from storygpt.data import parts
from storygpt.data.characters import CharacterTable
from storygpt.data.record_schema import RECORDS, decode_png
from storygpt.models.loading import frozen_dtype, load_clip_text, load_clip_vision

# the record fields stage 2 reads, as the record schema types them, + the two targets
TARGETS = pa.schema([
    *(RECORDS.field(name) for name in ("id", "story_id", "frame_index", "split", "caption",
                                       "referential_caption", "characters")),
    ("fused", pa.list_(pa.float32())),  # c_i, (L, d) flattened row-major
    ("frame_feature", pa.list_(pa.float32())),  # (d_clip,)
])
# what the targets need from a record (the rest of the record schema is not read)
RECORD_COLUMNS = ["id", "story_id", "frame_index", "split", "caption", "referential_caption", "characters",
                  "boxes", "token_spans", "masks", "image"]
PARTS = "targets"  # {output}/targets/part-*.parquet; {output}/done/part-*.json marks each finished part
INFO = "targets.json"  # beside the parts: the Char-LDM and settings they were made with, and (L, d, d_clip)


def crop_generator(record_id: str, seed: int) -> torch.Generator:
    """The generator that fills one record's crops outside their masks.

    Training fills them with fresh random noise every step; a target must instead be a function
    of the record alone: a retried or resumed task then rewrites identical values, the result
    does not depend on how Ray batched the rows, and anyone can recompute a row to check it. The
    fill stays noise (not a constant colour) so the vision tower sees crops like the ones it was
    trained on: a fixed draw, seeded by the record id and ``cfg.seed``.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def frame_features(
    vision: CLIPVisionModelWithProjection, image_processor: CLIPImageProcessor, images: list[np.ndarray]
) -> torch.Tensor:
    """(B, d_clip) ``image_embeds`` of whole (H, W, 3) uint8 frames: the aligner's visual input,
    the same call for dataset frames (targets) and generated ones (inference)."""
    pixels = image_processor(images=images, return_tensors="pt").pixel_values
    return vision(pixels.to(vision.device, vision.dtype)).image_embeds


class StageTwoTargets:
    """Record rows → target rows; build it once per worker, call it per batch."""

    def __init__(self, cfg: StoryConfig, char_ldm_dir: str | Path, device: str | torch.device = "cpu"):
        trained = Path(char_ldm_dir)
        self.cfg, self.seed, self.device = cfg.char_ldm, cfg.seed, torch.device(device)
        dtype = frozen_dtype(cfg)  # nothing trains here: the towers in the preset's frozen dtype
        self.tokenizer, self.text_encoder = load_clip_text(cfg.require_dir("models.clip_text"), dtype)
        self.image_processor, self.vision = load_clip_vision(cfg.require_dir("models.clip_vision"), dtype)
        check_index(trained, cfg, None, {"clip_text": self.text_encoder.config.to_dict(),
                                         "clip_vision": self.vision.config.to_dict()})
        train_last_vision_layers(self.vision, self.cfg.trainable_vision_layers)  # the layout save_trained wrote
        _load_weights(self.vision, trained / "vision", strict=False)
        self.fuser = CharacterFuser(**json.loads(_require(trained / "fuser", CONFIG).read_text()))
        _load_weights(self.fuser, trained / "fuser", strict=True)
        _, self.frame_vision = load_clip_vision(cfg.require_dir("models.clip_vision"), dtype)  # pretrained, frozen
        for module in (self.text_encoder, self.vision, self.fuser, self.frame_vision):
            module.requires_grad_(False).eval().to(self.device)
        self.empty_ids = tokenize(self.tokenizer, [""])[0].to(self.device)
        # the method's fused target, or the 'Emb text' ablation's plain caption states
        self.mode = Conditioning.FUSED if cfg.precompute.target == "fused" else Conditioning.TEXT

    @torch.no_grad()
    def encode(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, L, d) fused embeddings, (B, d_clip) frame features) of record rows."""
        # one collate per row: each row's crop noise comes from its own generator
        parts = [collate([row], self, self.cfg, crop_generator(row["id"], self.seed)) for row in rows]
        batch = {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}
        mode = torch.full((len(rows),), int(self.mode), device=self.device)
        fused = encode_prompts(self.text_encoder, self.vision, self.fuser, batch["input_ids"], self.empty_ids,
                               mode, batch["char_pixel_values"], batch["char_token_idx"], batch["char_valid"])
        frames = frame_features(self.frame_vision, self.image_processor, [decode_png(r["image"]) for r in rows])
        return fused, frames

    @torch.no_grad()
    def encode_named(self, captions: list[str], characters: list[list[str]], references: dict[str, np.ndarray],
                     table: CharacterTable) -> torch.Tensor:
        """(B, L, d) fused embeddings of any captions, each named character fused with its
        reference image (or plain, when the targets are): how the aligner's reference accuracy
        builds its candidate casts."""
        inputs = reference_character_inputs(self.tokenizer, self.image_processor, captions, characters, references,
                                            table, self.cfg.max_characters)
        ids = tokenize(self.tokenizer, captions).to(self.device)
        mode = torch.full((len(captions),), int(self.mode), device=self.device)
        return encode_prompts(self.text_encoder, self.vision, self.fuser, ids, self.empty_ids, mode,
                              *(t.to(self.device) for t in inputs))

    def __call__(self, rows: list[dict]) -> list[dict]:
        """One :data:`TARGETS` row per record row; ``fused`` and ``frame_feature`` as 1-D float32 arrays."""
        if not rows:
            return []
        fused, frames = self.encode(rows)
        fused = fused.float().flatten(1).cpu().numpy()
        frames = frames.float().cpu().numpy()
        keep = [name for name in TARGETS.names if name not in ("fused", "frame_feature")]
        return [{**{k: row[k] for k in keep}, "fused": f, "frame_feature": v}
                for row, f, v in zip(rows, fused, frames)]


def target_shape(cfg: StoryConfig, char_ldm_dir: str | Path) -> dict[str, int]:
    """{"tokens": L, "dim": d, "clip_dim": d_clip} without loading any weights."""
    from storygpt.models.loading import load_clip_tokenizer

    fuser = json.loads(_require(Path(char_ldm_dir) / "fuser", CONFIG).read_text())
    tokens = load_clip_tokenizer(cfg.require_dir("models.clip_text")).model_max_length
    # the frame encoder is the pretrained tower the fuser's vision side was trained from
    return {"tokens": int(tokens), "dim": int(fuser["text_dim"]), "clip_dim": int(fuser["vision_dim"])}


# ----------------------------------------------------------------------------- reading
def read_target_info(output_dir: str | Path) -> dict:
    """What ``storygpt precompute`` recorded about its output: the Char-LDM dir and settings it
    used, and the shape {"tokens", "dim", "clip_dim"}."""
    path = Path(output_dir) / INFO
    if not path.is_file():
        raise FileNotFoundError(f"'{output_dir}' holds no stage-2 targets (no {INFO}); run `storygpt precompute`")
    return json.loads(path.read_text())


def target_files(output_dir: str | Path) -> list[str]:
    """The part files of a *finished* precompute output, for ``ray.data.read_parquet``; raises
    if a part has no done marker (a run that did not finish) or there is none."""
    read_target_info(output_dir)
    files, unfinished = parts.finished_files(output_dir, PARTS), parts.unfinished_parts(output_dir, PARTS)
    if not files or unfinished:
        raise FileNotFoundError(f"'{output_dir}': precompute has not finished ({len(unfinished)} unfinished parts, "
                                f"{len(files)} done); run `storygpt precompute` again to complete it")
    return files


def read_targets(output_dir: str | Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The finished target parts of ``output_dir`` as one table (:func:`storygpt.data.parts.read`),
    optionally one split's rows only."""
    filters = [("split", "=", split)] if split is not None else None
    return parts.read(output_dir, PARTS, TARGETS, columns, filters)


def target_arrays(table: pa.Table, shape: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """((N, L, d) fused, (N, d_clip) frame features) as float32 arrays, in the table's row order;
    ``shape`` is :func:`read_target_info`'s ``["shape"]``."""
    n = table.num_rows
    fused = np.asarray(table["fused"].combine_chunks().flatten(), dtype=np.float32)
    frames = np.asarray(table["frame_feature"].combine_chunks().flatten(), dtype=np.float32)
    return fused.reshape(n, shape["tokens"], shape["dim"]), frames.reshape(n, shape["clip_dim"])
