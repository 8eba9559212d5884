"""The tiny zoo: small random versions of every pretrained part, saved like the real weights.

Each part goes to ``out_dir/<part>`` in its library's native format (``save_pretrained``; SAM as
config.json + safetensors), so the loaders in :mod:`storygpt.models.loading` read the tiny and
the real weights the same way. Shapes follow the real models (SD-1.5, CLIP ViT-L/14, OPT,
Llama-2, SAM, LDM 4x super-resolution) with the sizes of :class:`TinyZooConfig`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    LDMSuperResolutionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from storygpt.config import TinyZooConfig
from storygpt.models.sam import SamArchitecture, build_sam, save_sam
from storygpt.models.tokenizers import (
    CLIP_LENGTH,
    train_clip_tokenizer,
    train_llama_tokenizer,
    train_opt_tokenizer,
)

# SD-1.5's noise schedule (its scheduler_config.json); training adds noise with DDPM.
SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


def build_tiny_zoo(
    zoo: TinyZooConfig, out_dir: str | Path, stories: list[list[str]], seed: int = 0
) -> dict[str, Path]:
    """Build every part into ``out_dir/<part>``; returns {part: directory}.

    Tokenizers are trained on the captions of ``stories``, so character names become single
    tokens; the language models are pretrained on the stories themselves (next-token, a few
    hundred steps), as a real frozen LLM has read its language before stage 2. Deterministic for a given (zoo, corpus, seed). Each part is written to a temporary
    directory and renamed into place, so an interrupted build never leaves a half-written part.
    """
    corpus = [caption for story in stories for caption in story]
    builders: dict[str, Callable[[Path], None]] = {
        "clip_text": lambda d: _clip_text(zoo, corpus, d),
        "clip_vision": lambda d: _clip_vision(zoo, d),
        "vae": lambda d: _vae(zoo, d),
        "unet": lambda d: _unet(zoo, d),
        "scheduler": lambda d: DDPMScheduler(**SD15_SCHEDULE).save_pretrained(d),
        "opt": lambda d: _opt(zoo, corpus, stories, seed, d),
        "llama": lambda d: _llama(zoo, corpus, stories, seed, d),
        "sam": lambda d: _sam(zoo, d),
        "super_resolution": lambda d: _super_resolution(zoo, d),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part, build in builders.items():
        torch.manual_seed(seed)  # per part, so one part's weights do not depend on the others
        staging = out_dir / f".{part}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        final = out_dir / part
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        parts[part] = final
    return parts


def _clip_text(zoo: TinyZooConfig, corpus: list[str], out: Path) -> None:
    tokenizer = train_clip_tokenizer(corpus, zoo.tokenizer_vocab_size)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=zoo.clip_hidden_size,
        intermediate_size=4 * zoo.clip_hidden_size,
        num_hidden_layers=zoo.clip_layers,
        num_attention_heads=zoo.clip_heads,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=zoo.clip_projection_dim,
        hidden_act="quick_gelu",
        # the real ids, so pooling finds the eos token (not the legacy argmax-id path)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _clip_vision(zoo: TinyZooConfig, out: Path) -> None:
    config = CLIPVisionConfig(
        hidden_size=zoo.clip_hidden_size,
        intermediate_size=4 * zoo.clip_hidden_size,
        num_hidden_layers=zoo.clip_layers,
        num_attention_heads=zoo.clip_heads,
        image_size=zoo.vision_image_size,
        patch_size=zoo.vision_patch_size,
        projection_dim=zoo.clip_projection_dim,
        hidden_act="quick_gelu",
    )
    CLIPVisionModelWithProjection(config).save_pretrained(out)
    size = zoo.vision_image_size  # otherwise OpenAI CLIP's: resize, centre crop, CLIP mean/std
    crop = {"height": size, "width": size}
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size=crop).save_pretrained(out)


def _vae(zoo: TinyZooConfig, out: Path) -> None:
    levels = len(zoo.vae_block_out_channels)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(zoo.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=zoo.vae_latent_channels,
        sample_size=zoo.unet_sample_size * 2 ** (levels - 1),
        scaling_factor=0.18215,
    ).save_pretrained(out)


def _unet(zoo: TinyZooConfig, out: Path) -> None:
    # SD-1.5's layout: cross-attention in every block but the lowest-resolution one.
    UNet2DConditionModel(
        sample_size=zoo.unet_sample_size,
        in_channels=zoo.vae_latent_channels,
        out_channels=zoo.vae_latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(zoo.unet_block_out_channels),
        layers_per_block=zoo.unet_layers_per_block,
        attention_head_dim=zoo.unet_attention_head_dim,
        cross_attention_dim=zoo.clip_hidden_size,
    ).save_pretrained(out)


def _opt(zoo: TinyZooConfig, corpus: list[str], stories: list[list[str]], seed: int, out: Path) -> None:
    tokenizer = train_opt_tokenizer(corpus, zoo.tokenizer_vocab_size, zoo.lm_max_positions)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=zoo.lm_hidden_size,
        word_embed_proj_dim=zoo.lm_hidden_size,
        num_hidden_layers=zoo.lm_layers,
        num_attention_heads=zoo.lm_heads,
        ffn_dim=zoo.lm_ffn_dim,
        max_position_embeddings=zoo.lm_max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = OPTForCausalLM(config)
    _pretrain(model, tokenizer, stories, zoo.lm_pretrain_steps, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _llama(zoo: TinyZooConfig, corpus: list[str], stories: list[list[str]], seed: int, out: Path) -> None:
    tokenizer = train_llama_tokenizer(corpus, zoo.tokenizer_vocab_size, zoo.lm_max_positions)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=zoo.lm_hidden_size,
        intermediate_size=zoo.lm_ffn_dim,
        num_hidden_layers=zoo.lm_layers,
        num_attention_heads=zoo.lm_heads,
        num_key_value_heads=zoo.lm_heads,
        max_position_embeddings=zoo.lm_max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, stories, zoo.lm_pretrain_steps, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


LM_PRETRAIN_LR, LM_PRETRAIN_BATCH = 2e-3, 16


def _pretrain(model, tokenizer, stories: list[list[str]], steps: int, seed: int) -> None:
    """Next-token training on whole stories (captions joined by spaces, after BOS): ~5 s on one
    CPU core for the tiny sizes; enough for the LM's states to carry who was named and how."""
    if steps == 0:
        return
    texts = [[tokenizer.bos_token_id] + tokenizer(" ".join(s), add_special_tokens=False).input_ids for s in stories]
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LM_PRETRAIN_LR)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and 10x faster on a busy machine
    try:
        _next_token_steps(model, tokenizer, texts, optimizer, steps, rng)
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _next_token_steps(model, tokenizer, texts: list[list[int]], optimizer, steps: int, rng: torch.Generator) -> None:
    for _ in range(steps):
        batch = [texts[i] for i in torch.randint(len(texts), (LM_PRETRAIN_BATCH,), generator=rng).tolist()]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.eos_token_id)
        labels = torch.full_like(ids, -100)  # padding is not predicted
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = labels[row, :len(seq)] = torch.tensor(seq)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _sam(zoo: TinyZooConfig, out: Path) -> None:
    arch = SamArchitecture(
        encoder_embed_dim=zoo.sam_embed_dim,
        encoder_depth=zoo.sam_depth,
        encoder_num_heads=zoo.sam_heads,
        encoder_global_attn_indexes=(zoo.sam_depth - 1,),  # windowed blocks, then one global
        image_size=zoo.sam_image_size,
        window_size=8,
        # the prompt encoder and mask decoder have no TinyZooConfig sizes: small fixed ones
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )
    save_sam(build_sam(arch), arch, out)


def _super_resolution(zoo: TinyZooConfig, out: Path) -> None:
    # CompVis/ldm-super-resolution-4x-openimages, small. The pipeline denoises in_channels // 2
    # latent channels at the low-res size with the RGB image concatenated: latents must be 3.
    latent = 3
    vq_levels = len(zoo.sr_vq_channels)  # each level after the first halves: x4 for three
    unet_levels = len(zoo.sr_block_out_channels)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vq_levels,
        up_block_types=("UpDecoderBlock2D",) * vq_levels,
        block_out_channels=tuple(zoo.sr_vq_channels),
        layers_per_block=1,
        latent_channels=latent,
        num_vq_embeddings=256,
        mid_block_add_attention=False,
        norm_num_groups=min(32, *zoo.sr_vq_channels),  # narrow widths need fewer norm groups
    )
    # No attention anywhere: the real model attends at its lowest resolutions, but the tiny one
    # is shallow, so its "lowest" resolutions are 64x64-128x128 tokens: ~10 s a frame on a CPU.
    unet = UNet2DModel(
        in_channels=2 * latent,
        out_channels=latent,
        down_block_types=("DownBlock2D",) * unet_levels,
        up_block_types=("UpBlock2D",) * unet_levels,
        add_attention=False,
        norm_num_groups=min(32, *zoo.sr_block_out_channels),
        block_out_channels=tuple(zoo.sr_block_out_channels),
        layers_per_block=1,
    )
    # the LDM bsr_sr schedule: "linear" in LDM's terms is diffusers' scaled_linear
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0155,
        beta_schedule="scaled_linear",
        clip_sample=False,
    )
    LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(out)
