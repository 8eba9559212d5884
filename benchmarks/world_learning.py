"""Does the Char-LDM learn the story world, and how long does it take? The preset's model and
losses (``storygpt.char_ldm``) in a plain in-process loop on one device, scored as it trains with
the world's exact colour/shape detector: Det. Char-Acc (exact cast) and BG-Acc of frames drawn
from the test captions, against the chance of always answering the train split's most frequent
cast / setting.

This is not the Ray Train job (``storygpt train-ldm``): it exists to answer "how many steps, how
many minutes" on a given device without Ray, DeepSpeed or MLflow, e.g. on a lent GPU that has none
of them. The model, batches, losses and sampler are the ones the job uses.

``python -m benchmarks.world_learning --work DIR [--config configs/world.yaml] [--steps N]
[--set key=value ...]``; ``DIR`` gets the world (generated if missing) and must hold, or gets,
the zoo. Last line: one JSON object with the curve.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _prepare(cfg, work: Path) -> None:
    from storygpt.commands.zoo import build_zoo_quietly
    from storygpt.world.generate import generate_world

    world = cfg.data.world
    if not (work / "world").exists():
        generate_world(work / "world", world.stories, world.seed, world.image_size, world.clip_frames,
                       world.val_fraction, world.test_fraction)
    if not (work / "zoo" / "unet").exists():
        build_zoo_quietly(cfg, work / "zoo")


class Scorer:
    """Draws the first ``frames`` test captions (fusing the names they carry with train reference
    crops, as evaluation does) in one batch and scores them with the detector against the records'
    cast and setting, as `storygpt evaluate` does; chance is its "Most frequent" row."""

    def __init__(self, model, cfg, train: list[dict], test: list[dict], frames: int):
        from storygpt.char_ldm.pipeline import CharLDMPipeline
        from storygpt.char_ldm.references import reference_crops
        from storygpt.evaluation.report import most_frequent

        self.cfg, self.rows = cfg, test[:frames]
        self.pipeline = CharLDMPipeline(model, cfg)
        self.references = reference_crops(train)
        chance = most_frequent(train, self.rows)
        self.chance = {"char_acc": chance["char_acc"], "bg_acc": chance["bg_acc"]}

    def __call__(self, guidance: float) -> tuple[dict, list]:
        from storygpt.evaluation.scores import character_scores, setting_scores
        from storygpt.world.detector import detect

        model = self.pipeline.model
        model.eval()
        names = sorted(self.references)
        captions = [r["caption"] for r in self.rows]
        conditioning = self.pipeline.encode(captions, [names] * len(captions), self.references)
        images = self.pipeline.sample(conditioning, list(range(len(captions))),
                                      self.cfg.evaluate.sample_steps, guidance)
        model.train()
        found = [detect(im, tolerance=self.cfg.evaluate.detector_tolerance) for im in images]
        cast = character_scores([d.characters for d in found], [r["characters"] for r in self.rows])
        setting = setting_scores([d.setting for d in found], [r["setting"] for r in self.rows])
        return {"char_acc": cast["acc"], "bg_acc": setting["acc"]}, images


def train(cfg, steps: int, eval_every: int, eval_frames: int, device: str, out_png: Path | None) -> dict:
    import numpy as np
    import torch

    from storygpt.char_ldm.data import collate
    from storygpt.char_ldm.model import CharLDM
    from storygpt.vision.prepare import records_in_process

    train_rows, test_rows = records_in_process(cfg, "train"), records_in_process(cfg, "test")
    torch.manual_seed(cfg.seed)
    model = CharLDM.from_config(cfg).to(device)
    ldm = cfg.char_ldm
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=ldm.learning_rate, weight_decay=ldm.weight_decay)
    scorer = Scorer(model, cfg, train_rows, test_rows, eval_frames)
    generator, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    curve, train_s, start = [], 0.0, time.perf_counter()
    print(f"{len(train_rows)} train / {len(test_rows)} test frames; chance {scorer.chance}", flush=True)
    for step in range(1, steps + 1):
        rows = [train_rows[i] for i in rng.choice(len(train_rows), ldm.batch_size, replace=False)]
        loss = model(collate(rows, model, ldm, generator), generator)["loss"]
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = ldm.learning_rate * min(1.0, step / max(ldm.warmup_steps, 1))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            if device == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - start
            guided, images = scorer(ldm.guidance_scale)
            plain, _ = scorer(1.0)
            point = {"step": step, "train_s": round(train_s, 1), "loss": round(loss.item(), 4),
                     f"guided_{ldm.guidance_scale:g}": guided, "unguided": plain}
            curve.append(point)
            print(point, flush=True)
            if out_png is not None:
                from PIL import Image

                Image.fromarray(np.concatenate(images[:16], 1)).save(out_png.with_name(f"{out_png.stem}_{step}.png"))
            start = time.perf_counter()
    return {"frames_scored": len(scorer.rows), "chance": scorer.chance, "curve": curve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "world.yaml"))
    parser.add_argument("--work", required=True, help="work_dir: holds (or gets) world/ and zoo/")
    parser.add_argument("--steps", type=int, help="default: char_ldm.max_steps")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-frames", type=int, default=60)
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--png", help="save the drawn test frames at each evaluation as PNG_<step>.png")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import torch

    import storygpt  # noqa: F401  (the torchvision shim, before diffusers/transformers)
    from benchmarks.common import emit
    from storygpt.config import load_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(args.config, [f"work_dir={args.work}", *args.set])
    work = Path(args.work)
    start = time.perf_counter()
    _prepare(cfg, work)
    steps = args.steps or cfg.char_ldm.max_steps
    result = train(cfg, steps, args.eval_every, args.eval_frames, device,
                   Path(args.png) if args.png else None)
    emit({"benchmark": "world_learning", "device": device, "config": Path(args.config).name,
          "overrides": args.set, "batch": cfg.char_ldm.batch_size, "lr": cfg.char_ldm.learning_rate,
          "steps": steps, "wall_s": round(time.perf_counter() - start, 1), **result})


if __name__ == "__main__":
    main()
