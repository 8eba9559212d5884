"""The tiny zoo builds every part, and the one loader per part reads it back and runs it."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storygpt.char_ldm.latents import from_latent_space, to_latent_space
from storygpt.config import load_config
from storygpt.data.characters import WORLD
from storygpt.models import loading
from storygpt.models.sam import SamArchitecture, build_sam
from storygpt.world.corpus import lm_corpus
from storygpt.world.detector import detect
from storygpt.zoo.build import SD15_SCHEDULE, build_tiny_zoo
from storygpt.zoo.pretrain import world_frame

PARTS = {"clip_text", "clip_vision", "vae", "unet", "scheduler", "opt", "llama", "sam",
         "super_resolution"}
CAPTION = "Ada and Bruno are walking in the forest."


@pytest.fixture(scope="module", autouse=True)
def _no_build_cache():
    """Every build here is a real one (the cache has its own test)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORYGPT_CACHE", "off")
        yield


@pytest.fixture(scope="module")
def cfg(repo, tmp_path_factory):
    # every build here is uncached and there are two: the preset's 3000 LM steps (~1 min per LM)
    # buy the aligner its reference accuracy, not anything tested here
    return load_config(repo / "configs/tiny.yaml",
                       [f"work_dir={tmp_path_factory.mktemp('work')}", "zoo.lm_pretrain_steps=300"])


@pytest.fixture(scope="module")
def corpus() -> list[list[str]]:
    return lm_corpus(seed=0, episodes=40)


@pytest.fixture(scope="module")
def built(cfg, corpus):
    start = time.perf_counter()
    parts = build_tiny_zoo(cfg.zoo, cfg.path("{work_dir}/zoo"), corpus, seed=0)
    return parts, time.perf_counter() - start


@pytest.fixture(scope="module")
def zoo(built) -> dict[str, Path]:
    return built[0]


def _digests(root: Path) -> dict[str, str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ----------------------------------------------------------------------------- the build
def test_build_writes_every_part_where_the_preset_expects_it(cfg, built):
    parts, _ = built
    assert set(parts) == PARTS
    configured = {name: cfg.path(value) for name, value in cfg.models.paths().items()
                  if value is not None}  # trained stages (char_ldm, aligner): no zoo part
    assert configured["lm"] == parts["opt"]
    assert all(configured[name] == parts[name] for name in configured.keys() - {"lm"})
    files = [p for d in parts.values() for p in d.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]  # safetensors only
    assert not list(parts["vae"].parent.glob(".*"))  # no staging dirs left behind


def test_build_is_deterministic(cfg, corpus, tmp_path):
    # the same code paths as the full build (pretraining loops included), with a few steps each
    quick = cfg.zoo.model_copy(update={"vae_pretrain_steps": 3, "lm_pretrain_steps": 3})
    first = build_tiny_zoo(quick, tmp_path / "a", corpus, seed=0)
    again = build_tiny_zoo(quick, tmp_path / "b", corpus, seed=0)
    for part, directory in first.items():
        assert _digests(again[part]) == _digests(directory), part


def test_a_cached_part_is_copied_and_any_change_builds_afresh(cfg, corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("STORYGPT_CACHE", str(cache))
    quick = cfg.zoo.model_copy(update={"vae_pretrain_steps": 2, "lm_pretrain_steps": 2})
    first = build_tiny_zoo(quick, tmp_path / "a", corpus, seed=0)
    assert sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir()) == sorted(PARTS)  # one entry per part
    vae_entry = next(p for p in cache.iterdir() if p.name.startswith("vae-"))
    (vae_entry / "marker").write_text("from the cache")
    second = build_tiny_zoo(quick, tmp_path / "b", corpus, seed=0)
    assert (second["vae"] / "marker").read_text() == "from the cache"  # copied, not rebuilt
    assert _digests(second["unet"]) == _digests(first["unet"])
    for change in ({"seed": 1}, {"zoo": quick.model_copy(update={"vae_pretrain_steps": 3})}):
        args = {"zoo": quick, "seed": 0} | change
        rebuilt = build_tiny_zoo(args["zoo"], tmp_path / f"c{len(list(tmp_path.iterdir()))}", corpus, seed=args["seed"])
        assert not (rebuilt["vae"] / "marker").exists(), change
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no half-written entries


# ----------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("part", ["clip_text", "opt", "llama"])
def test_tokenizer_round_trip_and_names_are_single_tokens(zoo, part):
    load = loading.load_clip_text if part == "clip_text" else loading.load_lm
    tokenizer, _ = load(zoo[part])
    decoded = tokenizer.decode(tokenizer(CAPTION)["input_ids"], skip_special_tokens=True)
    if part == "clip_text":  # CLIP lower-cases and splits punctuation off
        assert decoded.replace(" ", "") == CAPTION.lower().replace(" ", "")
    else:
        assert decoded == CAPTION
    for name in WORLD.names:
        text = name if part != "opt" else " " + name  # GPT-2 BPE: the word with its space
        assert len(tokenizer.tokenize(text)) == 1, (part, name, tokenizer.tokenize(text))


def test_lm_special_tokens_follow_the_real_models(zoo):
    opt, _ = loading.load_lm(zoo["opt"])
    assert (opt.bos_token, opt.eos_token, opt.pad_token) == ("</s>", "</s>", "<pad>")
    assert opt("Ada")["input_ids"][0] == opt.bos_token_id  # OPT prepends </s>
    llama, _ = loading.load_lm(zoo["llama"])
    assert (llama.bos_token, llama.eos_token, llama.unk_token) == ("<s>", "</s>", "<unk>")
    assert llama("Ada")["input_ids"][0] == llama.bos_token_id


# ----------------------------------------------------------------------------- forward passes
def test_clip_text_pads_to_77_and_encodes(zoo, cfg):
    tokenizer, model = loading.load_clip_text(zoo["clip_text"])
    # no max_length: the tokenizer's own model_max_length must be CLIP's 77
    captions = [CAPTION, "Cleo sits down."]
    batch = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 77)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids).last_hidden_state
    assert hidden.shape == (2, 77, cfg.zoo.clip_hidden_size)


def test_clip_text_loads_from_the_stable_diffusion_layout(zoo, tmp_path):
    """SD-1.5 keeps the tokenizer in a sibling of text_encoder/."""
    encoder, tokenizer_dir = tmp_path / "text_encoder", tmp_path / "tokenizer"
    shutil.copytree(zoo["clip_text"], encoder, ignore=shutil.ignore_patterns("tokenizer*"))
    weights = shutil.ignore_patterns("config.json", "model*")
    shutil.copytree(zoo["clip_text"], tokenizer_dir, ignore=weights)
    tokenizer, _ = loading.load_clip_text(encoder)
    assert tokenizer(CAPTION, padding="max_length")["input_ids"][-1] == tokenizer.pad_token_id


def test_clip_vision_embeds_an_image(zoo, cfg):
    processor, model = loading.load_clip_vision(zoo["clip_vision"])
    pixels = processor(images=[np.zeros((100, 80, 3), np.uint8)], return_tensors="pt").pixel_values
    size = cfg.zoo.vision_image_size
    assert pixels.shape == (1, 3, size, size)
    with torch.no_grad():
        assert model(pixel_values=pixels).image_embeds.shape == (1, cfg.zoo.clip_projection_dim)


def test_vae_and_unet_denoise_a_latent(zoo, cfg):
    vae, unet = loading.load_vae(zoo["vae"]), loading.load_unet(zoo["unet"])
    resolution = cfg.char_ldm.resolution
    latent_size = resolution // 2 ** (len(cfg.zoo.vae_block_out_channels) - 1)
    with torch.no_grad():
        images = torch.randn(2, 3, resolution, resolution)
        latents = to_latent_space(vae, vae.encode(images).latent_dist.sample())
        assert latents.shape == (2, cfg.zoo.vae_latent_channels, latent_size, latent_size)
        text = torch.randn(2, 77, cfg.zoo.clip_hidden_size)
        noise = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    assert noise.shape == latents.shape


@pytest.fixture(scope="module")
def world_frames(cfg) -> list[tuple[np.ndarray, list[str]]]:
    """100 fresh world frames at the Char-LDM's resolution (not the zoo's training frames)."""
    rng = np.random.default_rng(12345)
    return [(image, cast) for image, _, cast in (world_frame(rng, cfg.char_ldm.resolution) for _ in range(100))]


def _reconstruct(vae, frames) -> tuple[np.ndarray, float]:
    """decode(encode(x)) from a posterior sample, as the Char-LDM encodes: uint8 frames and the
    mean absolute error in [-1, 1]."""
    pixels = torch.from_numpy(np.stack([image for image, _ in frames])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
        decoded = vae.decode(latents).sample.clamp(-1, 1)
    images = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, (decoded - pixels).abs().mean().item()


def _cast_accuracy(images, frames) -> float:
    return float(np.mean([sorted(detect(image).characters) == sorted(cast)
                          for image, (_, cast) in zip(images, frames)]))


def test_vae_is_pretrained_on_world_frames(zoo, world_frames):
    """A random VAE's decode(encode(x)) is nothing like x, so no generated frame could show a
    character. The zoo's reconstructs fresh frames closely enough for the story-world detector to
    find their exact cast (measured at 32 px, 600 steps: casts 99% and 100% on seeds 0 and 1,
    settings 100%; after 300 steps only 65% of casts)."""
    from diffusers import AutoencoderKL

    vae = loading.load_vae(zoo["vae"])
    torch.manual_seed(0)
    untrained = AutoencoderKL.from_config(vae.config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, error = _reconstruct(vae, world_frames)
        untrained_images, untrained_error = _reconstruct(untrained, world_frames)
    finally:
        torch.set_num_threads(threads)
    assert error < 0.3 * untrained_error, (error, untrained_error)
    assert _cast_accuracy([image for image, _ in world_frames], world_frames) == 1.0  # the detector is exact
    accuracy = _cast_accuracy(images, world_frames)
    assert accuracy >= 0.9, accuracy
    assert accuracy > _cast_accuracy(untrained_images, world_frames) + 0.5
    settings = np.mean([detect(image).setting == detect(frame).setting
                        for image, (frame, _) in zip(images, world_frames)])
    assert settings >= 0.9, settings


def test_vae_latents_are_standardised_per_channel(zoo, world_frames):
    """SD's 0.18215 makes its latents ~unit variance; the zoo's VAE carries per-channel statistics
    (diffusers' latents_mean / latents_std) that make each channel ~N(0, 1) on world frames."""
    vae = loading.load_vae(zoo["vae"])
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == vae.config.latent_channels
    pixels = torch.from_numpy(np.stack([image for image, _ in world_frames])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    assert raw.mean(dim=(0, 2, 3)).abs().max().item() > 0.3  # off-centre before: the statistics matter
    latents = to_latent_space(vae, raw)
    assert latents.mean(dim=(0, 2, 3)).abs().max().item() < 0.3
    assert latents.std(dim=(0, 2, 3)).tolist() == pytest.approx([1.0] * vae.config.latent_channels, abs=0.3)
    torch.testing.assert_close(from_latent_space(vae, latents), raw, rtol=1e-4, atol=1e-4)


def test_unet_has_cross_attention_in_every_supervised_block(zoo, cfg):
    names = [name for name, _ in loading.load_unet(zoo["unet"]).named_modules()]
    for block in cfg.char_ldm.lreg_blocks:
        assert any(n.startswith(block + ".") and n.endswith(".attn2") for n in names), block


def test_loaders_honour_dtype(zoo):
    assert loading.load_unet(zoo["unet"], dtype=torch.bfloat16).dtype == torch.bfloat16
    assert next(loading.load_sam(zoo["sam"], dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_scheduler_is_sd15_ddpm_even_from_a_pndm_config(zoo, tmp_path):
    from diffusers import PNDMScheduler

    assert loading.load_scheduler(zoo["scheduler"]).config.beta_end == SD15_SCHEDULE["beta_end"]
    # what SD-1.5's scheduler/ directory holds
    pndm = {k: v for k, v in SD15_SCHEDULE.items() if k != "clip_sample"}
    PNDMScheduler(**pndm, skip_prk_steps=True).save_pretrained(tmp_path)
    scheduler = loading.load_scheduler(tmp_path)
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("part", ["opt", "llama"])
def test_lm_generates(zoo, part):
    tokenizer, model = loading.load_lm(zoo[part])
    prompt = tokenizer(CAPTION, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, prompt.input_ids.shape[1] + 3)


def test_sam_predictor_masks_two_boxes(zoo):
    from segment_anything import SamPredictor

    predictor = SamPredictor(loading.load_sam(zoo["sam"]))
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    boxes = torch.tensor([[8.0, 8, 60, 60], [40, 30, 120, 110]])  # x0, y0, x1, y1 in image pixels
    boxes = predictor.transform.apply_boxes_torch(boxes, (128, 128))
    masks, scores, _ = predictor.predict_torch(
        point_coords=None, point_labels=None, boxes=boxes, multimask_output=False
    )
    assert masks.shape == (2, 1, 128, 128) and masks.dtype == torch.bool
    assert scores.shape == (2, 1)


def test_sam_loads_an_official_checkpoint_by_its_file_name(zoo, tmp_path, monkeypatch):
    """A real ViT-B is ~370 MB; stand a tiny SAM in for the registry's vit_b builder."""
    from segment_anything import sam_model_registry

    arch = SamArchitecture.read(zoo["sam"])
    monkeypatch.setitem(sam_model_registry, "vit_b", lambda checkpoint=None: build_sam(arch))
    torch.manual_seed(1)
    source = build_sam(arch)
    torch.save(source.state_dict(), tmp_path / "sam_vit_b_01ec64.pth")
    loaded = loading.load_sam(tmp_path).state_dict()
    for name, expected in source.state_dict().items():
        assert torch.equal(loaded[name], expected), name
    torch.save({}, tmp_path / "sam_vit_h_4b8939.pth")
    with pytest.raises(ValueError, match="exactly one"):
        loading.load_sam(tmp_path)


def test_super_resolution_upscales_4x(zoo):
    pipe = loading.load_super_resolution(zoo["super_resolution"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(Image.new("RGB", (32, 32), (200, 40, 40)), num_inference_steps=2).images[0]
    assert image.size == (128, 128)
    batch = pipe(torch.rand(2, 3, 32, 32) * 2 - 1, num_inference_steps=2, output_type="pt").images
    assert batch.shape == (2, 3, 128, 128)


# ----------------------------------------------------------------------------- errors
LOADERS = [
    loading.load_clip_text,
    loading.load_clip_vision,
    loading.load_vae,
    loading.load_unet,
    loading.load_scheduler,
    loading.load_lm,
    loading.load_sam,
    loading.load_super_resolution,
]


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__)
def test_missing_directory_is_named(load, tmp_path):
    missing = tmp_path / "no-such-weights"
    with pytest.raises(FileNotFoundError, match="no-such-weights"):
        load(missing)


@pytest.mark.parametrize(
    "load, part, error",
    [
        (loading.load_unet, "vae", ValueError),
        (loading.load_vae, "unet", ValueError),
        (loading.load_lm, "clip_text", ValueError),
        (loading.load_clip_text, "opt", ValueError),
        (loading.load_clip_vision, "clip_text", ValueError),
        (loading.load_scheduler, "unet", FileNotFoundError),
        (loading.load_super_resolution, "unet", FileNotFoundError),
        (loading.load_sam, "vae", ValueError),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_wrong_part_is_refused_naming_the_directory(zoo, load, part, error):
    with pytest.raises(error, match=re.escape(str(zoo[part]))):
        load(zoo[part])


def test_sam_directory_with_neither_format_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sam_vit_\{b,l,h\}_\*\.pth"):
        loading.load_sam(tmp_path)


def test_the_language_models_have_read_world_stories(zoo, cfg):
    """The frozen LM must know the story language (a random one left the aligner at the mean):
    the zoo's LMs predict an unseen story far better than the same architecture untrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from storygpt.models.loading import load_lm

    story = lm_corpus(seed=12345, episodes=1)[0]  # a fresh run of frames, as the aligner tokenizes it
    for part in ("opt", "llama"):
        tokenizer, lm = load_lm(zoo[part])
        ids = torch.tensor([[tokenizer.bos_token_id] + [i for sentence in story
                                                        for i in tokenizer(sentence, add_special_tokens=False).input_ids]])
        torch.manual_seed(0)
        untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(zoo[part]))
        with torch.no_grad():
            trained_loss = lm(input_ids=ids, labels=ids).loss.item()
            untrained_loss = untrained(input_ids=ids, labels=ids).loss.item()
        assert trained_loss < 0.5 * untrained_loss, (part, trained_loss, untrained_loss)
