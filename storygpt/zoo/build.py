"""The tiny zoo: small random versions of every pretrained part, saved like the real weights.

Each part goes to ``out_dir/<part>`` in its library's native format (``save_pretrained``; SAM as
config.json + safetensors), so the loaders in :mod:`storygpt.models.loading` read the tiny and
the real weights the same way. Shapes follow the real models (SD-1.5, CLIP ViT-L/14, OPT,
Llama-2, SAM, LDM 4x super-resolution) with the sizes of :class:`TinyZooConfig`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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

from storygpt.atomic import replace_dir
from storygpt.config import TinyZooConfig
from storygpt.zoo import build_cache
from storygpt.training import torch_threads
from storygpt.zoo.pretrain import latent_statistics, pretrain_lm, pretrain_vae
from storygpt.models.sam import SamArchitecture, build_sam, save_sam
from storygpt.zoo.tokenizers import (
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

    ``stories``: texts, each a list of sentences (:func:`storygpt.world.corpus.lm_corpus`).
    Tokenizers are trained on their sentences, so character names become single tokens; the
    language models are pretrained on the texts (next-token, ``zoo.lm_pretrain_steps``), as a
    real frozen LLM has read its language before stage 2, and the VAE is
    pretrained as an autoencoder on rendered world frames, as SD's VAE has seen images before the
    UNet learns its latents. Deterministic for a given (zoo, corpus, seed). Each part is written to a temporary
    directory and renamed into place, so an interrupted build never leaves a half-written part.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"zoo": zoo.model_dump(), "corpus": stories, "seed": seed, "versions": _library_versions()}
    digest = build_cache.build_digest(inputs, _BUILD_SOURCES)
    keys = {part: f"{part}-{digest}" for part in PARTS}
    if all(build_cache.has(key) for key in keys.values()):  # copies only: no processes to start
        return {part: _fetch_or_build_part(part, zoo, stories, seed, key, out_dir) for part, key in keys.items()}
    # Parts are independent: two processes build them side by side (each part pretrains on one
    # thread), the slowest first, which halves the uncached build on 2 cores.
    workers = max(1, min(2, os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {part: pool.submit(_fetch_or_build_part, part, zoo, stories, seed, key, out_dir)
                   for part, key in keys.items()}
        return {part: future.result() for part, future in futures.items()}


# Every part's builder: (zoo, corpus, stories, seed, out). Slowest first, so the two build
# processes start on the pretrained LMs.
Builder = Callable[[TinyZooConfig, list[str], list[list[str]], int, Path], None]
BUILDERS: dict[str, Builder] = {
    "opt": lambda zoo, corpus, stories, seed, d: _opt(zoo, corpus, stories, seed, d),
    "llama": lambda zoo, corpus, stories, seed, d: _llama(zoo, corpus, stories, seed, d),
    "vae": lambda zoo, corpus, stories, seed, d: _vae(zoo, seed, d),
    "clip_text": lambda zoo, corpus, stories, seed, d: _clip_text(zoo, corpus, d),
    "clip_vision": lambda zoo, corpus, stories, seed, d: _clip_vision(zoo, d),
    "unet": lambda zoo, corpus, stories, seed, d: _unet(zoo, d),
    "scheduler": lambda zoo, corpus, stories, seed, d: _scheduler(zoo, d),
    "sam": lambda zoo, corpus, stories, seed, d: _sam(zoo, d),
    "super_resolution": lambda zoo, corpus, stories, seed, d: _super_resolution(zoo, d),
}
PARTS = tuple(BUILDERS)


def _fetch_or_build_part(part: str, zoo: TinyZooConfig, stories: list[list[str]], seed: int, key: str,
                         out_dir: Path) -> Path:
    """One part into ``out_dir/<part>``: from the build cache, else built (and cached)."""
    corpus = [caption for story in stories for caption in story]

    def fetch_or_build(staging: Path) -> None:
        if not build_cache.fetch(key, staging):
            torch.manual_seed(seed)  # per part, so one part's weights do not depend on the others
            BUILDERS[part](zoo, corpus, stories, seed, staging)
            build_cache.store(key, staging)

    return replace_dir(out_dir / part, fetch_or_build)


# What a part's bytes depend on besides the inputs: the code that builds and pretrains it.
_BUILD_SOURCES = [Path(__file__), *(Path(__file__).with_name(f) for f in ("pretrain.py", "tokenizers.py")),
                  Path(__file__).parents[1] / "models" / "sam.py",
                  *(Path(__file__).parents[1] / "world" / f for f in ("cast.py", "render.py"))]
# (the corpus is an input of the digest itself, so the code that plans it need not be listed)


def _library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


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


def _scheduler(zoo: TinyZooConfig, out: Path) -> None:
    """SD-1.5's schedule. With ``scheduler_zero_terminal_snr`` rescaled so x_T is pure noise and
    sampled from t = T (``trailing``): under SD's own schedule x_999 still carries 7 % of the frame,
    enough of a 16² latent's flat background for the UNet to copy it instead of reading the
    caption, and sampling, which starts from pure noise, then takes the scene from the seed."""
    schedule = {**SD15_SCHEDULE, "prediction_type": zoo.scheduler_prediction_type}
    if zoo.scheduler_zero_terminal_snr:
        schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
    DDPMScheduler(**schedule).save_pretrained(out)


def _vae(zoo: TinyZooConfig, seed: int, out: Path) -> None:
    levels = len(zoo.vae_block_out_channels)
    resolution = zoo.unet_sample_size * 2 ** (levels - 1)  # the Char-LDM's training resolution
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(zoo.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=zoo.vae_latent_channels,
        sample_size=resolution,
        scaling_factor=0.18215,
        # Fully convolutional, so it trains on crops and runs at any size; mid-block attention
        # over every latent pixel (1024 tokens at 64 px) would double each step on a CPU.
        mid_block_add_attention=False,
        # One group: GroupNorm over 4-channel groups (SD's 128 / 32) removes each group's mean per
        # image, so a flat colour must be re-derived from its surroundings. In the step budget
        # such VAEs still merged hues (red and yellow to orange): 60-78% of frames' casts detected
        # right after decoding on 2 seeds, against 91-100% on 4 seeds with one group.
        norm_num_groups=1,
    )
    if zoo.vae_pretrain_steps:
        with torch_threads(1):
            pretrain_vae(vae, zoo.vae_pretrain_steps, resolution, seed)
            mean, std = latent_statistics(vae, resolution, seed)
        # standardised per channel (storygpt.char_ldm.latents): diffusers' latents_mean/std
        vae.register_to_config(scaling_factor=1.0, latents_mean=mean, latents_std=std)
    vae.save_pretrained(out)


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
    pretrain_lm(model, tokenizer, stories, zoo.lm_pretrain_steps, seed)
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
    pretrain_lm(model, tokenizer, stories, zoo.lm_pretrain_steps, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
