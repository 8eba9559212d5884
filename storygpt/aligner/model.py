"""The aligner (paper §3.3): a frozen LLM reads the interleaved story (eq. 5) and predicts R
[IMG] tokens (L_gen, eq. 4); the mapper turns their states into the Char-LDM's conditioning,
pulled onto the precomputed fused embedding of the non-referential caption (L_align, eq. 6).

New, trained parts (only these): ``visual`` = W_v2t (d_clip → m·e), ``img_embeddings`` = the R
[IMG] rows (R, e) and ``mapper``. The LM's vocabulary is left alone: [IMG_r] is embedded from
its own row, and predicted by logits ``h · img_embeddingsᵀ`` appended to the vocabulary's
(tied new output rows), so nothing of the frozen table is resized, trained or decayed.

The frozen LM and vision tower are kept in ``models.frozen_dtype``; the new parts always in
fp32 (the optimiser's masters). Values are cast where they cross: into the LM's dtype at its
input, back to fp32 where the new parts read the LM's states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, PreTrainedModel, PreTrainedTokenizerBase

from storygpt.aligner.losses import alignment_loss, generation_loss
from storygpt.aligner.mapper import Mapper
from storygpt.aligner.sequence import IMAGE, IMG
from storygpt.config import AlignerConfig, StoryConfig
from storygpt.models.loading import frozen_dtype, load_clip_vision, load_lm

WEIGHTS, CONFIG = "model.safetensors", "config.json"
NEW_PARTS = ("visual.", "img_embeddings", "mapper.")


class StoryAligner(nn.Module):
    def __init__(
        self,
        config: AlignerConfig,
        tokenizer: PreTrainedTokenizerBase,
        lm: PreTrainedModel,
        image_processor: CLIPImageProcessor,
        vision: CLIPVisionModelWithProjection,
        out_dim: int,
    ):
        super().__init__()
        if lm.config.model_type != config.lm_family:
            raise ValueError(f"aligner.lm_family is '{config.lm_family}' but the LM is '{lm.config.model_type}'")
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        self.lm, self.vision = lm.eval().requires_grad_(False), vision.eval().requires_grad_(False)
        embed = lm.get_input_embeddings()
        self.embed_dim, self.clip_dim, self.out_dim = embed.embedding_dim, vision.config.projection_dim, out_dim
        self.visual = nn.Linear(self.clip_dim, config.visual_tokens * self.embed_dim)  # W_v2t
        # [IMG] rows start at the scale of the LM's own embeddings
        self.img_embeddings = nn.Parameter(torch.randn(config.img_tokens, self.embed_dim)
                                           * embed.weight.float().std().item())
        self.mapper = Mapper(self.embed_dim, out_dim, config)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_config(
        cls, cfg: StoryConfig, trained_dir: str | Path | None = None, dtype: torch.dtype | None = None
    ) -> StoryAligner:
        """Frozen LM (``models.lm``) and CLIP vision (``models.clip_vision``) in ``dtype`` (None:
        ``models.frozen_dtype``), the new parts in fp32; the output width is the CLIP text
        encoder's (``models.clip_text``: the Char-LDM's conditioning width). With ``trained_dir``
        (what :meth:`save_trained` wrote) the new parts are read back."""
        dtype = frozen_dtype(cfg) if dtype is None else dtype
        tokenizer, lm = load_lm(cfg.require_dir("models.lm"), dtype)
        image_processor, vision = load_clip_vision(cfg.require_dir("models.clip_vision"), dtype)
        text_config = _require(cfg.require_dir("models.clip_text"), CONFIG, "CLIP text encoder")
        out_dim = json.loads(text_config.read_text())["hidden_size"]
        model = cls(cfg.aligner, tokenizer, lm, image_processor, vision, out_dim)
        if trained_dir is not None:
            model._load_trained(Path(trained_dir))
        return model

    def save_trained(self, out_dir: str | Path) -> None:
        """The new parameters as safetensors + the shapes they were built with, as config.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self._new_state().items()}, str(out / WEIGHTS))
        (out / CONFIG).write_text(json.dumps(self._shapes(), indent=2) + "\n")

    def _load_trained(self, directory: Path) -> None:
        saved = json.loads(_require(directory, CONFIG).read_text())
        if saved != self._shapes():
            shapes = self._shapes()
            wrong = {k: (saved.get(k), shapes.get(k)) for k in {**saved, **shapes} if saved.get(k) != shapes.get(k)}
            raise ValueError(f"trained aligner '{directory}' was built differently (saved, configured): {wrong}")
        state = load_file(str(_require(directory, WEIGHTS)))
        if state.keys() != self._new_state().keys():
            raise ValueError(f"trained aligner '{directory}': expected tensors {sorted(self._new_state())}")
        self.load_state_dict(state, strict=False)

    def _new_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(NEW_PARTS)}

    def _shapes(self) -> dict:
        c = self.config
        return {"lm_family": c.lm_family, "embed_dim": self.embed_dim, "clip_dim": self.clip_dim,
                "out_dim": self.out_dim, "visual_tokens": c.visual_tokens, "img_tokens": c.img_tokens,
                "mapper_dim": c.mapper_dim, "mapper_encoder_layers": c.mapper_encoder_layers,
                "mapper_decoder_layers": c.mapper_decoder_layers, "mapper_heads": c.mapper_heads,
                "mapper_ffn_dim": c.mapper_ffn_dim, "mapper_queries": c.mapper_queries,
                **({} if c.interleave else {"interleave": False})}  # a captions-only aligner says so

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(NEW_PARTS)]

    def train(self, mode: bool = True) -> StoryAligner:
        super().train(mode)
        self.lm.eval()  # frozen parts stay in inference mode (OPT's dropout)
        self.vision.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.img_embeddings.device

    # ------------------------------------------------------------------------- building blocks
    def tokenize(self, captions: list[str]) -> list[list[int]]:
        """Each caption's LM token ids, no special tokens (training and inference alike)."""
        return self.tokenizer(captions, add_special_tokens=False).input_ids if captions else []

    @torch.no_grad()
    def frame_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """(N, d_clip) frozen CLIP image embeddings of (H, W, 3) uint8 frames, in fp32 (W_v2t's input)."""
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        return self.vision(pixel_values=pixels.to(self.device, self.vision.dtype)).image_embeds.float()

    def embed(self, codes: torch.Tensor, slot: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """(B, T) layout (:mod:`~storygpt.aligner.sequence`) + (F, d_clip) frame features →
        (B, T, e) LM input embeddings (the LM's dtype): token rows, W_v2t visual tokens, [IMG] rows."""
        embeds = self.lm.get_input_embeddings()(codes.clamp(min=0))
        is_image, is_img = (codes == IMAGE), (codes == IMG)
        # W_v2t runs even with no frame in the batch (first frames only): data-parallel ranks must
        # call the same modules (ZeRO-3 gathers weights per call) and reduce the same gradients
        if features is None:
            features = torch.zeros(0, self.clip_dim)
        visual = self.visual(features.to(self.device, self.visual.weight.dtype)).view(-1, self.embed_dim)
        if is_image.any():
            embeds = torch.where(is_image[..., None], visual[slot * is_image].to(embeds.dtype), embeds)
        else:
            embeds = embeds + 0.0 * visual.sum()
        return torch.where(is_img[..., None], self.img_embeddings[slot * is_img].to(embeds.dtype), embeds)

    def hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None):
        """The LM's last hidden states (B, T, e) and its KV cache (``cache``: extended in place;
        None: no cache is kept)."""
        out = self.lm.model(inputs_embeds=embeds.to(self.lm.dtype), attention_mask=attention_mask,
                            past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, V + R) in fp32: the vocabulary's logits, then [IMG_1..R]'s (tied to their input rows)."""
        hidden = hidden.to(self.lm.dtype)  # [IMG]'s logits at the precision of the vocabulary's
        return torch.cat([self.lm.lm_head(hidden), hidden @ self.img_embeddings.to(hidden.dtype).T], -1).float()

    def conditioning(self, img_hidden: torch.Tensor) -> torch.Tensor:
        """(B, R, e) [IMG] last hidden states → (B, L, d) Char-LDM conditioning (the mapper's dtype)."""
        return self.mapper(img_hidden.to(self.img_embeddings.dtype) + self.img_embeddings)

    # ------------------------------------------------------------------------- training step
    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        """Losses for a :func:`~storygpt.aligner.data.collate` batch: {"loss" = λ·L_gen + L_align,
        "gen_loss", "align_loss", "conditioning" (B, L, d), detached}."""
        device, r = self.device, self.config.img_tokens
        batch = {k: v.to(device) for k, v in batch.items()}
        codes = batch["codes"]
        bf16 = self.config.mixed_precision == "bf16" and device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            embeds = self.embed(codes, batch["slot"], batch["frame_features"])
            hidden = self.hidden(embeds, batch["attention_mask"])
            # every row holds exactly R [IMG] slots, in order: (B, R) positions
            positions = (codes == IMG).nonzero()[:, 1].view(len(codes), r)
            at = lambda p: hidden.gather(1, p[..., None].expand(-1, -1, hidden.shape[-1]))  # noqa: E731
            # eq. 4 over all R: [IMG_r] is predicted from the state just before it
            logits = self.logits(at(positions - 1))
            conditioning = self.conditioning(at(positions))
        gen = generation_loss(logits, logits.shape[-1] - r)
        align = alignment_loss(conditioning, batch["target"])
        return {"loss": self.config.gen_loss_weight * gen + align, "gen_loss": gen.detach(), "align_loss": align.detach(),
                "conditioning": conditioning.detach()}


def _require(directory: Path, name: str, what: str = "trained aligner") -> Path:
    if not (directory / name).is_file():
        raise FileNotFoundError(f"{what}: expected '{name}' in '{directory}'")
    return directory / name
