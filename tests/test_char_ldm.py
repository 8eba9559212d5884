"""Char-LDM (stage 1) library: fuser, attention capture, L_reg, batches, the training step,
save/load and the sampling pipeline, on the tiny zoo and a few story-world records. No Ray."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from storygpt.char_ldm.attention import CrossAttentionCapture, install_attention_store, remove_attention_store
from storygpt.char_ldm.data import character_image, collate, square_window
from storygpt.char_ldm.encoders import Conditioning
from storygpt.char_ldm.fuser import CharacterFuser
from storygpt.char_ldm.losses import attention_in_mask_ratio, lreg_loss, mask_attention
from storygpt.char_ldm.model import CharLDM
from storygpt.char_ldm.pipeline import CharLDMPipeline
from storygpt.char_ldm.training import min_snr_weights, noise_loss
from storygpt.training import stage_lr_lambda, warmup_lambda
from storygpt.config import load_config
from storygpt.data.record_schema import decode_png
from storygpt.models.loading import load_unet

torch.set_num_threads(2)

# latent 16x16 (32 px, VAE x2): SD-1.5 layout halves per down block, so the supervised blocks
# see 8x8, 4x4, 2x2 (mid), 4x4, 8x8; down_blocks.0 and up_blocks.3 (16x16) are not supervised
SUPERVISED_PIXELS = {"down_blocks.1": 64, "down_blocks.2": 16, "mid_block": 4, "up_blocks.1": 16,
                     "up_blocks.2": 64}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cfg(repo, tmp_path_factory):
    from storygpt.commands.zoo import build_zoo_quietly
    from storygpt.world.generate import generate_world

    work = tmp_path_factory.mktemp("char_ldm")
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={work}"])
    build_zoo_quietly(cfg, work / "zoo")
    generate_world(work / "world", stories=2, seed=0, val_fraction=0, test_fraction=0)
    return cfg


@pytest.fixture(scope="module")
def records(cfg) -> list[dict]:
    """The world's frames through the preprocessing steps, in a loop instead of Ray Data."""
    from storygpt.vision.prepare import records_in_process

    return records_in_process(cfg)


@pytest.fixture(scope="module")
def model(cfg) -> CharLDM:
    torch.manual_seed(0)
    return CharLDM.from_config(cfg)


@pytest.fixture(scope="module")
def batch(model, records, cfg):
    return collate(records[:2], model, cfg.char_ldm, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def references(cfg) -> dict[str, np.ndarray]:
    root = cfg.path(cfg.data.root) / "reference_images"
    return {p.stem: np.array(Image.open(p).convert("RGB")) for p in root.glob("*.png")}


def _conditioning_seen_by_unet(model, batch, seed=0) -> torch.Tensor:
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda _, args: seen.append(args[2].detach()))
    try:
        model(batch, torch.Generator().manual_seed(seed))
    finally:
        hook.remove()
    return seen[0]


# ----------------------------------------------------------------------------- fuser
def test_fuser_changes_only_the_character_tokens():
    torch.manual_seed(0)
    fuser = CharacterFuser(text_dim=16, vision_dim=8)
    text = torch.randn(2, 77, 16)
    idx = torch.tensor([[3, 5, 0], [7, 0, 0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = fuser(text, torch.randn(2, 3, 8), idx, valid)
    assert out.shape == (2, 77, 16)
    changed = (out != text).any(-1)
    expected = torch.zeros(2, 77, dtype=torch.bool)
    expected[0, [3, 5]] = expected[1, 7] = True
    assert torch.equal(changed, expected)
    assert torch.equal(fuser(text, torch.randn(2, 3, 8), idx, torch.zeros_like(valid)), text)


def test_a_character_listed_twice_is_fused_once():
    torch.manual_seed(0)
    fuser = CharacterFuser(text_dim=16, vision_dim=8)
    text, look = torch.randn(1, 77, 16), torch.randn(1, 1, 8)
    once = fuser(text, look, torch.tensor([[4]]), torch.tensor([[True]]))
    twice = fuser(text, look.expand(-1, 2, -1), torch.tensor([[4, 4]]), torch.tensor([[True, True]]))
    assert torch.allclose(twice, once, atol=1e-6)  # summing the two slots would double the token


# ----------------------------------------------------------------------------- attention capture
def test_only_the_supervised_cross_attention_layers_capture(model, batch, cfg):
    processors = model.unet.attn_processors
    capturing = {k for k, p in processors.items() if isinstance(p, CrossAttentionCapture)}
    assert capturing == {k for k in processors if ".attn2." in k
                         and any(k.startswith(b + ".") for b in cfg.char_ldm.lreg_blocks)}
    assert all(isinstance(p, AttnProcessor2_0) for k, p in processors.items() if k not in capturing)

    latents = torch.randn(2, 4, cfg.char_ldm.resolution // 2, cfg.char_ldm.resolution // 2)
    text = torch.randn(2, 77, 64)
    with torch.no_grad(), model.attention.capturing() as store:
        captured = model.unet(latents, 10, text).sample
        maps = dict(store.maps)
    with torch.no_grad():
        plain = model.unet(latents, 10, text).sample  # capture off: SDPA, the same maths
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)
    heads = 8
    assert {name: tuple(p.shape) for name, p in maps.items()} == {
        name: (2 * heads, SUPERVISED_PIXELS[name.split(".attentions")[0]], 77)
        for name in (k.removesuffix(".processor") for k in capturing)}
    assert not store.maps and not store.capture  # dropped and switched off on exit


def test_removing_the_store_leaves_sdpa_everywhere(cfg):
    unet = load_unet(cfg.path(cfg.models.unet))
    install_attention_store(unet, cfg.char_ldm.lreg_blocks)
    remove_attention_store(unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="down_blocks.3"):  # SD-1.5's lowest block has no attn2
        install_attention_store(unet, ["down_blocks.3"])


# ----------------------------------------------------------------------------- L_reg
def _maps(attention_on_token: torch.Tensor, heads: int = 2, token: int = 1) -> dict[str, torch.Tensor]:
    """(B, K=1, h, w) attention on ``token`` → captured (B·heads, h·w, 77) probabilities."""
    batch = attention_on_token.shape[0]
    probs = torch.zeros(batch, heads, attention_on_token[0, 0].numel(), 77)
    probs[..., token] = attention_on_token.flatten(1)[:, None, :]
    probs[..., 0] = 1 - probs[..., token]  # each pixel's attention sums to 1
    return {"layer": probs.flatten(0, 1)}


def test_lreg_is_lower_when_the_attention_is_inside_the_mask():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    idx = torch.tensor([[1]])
    supervised = torch.tensor([[True]])
    inside = lreg_loss(*mask_attention(_maps(mask), idx, mask), supervised)
    outside = lreg_loss(*mask_attention(_maps(1 - mask), idx, mask), supervised)
    assert inside.item() == pytest.approx(-1.0) and outside.item() == pytest.approx(1.0)


def test_lreg_exact_value_and_unsupervised_characters_are_skipped():
    # frame 0: a 2x2 map, character 0 masked on the top-left pixel with attention
    # [0.4, 0.2 | 0.2, 0.2] → A+ = 0.4, A- = 0.2, L = -0.2; character 1 has no mask: skipped.
    # frame 1 has nothing supervised: it does not dilute the mean.
    attn = torch.tensor([[0.4, 0.2], [0.2, 0.2]])
    probs = torch.zeros(2, 2, 4, 77)  # (B, heads, h·w, L)
    probs[0, :, :, 1] = attn.flatten()
    probs[0, :, :, 2] = 0.5  # character 1's token: would give a loss if it were counted
    probs[1, :, :, 1] = 0.9
    masks = torch.zeros(2, 2, 2, 2)
    masks[0, 0, 0, 0] = 1
    masks[1, 0] = 1
    idx = torch.tensor([[1, 2], [1, 2]])
    supervised = torch.tensor([[True, False], [False, False]])
    inside, outside = mask_attention({"layer": probs.flatten(0, 1)}, idx, masks)
    assert lreg_loss(inside, outside, supervised).item() == pytest.approx(-0.2)
    assert attention_in_mask_ratio(inside, outside, supervised).item() == pytest.approx(2.0)
    none = torch.zeros_like(supervised)
    assert lreg_loss(inside, outside, none).item() == 0.0
    assert attention_in_mask_ratio(inside, outside, none).isnan()


def test_lreg_gradient_reaches_the_supervised_cross_attention_only(model, batch):
    model.zero_grad(set_to_none=True)
    text = model.encode_prompts(batch["input_ids"], torch.full((2,), int(Conditioning.TEXT)))
    with model.attention.capturing() as store:
        model.unet(torch.randn(2, 4, 32, 32), 500, text)
        maps = store.maps
    supervised = batch["char_valid"] & batch["has_mask"]
    assert supervised.any()
    lreg_loss(*mask_attention(maps, batch["char_token_idx"], batch["char_masks"]), supervised).backward()
    attn2 = {n.removesuffix(".attn2"): m for n, m in model.unet.named_modules() if n.endswith(".attn2")}
    for name in ("down_blocks.1.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0"):
        assert attn2[name].to_q.weight.grad.abs().sum() > 0
        assert attn2[name].to_k.weight.grad.abs().sum() > 0
    # up_blocks.3 (32x32) runs after every supervised block: L_reg cannot reach it
    last = attn2["up_blocks.3.attentions.1.transformer_blocks.0"]
    assert last.to_q.weight.grad is None and last.to_k.weight.grad is None
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- data
def test_collate_shapes_masks_and_noised_character_crops(model, records, cfg):
    rows = [r for r in records if r["characters"]][:3]  # frames that show someone (the world has empty ones)
    out = collate(rows, model, cfg.char_ldm, torch.Generator().manual_seed(0))
    k, r = cfg.char_ldm.max_characters, cfg.char_ldm.resolution
    pixels = out["pixel_values"]
    assert pixels.shape == (3, 3, r, r) and -1 <= pixels.min() < pixels.max() <= 1
    assert out["input_ids"].shape == (3, 77)
    assert out["char_pixel_values"].shape == (3, k, 3, 64, 64) and out["char_masks"].shape == (3, k, r, r)
    for b, row in enumerate(rows):
        n = len(row["characters"])
        named_with_box = [s is not None and x is not None for s, x in zip(row["token_spans"], row["boxes"])]
        assert out["char_valid"][b].tolist() == named_with_box + [False] * (k - n)
        for i, span in enumerate(row["token_spans"]):
            if span is not None:
                assert out["char_token_idx"][b, i] == span[1] - 1
        assert out["has_mask"][b, :n].all() and not out["has_mask"][b, n:].any()
        assert (out["char_pixel_values"][b, n:] == 0).all()
        assert torch.equal(out["char_masks"][b, 0].bool(), torch.from_numpy(decode_png(row["masks"][0])))
    # the crop keeps the character's pixels and replaces the rest by noise
    image, box, mask = next((decode_png(r["image"]), box, decode_png(m)) for r in records
                            for box, m in zip(r["boxes"], r["masks"])
                            if not decode_png(m)[int(box[1]):int(box[3]), int(box[0]):int(box[2])].all())
    crop = character_image(image, box, mask, torch.Generator().manual_seed(1))
    top, left, side = square_window(box, image.shape[0])
    keep = mask[top:top + side, left:left + side]
    assert crop.shape == (side, side, 3) and keep.any() and not keep.all()
    assert (crop[keep] == image[top:top + side, left:left + side][keep]).all()
    assert (crop[~keep] != image[top:top + side, left:left + side][~keep]).any()
    fewer = collate(rows, model, cfg.char_ldm.model_copy(update={"max_characters": 1}))
    assert fewer["char_valid"].shape == (3, 1)


def test_square_window_stays_in_the_image():
    assert square_window([10, 20, 20, 40], 64) == (20, 5, 20)
    assert square_window([0, 0, 60, 8], 64) == (0, 0, 60)
    assert square_window([50, 50, 64, 64], 64) == (50, 50, 14)


# ----------------------------------------------------------------------------- training step
def test_conditioning_schedule(model, batch, cfg):
    ids = batch["input_ids"]
    with torch.no_grad():
        empty = model.text_encoder(model.empty_ids[None]).last_hidden_state
        plain = model.text_encoder(ids).last_hidden_state
    base = cfg.char_ldm
    try:
        model.config = base.model_copy(update={"p_unconditional": 1.0, "p_text_only": 0.0})
        torch.testing.assert_close(_conditioning_seen_by_unet(model, batch), empty.expand(2, -1, -1))
        model.config = base.model_copy(update={"p_unconditional": 0.0, "p_text_only": 1.0})
        torch.testing.assert_close(_conditioning_seen_by_unet(model, batch), plain)
        model.config = base.model_copy(update={"p_unconditional": 0.0, "p_text_only": 0.0})
        fused = _conditioning_seen_by_unet(model, batch)
    finally:
        model.config = base
    changed = (fused != plain).any(-1)
    expected = torch.zeros_like(changed)
    for b, k in batch["char_valid"].nonzero().tolist():
        expected[b, batch["char_token_idx"][b, k]] = True
    assert expected.any() and torch.equal(changed, expected)


def test_training_step_reports_its_losses(model, batch, cfg):
    out = model(batch, torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "noise_loss", "lreg", "attn_in_mask_ratio"}
    assert all(v.ndim == 0 for v in out.values())
    assert out["lreg"] != 0 and out["attn_in_mask_ratio"] > 0
    assert out["loss"].item() == pytest.approx(out["noise_loss"].item() + cfg.char_ldm.lreg_weight * out["lreg"].item(), rel=1e-6)
    base = cfg.char_ldm
    try:  # L_reg only on fused samples (the official code): text-only ones have no fused token to supervise
        model.config = base.model_copy(update={"p_unconditional": 0.0, "p_text_only": 1.0})
        text_only = model(batch, torch.Generator().manual_seed(0))
        assert text_only["lreg"] == 0 and math.isnan(text_only["attn_in_mask_ratio"])
    finally:
        model.config = base
    model.supervise_attention = False
    try:
        off = model(batch, torch.Generator().manual_seed(0))
    finally:
        model.supervise_attention = True
    assert off["lreg"] == 0 and off["attn_in_mask_ratio"].isnan()
    assert off["noise_loss"].item() == pytest.approx(out["noise_loss"].item(), rel=1e-4)


def test_min_snr_weights_follow_the_snr_and_weight_each_sample():
    from diffusers import DDPMScheduler

    from storygpt.zoo.build import SD15_SCHEDULE

    scheduler = DDPMScheduler(**SD15_SCHEDULE)  # ε-prediction, as the paper
    t = torch.tensor([0, 300, 999])
    weights = min_snr_weights(scheduler, t, 5.0)
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 0.01 and weights[2] == 1  # nearly clean: down-weighted; pure noise: as before
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.allclose(noise_loss(pred, target, torch.ones(3)), noise_loss(pred, target))
    assert torch.allclose(noise_loss(pred, target, weights), (((pred - target) ** 2).mean((1, 2, 3)) * weights).mean())



@pytest.mark.slow
def test_zero_terminal_snr_with_v_prediction(repo, cfg, records, tmp_path):
    """The tiny preset's scheduler (``zoo.scheduler_zero_terminal_snr`` + v-prediction): x_T holds
    nothing of the frame, DDIM starts there, the UNet learns v, Min-SNR keeps t = T at weight 1.
    SD's ε schedule (the zoo's default) still trains on ε; a config whose ``char_ldm.prediction_type``
    disagrees with the scheduler is refused by name."""
    from diffusers import DDIMScheduler

    from storygpt.char_ldm.training import diffusion_target
    from storygpt.config import ConfigError, TinyZooConfig
    from storygpt.models.loading import load_scheduler
    from storygpt.zoo.build import BUILDERS

    assert cfg.zoo.scheduler_zero_terminal_snr and cfg.char_ldm.prediction_type == "v_prediction"
    defaults = {k: f.default for k, f in TinyZooConfig.model_fields.items() if k.startswith("scheduler_")}
    BUILDERS["scheduler"](cfg.zoo.model_copy(update=defaults), [], [], 0, tmp_path / "sd")
    scheduler, sd = load_scheduler(cfg.path(cfg.models.scheduler)), load_scheduler(tmp_path / "sd")
    assert scheduler.alphas_cumprod[-1] < 1e-6 < 1e-3 < sd.alphas_cumprod[-1]
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(10)
    assert sampler.timesteps[0] == 999 and sampler.config.prediction_type == "v_prediction"
    t = torch.tensor([0, 999])
    assert min_snr_weights(scheduler, t, 5.0)[1] == 1 and min_snr_weights(scheduler, t, 5.0)[0] < 0.01
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(scheduler, x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    torch.testing.assert_close(diffusion_target(sd, x0, noise, t), noise)  # ε: the paper

    overrides = [f"work_dir={cfg.work_dir}", f"models.scheduler={tmp_path / 'sd'}"]
    with pytest.raises(ConfigError, match="char_ldm.prediction_type: expected 'epsilon'"):
        CharLDM.from_config(load_config(repo / "configs" / "tiny.yaml", overrides))
    pndm = [f"work_dir={cfg.work_dir}", "char_ldm.sampler=pndm"]
    with pytest.raises(ConfigError, match="char_ldm.sampler: expected 'ddim'"):
        CharLDM.from_config(load_config(repo / "configs" / "tiny.yaml", pndm))
    eps_cfg = load_config(repo / "configs" / "tiny.yaml", [*overrides, "char_ldm.prediction_type=epsilon"])
    torch.manual_seed(0)
    model = CharLDM.from_config(eps_cfg)
    out = model(collate(records[:2], model, eps_cfg.char_ldm, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["noise_loss"] > 0
    pipe = CharLDMPipeline(model.eval(), eps_cfg)
    frames = pipe.sample(pipe.encode(["Ada waves hello."], [["Ada"]]), [0], steps=2)
    assert frames[0].shape == (eps_cfg.char_ldm.resolution, eps_cfg.char_ldm.resolution, 3)


def test_snr_gamma_from_the_config_reweights_the_training_loss(model, batch, cfg):
    plain = model(batch, torch.Generator().manual_seed(0))["noise_loss"]
    # gamma below almost every step's SNR (SD-1.5's runs 0.005..580): nearly every weight < 1
    model.config = cfg.char_ldm.model_copy(update={"snr_gamma": 0.01})
    try:
        weighted = model(batch, torch.Generator().manual_seed(0))["noise_loss"]
    finally:
        model.config = cfg.char_ldm
    assert weighted < 0.9 * plain  # same draws, the same errors, weighted


def test_every_trainable_parameter_gets_a_gradient_even_with_nothing_to_fuse(model, batch):
    """Data-parallel ranks draw different conditionings; ZeRO reduces the same gradients on every
    rank, so a batch without a single fused character must still reach the fuser and vision layers."""
    nothing = {**batch, "char_valid": torch.zeros_like(batch["char_valid"])}
    model.zero_grad(set_to_none=True)
    model(nothing, torch.Generator().manual_seed(0))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    assert not missing, missing[:5]


def test_frozen_and_trainable_parts(model, cfg):
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not any(id(p) in trainable for p in [*model.vae.parameters(), *model.text_encoder.parameters()])
    assert all(id(p) in trainable for p in [*model.unet.parameters(), *model.fuser.parameters()])
    layers = model.vision.vision_model.encoder.layers
    n = cfg.char_ldm.trainable_vision_layers
    assert all(p.requires_grad for layer in layers[len(layers) - n:] for p in layer.parameters())
    assert not any(p.requires_grad for layer in layers[:len(layers) - n] for p in layer.parameters())
    assert model.vision.visual_projection.weight.requires_grad
    assert not model.vision.vision_model.embeddings.patch_embedding.weight.requires_grad


def test_no_trainable_vision_layers_freezes_the_whole_tower(cfg):
    from transformers import CLIPVisionModelWithProjection

    from storygpt.char_ldm.encoders import train_last_vision_layers

    vision = CLIPVisionModelWithProjection.from_pretrained(cfg.path(cfg.models.clip_vision))
    train_last_vision_layers(vision, 0)
    assert not any(p.requires_grad for p in vision.parameters())  # "freeze vis": projection too
    train_last_vision_layers(vision, 1)
    assert vision.visual_projection.weight.requires_grad


def test_a_small_character_keeps_its_mask_on_a_coarse_attention_map():
    # a 5 px character in a 64 px frame, between the 8x8 map's sampling points (27.5, 35.5):
    # plain bilinear resizing reads zeros and L_reg would push the token's attention down everywhere
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 29:34, 29:34] = 1
    idx, supervised = torch.tensor([[1]]), torch.tensor([[True]])
    attention = torch.zeros(1, 1, 8, 8)
    attention[..., 3, 3] = 1.0  # all of the token's attention on the character's cell
    inside, outside = mask_attention(_maps(attention), idx, mask)
    assert inside.item() > outside.item()
    assert lreg_loss(inside, outside, supervised).item() < 0


def test_warmup_is_linear_then_constant():
    factor = warmup_lambda(4)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0


def test_the_cosine_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    factor = warmup_lambda(2, decay_steps=10)
    assert [factor(s) for s in range(3)] == [0.5, 1.0, 1.0]
    values = [factor(s) for s in range(2, 11)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert factor(6) == pytest.approx(0.5)  # half way through the decay
    stage = SimpleNamespace(warmup_steps=2, max_steps=10, lr_schedule="constant")
    assert stage_lr_lambda(stage)(9) == 1.0
    assert stage_lr_lambda(SimpleNamespace(**{**vars(stage), "lr_schedule": "cosine"}))(9) < 0.05


@pytest.mark.slow
def test_a_few_adamw_steps_lower_the_loss(cfg, records):
    torch.manual_seed(0)
    model = CharLDM.from_config(cfg).train()
    batch = collate(records[:2], model, cfg.char_ldm, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(3))
    losses = []
    for _ in range(30):
        out = model(batch, torch.Generator().manual_seed(0))  # the same noise: a deterministic fit
        out["loss"].backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out["loss"].item())
    assert out["lreg"] != 0  # L_reg was part of every step
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.slow
def test_lreg_pulls_the_character_tokens_attention_into_the_masks(cfg, records):
    torch.manual_seed(0)
    model = CharLDM.from_config(cfg).train()
    model.config = cfg.char_ldm.model_copy(update={"lreg_weight": 1.0})  # let L_reg dominate
    shown = [r for r in records if r["characters"]][:2]  # frames that show someone
    batch = collate(shown, model, cfg.char_ldm, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    ratios = []
    for _ in range(16):
        out = model(batch, torch.Generator().manual_seed(0))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ratios.append(out["attn_in_mask_ratio"].item())
    assert ratios[0] < 1.1 and ratios[-1] > 1.5 * ratios[0]


# ----------------------------------------------------------------------------- save / load
@pytest.mark.slow
def test_saved_trained_parts_load_back_exactly(cfg, model, tmp_path):
    torch.manual_seed(1)
    with torch.no_grad():  # move every trained part away from its initial weights
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_trained(tmp_path / "trained")
    assert {p.name for p in (tmp_path / "trained").iterdir()} == {"unet", "fuser", "vision", "storygpt_index.json"}
    loaded = CharLDM.from_config(cfg, trained_dir=tmp_path / "trained")
    for part in ("unet", "fuser", "vision", "vae", "text_encoder"):
        mine, theirs = getattr(model, part).state_dict(), getattr(loaded, part).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CharLDM.from_config(cfg, trained_dir=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- pipeline
@pytest.mark.slow
def test_pipeline_is_seeded_and_takes_captions_or_a_conditioning(cfg, model, references):
    pipe = CharLDMPipeline(model.eval(), cfg)
    captions = ["Ada and Bruno are at the beach.", "Gus sits down."]
    names = [["Ada", "Bruno"], ["Gus"]]
    first = pipe(captions, names, references, steps=3, seed=1)
    again = pipe(captions, names, references, steps=3, seed=1)
    other = pipe(captions, names, references, steps=3, seed=2)
    r = cfg.char_ldm.resolution
    assert [f.shape for f in first] == [(r, r, 3)] * 2 and first[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])

    fused = pipe.encode(captions, names, references)
    assert fused.shape == (2, 77, 64)
    assert not torch.equal(fused, pipe.encode(captions))  # without references: text only
    from_conditioning = pipe(conditioning=fused, steps=3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, from_conditioning))

    frame, maps = pipe.attention_maps(captions[0], ["Ada", "Bruno", "Gus"], references, steps=2)
    assert frame.shape == (r, r, 3) and set(maps) == {"Ada", "Bruno"}  # Gus is not in the caption
    assert all(m.shape == (r, r, 3) and m.dtype == np.uint8 for m in maps.values())
    model.train()


@pytest.mark.slow
def test_logging_images(cfg, model, records):
    from storygpt.char_ldm.logging_images import attention_figure, sample_grid

    r = cfg.char_ldm.resolution
    model.train()
    grid = sample_grid(model, records[:3], cfg)
    figure = attention_figure(model, records[:3], cfg)
    assert grid.shape == (2 * r, 3 * r, 3) and grid.dtype == np.uint8
    assert figure.shape[0] == r and figure.shape[1] % r == 0 and figure.shape[1] > r
    assert model.training  # the training loop's mode comes back
