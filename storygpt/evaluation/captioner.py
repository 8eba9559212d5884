"""The BLIP-2 captioner behind BLEU4 / CIDEr (paper Table 1).

A generated frame is captioned by a BLIP-2 fine-tuned on the dataset's captions, and its caption
is scored against the ground-truth frame's. Real presets point ``evaluate.captioner.model`` at a
BLIP-2 the user supplies (``save_pretrained`` layout: ``Blip2ForConditionalGeneration`` + its
processor); the tiny preset builds a small random BLIP-2 (:func:`build_tiny_captioner`, the zoo's
OPT tokenizer and LM sizes) and :func:`storygpt.evaluation.captioner_training.train_captioner`
teaches it the story world. Both are read by the same :meth:`Captioner.from_pretrained`.

transformers 5 drops BLIP-2's legacy path: the prompt must hold ``num_query_tokens`` image
tokens (``config.image_token_index``) ahead of BOS, which the model replaces with the Q-Former's
outputs. Training sequences (:mod:`storygpt.evaluation.captioner_training`) are
``<image> x Q, BOS, caption, EOS``; generation starts from ``<image> x Q, BOS``
(:func:`prompt_ids`). A checkpoint saved before that change (no ``image_token_index`` in its
config, no ``num_query_tokens`` in its processor) is completed on load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from storygpt.atomic import replace_dir
from storygpt.config import ConfigError, StoryConfig

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# The tiny BLIP-2 (sizes not in TinyZooConfig). transformers initialises a BLIP-2 to be *loaded*,
# which leaves a random one blind: its ViT at std 1e-10 is zero, and zero query tokens through a
# Q-Former at std 0.02 carry ~1% of the image (the spread of the image features across frames).
# The captioner then learned the captions' language and ignored the frames: one caption for all,
# held-out character-name recall 0.2-0.4. Measured on the 60-story world (240 train frames, 60
# held out), batch 16, 300 steps, lr 1e-3, recall by Q-Former std: 0.02: 0.23, 0.125: 0.42,
# 0.25: 0.73, 0.5: 0.58; with the defaults below, batch 32, 300 steps, lr 2e-3: 0.90.
TINY_QUERY_TOKENS = 8  # BLIP-2 uses 32 queries for 257 ViT-g tokens; the tiny ViT has 65
TINY_QFORMER_LAYERS = 1  # 2 layers: no better at equal steps, 20% slower
TINY_VISION_INIT = 0.02  # std of the ViT's weights
TINY_QFORMER_INIT = 0.25  # std of the Q-Former's weights and of the query tokens
TINY_DROPOUT = 0.0  # Q-Former and OPT; transformers' 0.1: no better (recall 0.83 both), fits slower
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # transformers 5 / the hub's BLIP-2
_MISSING_HINT = "a BLIP-2 fine-tuned on the dataset's captions, in save_pretrained layout"


# ----------------------------------------------------------------------------- inference
class Captioner:
    """BLIP-2 captions for uint8 frames by beam search, batched and gradient-free. ``caption``: the
    best beam per frame (a generated frame's caption); ``captions``: the best ``n`` beams (a real
    frame's references). LAVIS's BLIP-2 ``generate``, which the official evaluation calls, searches
    5 beams and returns the top ``num_captions`` of them; ``num_beams=1`` is greedy decoding."""

    def __init__(self, model, processor, *, max_new_tokens: int = 40, batch_size: int = 16, num_beams: int = 5):
        if num_beams < 1:
            raise ValueError(f"captioner: num_beams must be >= 1, got {num_beams}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.num_beams = num_beams
        _complete_image_tokens(model, processor)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        *,
        max_new_tokens: int = 40,
        batch_size: int = 16,
        num_beams: int = 5,
        dtype: torch.dtype | None = None,
    ) -> "Captioner":
        """Read a BLIP-2 directory (the tiny one or a real one). ``dtype`` None: float32 on CPU,
        bfloat16 on CUDA (the Q-Former stays float32 either way, as transformers keeps it)."""
        model, processor = load_blip2(directory, device, dtype)
        return cls(model, processor, max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams)

    @classmethod
    def from_config(
        cls, cfg: StoryConfig, device: str | torch.device = "cpu", batch_size: int | None = None
    ) -> "Captioner":
        """``evaluate.captioner.model`` with its ``max_new_tokens`` and ``num_beams``; a missing dir
        names the key."""
        cap = cfg.evaluate.captioner
        directory = cfg.require_dir("evaluate.captioner.model", _MISSING_HINT)
        return cls.from_pretrained(directory, device, max_new_tokens=cap.max_new_tokens,
                                   batch_size=batch_size or cap.batch_size, num_beams=cap.num_beams)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """One caption per ``(H, W, 3)`` uint8 frame: its best beam, at most ``max_new_tokens`` tokens."""
        return [best for best, *_ in self.captions(images, 1)]

    @torch.inference_mode()
    def captions(self, images: Sequence[np.ndarray], n: int) -> list[list[str]]:
        """The ``n`` best beams per frame, best first (``n`` above ``num_beams`` widens the search
        to ``n`` beams: a beam search returns at most as many sequences as it keeps)."""
        if n < 1:
            raise ValueError(f"captioner: expected n >= 1 captions per frame, got {n}")
        beams = max(self.num_beams, n)
        out: list[list[str]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [_rgb(image) for image in images[start:start + self.batch_size]]
            pixels = _pixels(self.processor, chunk, self.device, self.model.dtype)
            prompt = prompt_ids(self.model, self.tokenizer, len(chunk)).to(self.device)
            ids = self.model.generate(
                pixel_values=pixels,
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=beams,
                num_return_sequences=n,
                **_generation_ids(self.model, self.tokenizer),
            )
            ids = ids[:, prompt.shape[1]:]  # decoder-only: the prompt comes back first
            texts = [t.strip().split("\n")[0].strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            out += [texts[k:k + n] for k in range(0, len(texts), n)]  # generate returns a frame's n together
        return out


def load_blip2(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(Blip2ForConditionalGeneration, processor) from a local directory, nothing fetched."""
    from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration

    from storygpt.models.loading import _checked

    path = _checked(directory, "BLIP-2 captioner", kinds={"blip-2"})
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        expected = " or ".join(PROCESSOR_FILES)
        raise FileNotFoundError(f"BLIP-2 captioner: expected its processor ({expected}) in '{path}'")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Blip2Config.from_pretrained(path, local_files_only=True)
    if not config.use_decoder_only_language_model:
        raise ValueError(f"BLIP-2 captioner: '{path}' has a {config.text_config.model_type} (encoder-decoder) "
                         "language model; only decoder-only BLIP-2 captioners (OPT) are supported")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    model.to(device)
    _complete_image_tokens(model, processor)
    return model, processor


def prompt_ids(model, tokenizer, batch: int) -> torch.Tensor:
    """``<image> x Q, BOS`` for ``batch`` frames: what generation continues and training starts with."""
    config = model.config
    ids = [config.image_token_index] * config.num_query_tokens + [_bos_id(model, tokenizer)]
    return torch.tensor([ids], dtype=torch.long).repeat(batch, 1)


def _complete_image_tokens(model, processor) -> None:
    """Checkpoints saved before the image-token expansion: give the processor its query count
    and the model its image token (added to the vocabulary if the tokenizer lacked it)."""
    config = model.config
    if getattr(processor, "num_query_tokens", None) is None:
        processor.num_query_tokens = config.num_query_tokens
    if config.image_token_index is None:
        token = getattr(processor, "image_token", IMAGE_TOKEN)
        token_id = processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token))
        if token_id >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(processor.tokenizer))
        config.image_token_index = token_id
        log.warning("BLIP-2 config had no image_token_index: using %d (%s)", token_id, token)


def _bos_id(model, tokenizer) -> int:
    bos = model.config.text_config.bos_token_id
    return tokenizer.bos_token_id if bos is None else bos


def _generation_ids(model, tokenizer) -> dict:
    """EOS/pad for generate: the model's generation config where it has them, else the tokenizer's."""
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    return {"eos_token_id": eos, "pad_token_id": pad}


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"captioner: expected (H, W, 3) uint8 frames, got {image.shape} {image.dtype}")
    return image if image.flags.writeable else image.copy()  # torch warns on read-only arrays (decoded PNGs)


def _pixels(processor, images: list[np.ndarray], device, dtype) -> torch.Tensor:
    pixels = processor.image_processor(images=images, return_tensors="pt").pixel_values
    return pixels.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- the tiny captioner
def build_tiny_captioner(cfg: StoryConfig, out_dir: str | Path) -> Path:
    """A small random BLIP-2 in ``out_dir`` (``save_pretrained``: config, safetensors, processor).

    Vision tower and Q-Former take the zoo's CLIP sizes (hidden, layers, heads, patch), at
    the records' resolution or the zoo's vision size, whichever is smaller; the language model is
    an OPT with the zoo LM's config and tokenizer (``models.lm``) plus the ``<image>`` token.
    Random init from ``cfg.seed``; written to a temp dir and renamed into place.
    """
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        GenerationConfig,
    )
    from transformers.tokenization_utils_base import AddedToken

    if cfg.zoo is None:
        raise ConfigError(f"zoo: preset '{cfg.preset}' has no tiny model sizes (only tiny presets build a captioner)")
    zoo = cfg.zoo
    lm_dir = cfg.require_dir("models.lm", "build the tiny zoo first: storygpt zoo")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    text = AutoConfig.from_pretrained(lm_dir, local_files_only=True)
    if text.model_type != "opt":
        raise ConfigError(f"models.lm: the tiny captioner needs the zoo's OPT, got model_type={text.model_type!r}")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text.vocab_size = len(tokenizer)
    text.dropout = TINY_DROPOUT
    text.attention_dropout = 0.0

    image_size = min(zoo.vision_image_size, cfg.char_ldm.resolution)
    hidden, heads = zoo.clip_hidden_size, zoo.clip_heads
    vision = Blip2VisionConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=zoo.clip_layers,
        num_attention_heads=heads, image_size=image_size, patch_size=zoo.vision_patch_size,
        initializer_range=TINY_VISION_INIT,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=TINY_QFORMER_LAYERS,
        num_attention_heads=heads,
        hidden_dropout_prob=TINY_DROPOUT, attention_probs_dropout_prob=TINY_DROPOUT,
        cross_attention_frequency=1, encoder_hidden_size=hidden, max_position_embeddings=64,
        initializer_range=TINY_QFORMER_INIT,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=TINY_QUERY_TOKENS, image_token_index=image_token,
    )
    torch.manual_seed(cfg.seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, TINY_QFORMER_INIT)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=cfg.evaluate.captioner.max_new_tokens,
    )
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})  # CLIP mean/std, bicubic
    processor = Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=TINY_QUERY_TOKENS)

    out_dir = Path(out_dir)
    _save_atomically(out_dir, model, processor)
    return out_dir


def _save_atomically(directory: Path, model, processor, files: dict[str, str] | None = None) -> None:
    """save_pretrained (+ ``files``: name -> text), swapped in whole (:func:`replace_dir`)."""
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name, text in (files or {}).items():
            (staging / name).write_text(text)

    replace_dir(directory, write)
