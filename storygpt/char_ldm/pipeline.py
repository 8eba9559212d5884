"""Sampling from a Char-LDM: captions (+ reference images of the named characters), or a ready
(B, 77, d) conditioning such as the aligner's, → frames.

Classifier-free guidance against the empty caption, DDIM or PNDM built from the training noise
schedule; the same seed gives the same frames. With ``char_ldm.delayed_conditioning`` > 0 the
first share of the steps is conditioned on the plain caption (FastComposer's delayed subject
conditioning, as the official evaluation draws): the early steps lay out the frame and its
background, the fused or the LM's conditioning then draws who is in it. :meth:`CharLDMPipeline.attention_maps` shows where
each character's token attends (the paper's Fig. 5) for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, PNDMScheduler
from diffusers.utils.torch_utils import randn_tensor

from storygpt.char_ldm.attention import character_attention
from storygpt.char_ldm.data import reference_character_inputs, tokenize
from storygpt.char_ldm.encoders import Conditioning
from storygpt.char_ldm.latents import from_latent_space
from storygpt.char_ldm.model import CharLDM
from storygpt.config import StoryConfig
from storygpt.data.characters import CharacterTable, get_table
from storygpt.data.tokens import name_token_spans

SAMPLERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler}
HEAT_COLOUR = np.array([255, 0, 0], dtype=np.float32)


class CharLDMPipeline:
    def __init__(self, model: CharLDM, cfg: StoryConfig, table: CharacterTable | None = None):
        self.model = model
        self.cfg = cfg.char_ldm
        self.table = table or get_table(cfg.data.dataset)  # names → token spans in captions

    @classmethod
    def from_config(
        cls, cfg: StoryConfig, trained_dir: str | Path | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> CharLDMPipeline:
        """Every part but the fuser in ``dtype`` (None: ``models.frozen_dtype``): nothing trains here."""
        return cls(CharLDM.from_config(cfg, trained_dir, dtype, inference=True).to(device).eval(), cfg)

    @torch.no_grad()
    def encode(
        self,
        captions: list[str],
        characters: list[list[str]] | None = None,
        reference_images: dict[str, np.ndarray] | None = None,
        table: CharacterTable | None = None,
    ) -> torch.Tensor:
        """(B, 77, d): each caption's CLIP states, fused at the names that have a reference image
        (the fused embedding c of the paper; stage 2 regresses onto it)."""
        model, table = self.model, table or self.table
        ids = tokenize(model.tokenizer, captions).to(model.device)
        inputs = (t.to(model.device) for t in reference_character_inputs(
            model.tokenizer, model.image_processor, captions, characters or [[] for _ in captions],
            reference_images or {}, table, self.cfg.max_characters))
        mode = torch.full((len(captions),), int(Conditioning.FUSED), device=model.device)
        return model.encode_prompts(ids, mode, *inputs)

    @torch.no_grad()
    def encode_plain(self, captions: list[str]) -> torch.Tensor:
        """(B, 77, d): the captions' CLIP states without fusion (the text-only conditioning)."""
        ids = tokenize(self.model.tokenizer, captions).to(self.model.device)
        mode = torch.full((len(captions),), int(Conditioning.TEXT), device=self.model.device)
        return self.model.encode_prompts(ids, mode)

    def _early(self, plain_captions: list[str] | None) -> torch.Tensor | None:
        """The delayed-conditioning steps' conditioning, when the preset asks for them."""
        return self.encode_plain(plain_captions) if plain_captions and self.cfg.delayed_conditioning > 0 else None

    @torch.no_grad()
    def __call__(
        self,
        captions: list[str] | None = None,
        characters: list[list[str]] | None = None,
        reference_images: dict[str, np.ndarray] | None = None,
        conditioning: torch.Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        table: CharacterTable | None = None,
        plain_captions: list[str] | None = None,
    ) -> list[np.ndarray]:
        """One (R, R, 3) uint8 frame per caption (or per row of ``conditioning``). ``plain_captions``:
        the text of the delayed-conditioning steps (default: ``captions``)."""
        if conditioning is None:
            if captions is None:
                raise ValueError("give captions or a conditioning")
            conditioning = self.encode(captions, characters, reference_images, table)
        early = self._early(plain_captions or captions)
        return self._sample(conditioning, steps, guidance_scale, seed, early=early)

    @torch.no_grad()
    def sample(
        self,
        conditioning: torch.Tensor,
        seeds: list[int],
        steps: int | None = None,
        guidance_scales: list[float] | float | None = None,
        plain_captions: list[str] | None = None,
    ) -> list[np.ndarray]:
        """Frames for B independent requests in one UNet pass per step: row b of ``conditioning``
        (B, L, d) with its own seed and guidance scale. Row b's starting noise is exactly what
        ``self(conditioning=row_b, seed=seeds[b])`` draws, and every other step is per-row, so a
        batched frame equals its unbatched one up to float rounding (batched matmuls may sum in
        another order; tests allow ±2 grey levels). Rows needing different ``steps`` are separate calls."""
        if len(seeds) != len(conditioning):
            raise ValueError(f"{len(conditioning)} conditionings but {len(seeds)} seeds")
        if guidance_scales is None or isinstance(guidance_scales, (int, float)):
            guidance_scales = [self.cfg.guidance_scale if guidance_scales is None else float(guidance_scales)] * len(seeds)
        if len(guidance_scales) != len(seeds):
            raise ValueError(f"{len(seeds)} seeds but {len(guidance_scales)} guidance scales")
        return self._sample(conditioning, steps, list(guidance_scales), list(seeds), early=self._early(plain_captions))

    @torch.no_grad()
    def attention_maps(
        self,
        caption: str,
        characters: list[str],
        reference_images: dict[str, np.ndarray] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        table: CharacterTable | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(frame, {name: the frame with that name token's cross-attention as a red heat map}),
        averaged over the supervised layers and all steps; names absent from the caption are left out."""
        table = table or self.table
        spans = name_token_spans(self.model.tokenizer, caption, characters, table)
        named = [(name, span[1] - 1) for name, span in zip(characters, spans) if span is not None]
        size = self.cfg.resolution
        heat = torch.zeros(len(named), size, size, device=self.model.device)
        if named:
            token_idx = torch.tensor([[i for _, i in named]], device=self.model.device)

            def accumulate(maps: dict[str, torch.Tensor], unet_batch: int) -> None:
                for probs in maps.values():
                    attn = character_attention(probs, token_idx.expand(unet_batch, -1))
                    # the last sample is the conditional one ([unconditional, conditional] under guidance)
                    heat.add_(F.interpolate(attn[-1:].float(), size=(size, size), mode="bilinear")[0])

        conditioning = self.encode([caption], [characters], reference_images, table)
        frame = self._sample(conditioning, steps, guidance_scale, seed, accumulate if named else None)[0]
        out = {}
        for (name, _), h in zip(named, heat):
            alpha = (0.6 * h / h.max().clamp_min(1e-12)).cpu().numpy()[..., None]
            out[name] = (frame * (1 - alpha) + HEAT_COLOUR * alpha).round().astype(np.uint8)
        return frame, out

    # ------------------------------------------------------------------------- internals
    def _sample(
        self,
        conditioning: torch.Tensor,
        steps: int | None,
        guidance_scale: float | list[float] | None,
        seed: int | list[int],
        on_step: Callable[[dict[str, torch.Tensor], int], None] | None = None,
        early: torch.Tensor | None = None,
    ) -> list[np.ndarray]:
        """``seed``: one generator for the whole batch, or one seed per row (:meth:`sample`);
        ``guidance_scale``: one for all rows, or one per row (rows at <= 1 get no guidance);
        ``early``: the conditioning of the first ``delayed_conditioning`` share of the steps."""
        model, device = self.model, self.model.device
        steps = steps or self.cfg.sample_steps
        guidance = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        batch = len(conditioning)
        if isinstance(guidance, list):
            per_row = torch.tensor(guidance, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
            # a row at <= 1 samples unguided: uncond + 1 * (cond - uncond) = cond
            per_row = torch.where(per_row > 1, per_row, torch.ones_like(per_row))
            guidance = per_row if bool((per_row > 1).any()) else 1.0
        conditioning = conditioning.to(device, model.unet.dtype)
        early_steps = round(self.cfg.delayed_conditioning * steps) if early is not None else 0
        early = (early if early_steps else conditioning).to(device, model.unet.dtype)
        if isinstance(guidance, torch.Tensor) or guidance > 1:
            empty = model.empty_ids.expand(batch, -1)
            mode = torch.full((batch,), int(Conditioning.UNCONDITIONAL), device=device)
            unconditional = model.encode_prompts(empty, mode).to(conditioning.dtype)
            conditioning, early = torch.cat([unconditional, conditioning]), torch.cat([unconditional, early])
        sampler = SAMPLERS[self.cfg.sampler].from_config(model.noise_scheduler.config)
        sampler.set_timesteps(steps, device=device)
        latent_size = self.cfg.resolution // 2 ** (len(model.vae.config.block_out_channels) - 1)
        shape = (batch, model.unet.config.in_channels, latent_size, latent_size)
        # CPU generators: the same frames on any device; the sampler's state in fp32 whatever the
        # UNet's dtype (small steps add up over the loop)
        if isinstance(seed, list):  # one generator per row: row b's noise as if drawn alone
            latents = torch.cat([randn_tensor((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(s),
                                              device=device, dtype=torch.float32) for s in seed])
        else:
            generator = torch.Generator("cpu").manual_seed(seed)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * sampler.init_noise_sigma
        bf16 = self.cfg.mixed_precision == "bf16" and device.type == "cuda"
        guided = isinstance(guidance, torch.Tensor) or guidance > 1
        for i, t in enumerate(sampler.timesteps):
            x = torch.cat([latents] * 2) if guided else latents
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), \
                    model.attention.capturing(on_step is not None) as store:
                x = sampler.scale_model_input(x, t).to(conditioning.dtype)
                condition = early if i < early_steps else conditioning
                pred = model.unet(x, t, condition).sample.float()  # ε or v: the sampler knows which
                if on_step is not None:
                    on_step(store.maps, len(x))
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            latents = sampler.step(pred, t, latents).prev_sample
        images = model.vae.decode(from_latent_space(model.vae, latents.to(model.vae.dtype))).sample
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return list(images.permute(0, 2, 3, 1).cpu().numpy())
