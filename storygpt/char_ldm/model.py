"""Char-LDM (paper §3.2): SD-1.5 whose name tokens carry the characters' looks (the fuser) and
whose cross-attention is pulled onto the characters' masks (L_reg).

:meth:`CharLDM.forward` is one training step, so a DeepSpeed engine (or any wrapper) can hold
this module and call it. Trained parts: the UNet, the fuser and the vision tower's last layers;
the VAE and the text encoder stay frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionModelWithProjection, PreTrainedTokenizerBase

from storygpt.char_ldm.attention import install_attention_store
from storygpt.char_ldm.data import tokenize
from storygpt.char_ldm.encoders import (
    Conditioning,
    encode_prompts,
    keep_frozen_vision_layers_in,
    sample_conditioning,
    train_last_vision_layers,
)
from storygpt.char_ldm.export import check_index, write_index
from storygpt.char_ldm.fuser import CharacterFuser
from storygpt.char_ldm.latents import to_latent_space
from storygpt.char_ldm.losses import attention_in_mask_ratio, lreg_loss, mask_attention
from storygpt.char_ldm.training import diffusion_target, min_snr_weights, noise_loss
from storygpt.config import CharLDMConfig, ConfigError, StoryConfig
from storygpt.models.loading import frozen_dtype, load_clip_text, load_clip_vision, load_scheduler, load_unet, load_vae

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CharLDM(nn.Module):
    def __init__(
        self,
        config: CharLDMConfig,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: CLIPImageProcessor,
        vision: CLIPVisionModelWithProjection,
        fuser: CharacterFuser,
        noise_scheduler: DDPMScheduler,
    ):
        super().__init__()
        self.config = config
        self.vae, self.unet, self.text_encoder, self.vision, self.fuser = vae, unet, text_encoder, vision, fuser
        self.tokenizer, self.image_processor, self.noise_scheduler = tokenizer, image_processor, noise_scheduler
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        train_last_vision_layers(vision, config.trainable_vision_layers)
        self.attention = install_attention_store(unet, config.lreg_blocks)
        self.supervise_attention = config.lreg_weight > 0  # off: SDPA everywhere, no L_reg
        self.register_buffer("empty_ids", tokenize(tokenizer, [""])[0], persistent=False)

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_config(
        cls, cfg: StoryConfig, trained_dir: str | Path | None = None, dtype: torch.dtype | None = None,
        inference: bool = False,
    ) -> CharLDM:
        """The parts from ``cfg.models``; with ``trained_dir`` (what :meth:`save_trained` wrote),
        its UNet, fuser and vision layers replace the pretrained ones. The frozen parts (VAE, text
        encoder, the vision tower's frozen layers) are kept in ``dtype`` (None:
        ``models.frozen_dtype``), the trained ones (UNet, vision layers) in fp32 for the optimiser;
        with ``inference`` nothing trains, so those are kept in ``dtype`` too. The fuser, a few
        small layers, stays fp32."""
        dtype = frozen_dtype(cfg) if dtype is None else dtype
        trained_dtype = dtype if inference else torch.float32
        # the schedule first: a config that disagrees with it fails before the big parts load
        scheduler = load_scheduler(cfg.require_dir("models.scheduler"))
        if scheduler.config.prediction_type != cfg.char_ldm.prediction_type:
            raise ConfigError(f"char_ldm.prediction_type: expected {scheduler.config.prediction_type!r}, the "
                              f"prediction_type of models.scheduler ('{cfg.models.scheduler}'), got "
                              f"{cfg.char_ldm.prediction_type!r}")
        if scheduler.config.get("rescale_betas_zero_snr") and cfg.char_ldm.sampler != "ddim":
            raise ConfigError(f"char_ldm.sampler: expected 'ddim' for the zero-terminal-SNR schedule at models.scheduler "
                              f"(PNDM has none), got {cfg.char_ldm.sampler!r}")
        tokenizer, text_encoder = load_clip_text(cfg.require_dir("models.clip_text"), dtype)
        image_processor, vision = load_clip_vision(cfg.require_dir("models.clip_vision"), trained_dtype)
        vae = load_vae(cfg.require_dir("models.vae"), dtype)
        trained = Path(trained_dir) if trained_dir is not None else None
        if trained:  # the preset must be the one the export was trained under (before the UNet loads)
            check_index(trained, cfg, dict(scheduler.config), {
                "vae": dict(vae.config), "clip_text": text_encoder.config.to_dict(), "clip_vision": vision.config.to_dict()})
        unet = load_unet(trained / "unet" if trained else cfg.require_dir("models.unet"), trained_dtype)
        if trained:
            fuser = CharacterFuser(**json.loads(_require(trained / "fuser", CONFIG).read_text()))
            _load_weights(fuser, trained / "fuser", strict=True)
            _load_weights(vision, trained / "vision", strict=False)
        else:
            fuser = CharacterFuser(text_encoder.config.hidden_size, vision.config.projection_dim)
        model = cls(cfg.char_ldm, vae, unet, text_encoder, tokenizer, image_processor, vision, fuser, scheduler)
        keep_frozen_vision_layers_in(vision, cfg.char_ldm.trainable_vision_layers, dtype)
        return model

    def save_trained(self, out_dir: str | Path) -> None:
        """``unet/`` (diffusers), ``fuser/`` and ``vision/`` (its trained tensors only), each
        safetensors + config.json, and the index that says what they were trained with
        (:mod:`storygpt.char_ldm.export`); :meth:`from_config` with ``trained_dir`` reads them back."""
        out = Path(out_dir)
        self.unet.save_pretrained(out / "unet")
        write_index(self, out)
        _save_weights(self.fuser.state_dict(), out / "fuser",
                      {"text_dim": self.fuser.text_dim, "vision_dim": self.fuser.vision_dim})
        trained_vision = {n: p for n, p in self.vision.named_parameters() if p.requires_grad}
        _save_weights(trained_vision, out / "vision",
                      {"trainable_vision_layers": self.config.trainable_vision_layers})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> CharLDM:
        super().train(mode)
        self.vae.eval()  # frozen parts stay in inference mode
        self.text_encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # ------------------------------------------------------------------------- conditioning
    def encode_prompts(
        self,
        input_ids: torch.Tensor,
        mode: torch.Tensor,
        char_pixel_values: torch.Tensor | None = None,
        char_token_idx: torch.Tensor | None = None,
        char_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 77, d) conditioning, per sample unconditional / text-only / fused (``mode``)."""
        return encode_prompts(self.text_encoder, self.vision, self.fuser, input_ids, self.empty_ids, mode,
                              char_pixel_values, char_token_idx, char_valid)

    # ------------------------------------------------------------------------- training step
    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """One training step's losses for a :func:`~storygpt.char_ldm.data.collate` batch:
        {"loss", "noise_loss", "lreg", "attn_in_mask_ratio"} (NaN ratio: nothing supervised)."""
        cfg, device = self.config, self.device
        batch = {k: v.to(device) for k, v in batch.items()}
        size = len(batch["pixel_values"])
        with torch.no_grad():
            latents = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist.sample(generator)
            latents = to_latent_space(self.vae, latents).float()  # the noise and the loss in fp32
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        gen_device = generator.device if generator is not None else None
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (size,), generator=generator, device=gen_device).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        mode = sample_conditioning(size, cfg.p_unconditional, cfg.p_text_only, generator).to(device)
        # L_reg supervises the fused character tokens, as the official code: unconditional samples
        # have no name, text-only samples no fused token (their segments are empty there too)
        supervised = batch["char_valid"] & batch["has_mask"] & (mode == Conditioning.FUSED)[:, None]
        capture = self.supervise_attention and bool(supervised.any())
        bf16 = cfg.mixed_precision == "bf16" and device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), \
                self.attention.capturing(capture) as store:
            conditioning = self.encode_prompts(batch["input_ids"], mode, batch["char_pixel_values"],
                                               batch["char_token_idx"], batch["char_valid"])
            pred = self.unet(noisy.to(self.unet.dtype), timesteps, conditioning.to(self.unet.dtype)).sample
            maps = store.maps
        weights = None if cfg.snr_gamma is None else min_snr_weights(self.noise_scheduler, timesteps, cfg.snr_gamma)
        denoise = noise_loss(pred, diffusion_target(self.noise_scheduler, latents, noise, timesteps), weights)
        if capture:
            inside, outside = mask_attention(maps, batch["char_token_idx"], batch["char_masks"])
            lreg = lreg_loss(inside, outside, supervised)
            ratio = attention_in_mask_ratio(inside, outside, supervised)
        else:
            lreg = torch.zeros((), device=device)
            ratio = torch.tensor(float("nan"), device=device)
        return {"loss": denoise + cfg.lreg_weight * lreg, "noise_loss": denoise.detach(),
                "lreg": lreg.detach(), "attn_in_mask_ratio": ratio}


def _save_weights(state: dict[str, torch.Tensor], directory: Path, config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _load_weights(module: nn.Module, directory: Path, strict: bool) -> None:
    """Load ``directory``'s tensors; every one must name a tensor of ``module`` (``strict``:
    and every tensor of the module must be there)."""
    result = module.load_state_dict(load_file(str(_require(directory, WEIGHTS))), strict=False)
    if result.unexpected_keys or (strict and result.missing_keys):
        raise ValueError(f"'{directory}' does not match the model: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {result.missing_keys[:5] if strict else []}")


def _require(directory: Path, name: str) -> Path:
    if not (directory / name).is_file():
        raise FileNotFoundError(f"trained Char-LDM: expected '{name}' in '{directory}'")
    return directory / name
