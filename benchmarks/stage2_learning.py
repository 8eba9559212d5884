"""Does stage 2 earn its place on the story world? The preset's aligner (``storygpt.aligner``) in a
plain in-process loop over a trained Char-LDM, then the test stories drawn four ways and scored by
the world's exact detector:

* Char-LDM on named captions (the ceiling) and on referential captions (the baseline);
* StoryGPT-V on named captions (its gap to the Char-LDM's named row is the mapper's) and on
  referential captions (the method): the story loop draws frame k from the LM's [IMG] states
  given every earlier *generated* frame, batched over the stories.

While training it logs the aligner's reference accuracy on held-out pronoun and named frames and
the cosine between its conditioning and the fused target. This is not the Ray job
(``storygpt train-aligner``): it answers "does this recipe resolve references, and do its frames
show it" in minutes, without Ray, DeepSpeed or MLflow. The model, batches, losses and story
layout are the job's.

``python -m benchmarks.stage2_learning --work DIR --char-ldm EXPORT [--config configs/world.yaml]
[--steps N] [--set key=value ...]``; ``DIR`` holds the world and the zoo (``benchmarks.world_learning``
makes both). Last line: one JSON object with the curve and the four rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = 50  # frames per sampling call


def targets_by_split(cfg, char_ldm: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]], object]:
    """(records, stage-2 target rows) per split, computed in-process as ``storygpt precompute`` does."""
    from storygpt.char_ldm.targets import StageTwoTargets
    from storygpt.vision.prepare import records_in_process

    records = {split: records_in_process(cfg, split) for split in ("train", "val", "test")}
    encoder = StageTwoTargets(cfg, char_ldm)
    targets = {split: [{**t, "setting": r["setting"]} for i in range(0, len(rows), 64)
                       for t, r in zip(encoder(rows[i:i + 64]), rows[i:i + 64])]
               for split, rows in records.items()}
    return records, targets, encoder


def examples_by_split(targets: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Stage-2 examples (one per story prefix, as the job builds them) of each split's target rows."""
    from storygpt.aligner.data import story_examples
    from storygpt.evaluation.stories import group_stories

    return {split: [e for story in group_stories(rows) for e in story_examples(story)]
            for split, rows in targets.items()}


class ReferenceProbe:
    """Reference accuracy (``storygpt.aligner.metrics``) and the cosine to the fused target on
    held-out examples, pronoun and named frames apart."""

    def __init__(self, examples: list[dict], encoder, references: dict, table, limit: int):
        import torch

        from storygpt.aligner.metrics import fused_candidates

        self.sets = {"pronoun": [e for e in examples if e["pronoun"]][:limit],
                     "named": [e for e in examples if not e["pronoun"]][:limit]}
        self.candidates = {kind: fused_candidates(encoder, [(e["caption"], e["characters"]) for e in chosen],
                                                  references, table) for kind, chosen in self.sets.items()}
        self.targets = {kind: torch.stack([torch.tensor(e["target"]).float() for e in chosen])
                        for kind, chosen in self.sets.items() if chosen}

    def __call__(self, aligner) -> dict:
        import torch

        from storygpt.aligner.data import collate
        from storygpt.aligner.losses import alignment_loss
        from storygpt.aligner.metrics import conditioning_cosine, reference_accuracy

        out = {}
        aligner.eval()
        with torch.no_grad():
            for kind, chosen in self.sets.items():
                if not chosen:
                    continue
                predicted = torch.cat([aligner(collate(chosen[i:i + 32], aligner))["conditioning"].float()
                                       for i in range(0, len(chosen), 32)])
                accuracy, chance = reference_accuracy(predicted, self.candidates[kind])
                cosine = conditioning_cosine(predicted, self.targets[kind])
                target = self.targets[kind].view(predicted.shape)
                out.update({f"reference_accuracy_{kind}": round(accuracy, 3), f"reference_chance_{kind}": round(chance, 3),
                            f"cosine_{kind}": round(cosine, 4),
                            f"align_loss_{kind}": round(alignment_loss(predicted, target).item(), 3)})
        aligner.train()
        return out


def train(cfg, examples: list[dict], probe: ReferenceProbe, steps: int, eval_every: int):
    import numpy as np
    import torch

    from storygpt.aligner.data import collate
    from storygpt.aligner.model import StoryAligner
    from storygpt.training import stage_lr_lambda

    torch.manual_seed(cfg.seed)
    aligner = StoryAligner.from_config(cfg)
    stage = cfg.aligner
    optimizer = torch.optim.AdamW(aligner.trainable_parameters(), lr=stage.learning_rate,
                                  weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, stage_lr_lambda(stage))  # the job's
    rng = np.random.default_rng(cfg.seed)
    curve, start = [], time.perf_counter()
    aligner.train()
    for step in range(1, steps + 1):
        out = aligner(collate([examples[i] for i in rng.choice(len(examples), stage.batch_size, replace=False)],
                              aligner))
        out["loss"].backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            point = {"step": step, "train_s": round(time.perf_counter() - start, 1),
                     "gen_loss": round(out["gen_loss"].item(), 4), "align_loss": round(out["align_loss"].item(), 4),
                     **probe(aligner)}
            curve.append(point)
            print(point, flush=True)
    return aligner.eval(), curve


def draw_and_score(cfg, char_ldm: Path, aligner, test: list[list[dict]], references: dict) -> dict:
    """Det. Char-Acc / BG-Acc of the four rows on the test stories (frame k of story j: seed
    ``cfg.seed + 1000 j + k``, as the evaluation seeds them), and Char-Acc on pronoun frames alone."""
    import numpy as np
    import torch

    from storygpt.aligner.data import collate
    from storygpt.char_ldm.pipeline import CharLDMPipeline
    from storygpt.world.detector import detect

    pipeline = CharLDMPipeline.from_config(cfg, char_ldm)
    steps, guidance = cfg.evaluate.sample_steps, cfg.evaluate.guidance_scale
    n = min(len(s) for s in test)
    frames = [f for s in test for f in s[:n]]
    seeds = [cfg.seed + 1000 * j + k for j in range(len(test)) for k in range(n)]
    pronoun = np.array([f["referential_caption"] != f["caption"] for f in frames])

    def score(images: list) -> dict:
        found = [detect(im, tolerance=cfg.evaluate.detector_tolerance) for im in images]
        cast = np.array([set(d.characters) == set(f["characters"]) for d, f in zip(found, frames)])
        setting = np.array([d.setting == f["setting"] for d, f in zip(found, frames)])
        return {"det_char_acc": round(float(cast.mean()), 4), "det_bg_acc": round(float(setting.mean()), 4),
                "det_char_acc_pronoun_frames": round(float(cast[pronoun].mean()), 4) if pronoun.any() else None}

    rows, names = {}, sorted(references)
    for captions, field in (("original", "caption"), ("referential", "referential_caption")):
        texts = [f[field] for f in frames]
        images = []
        for i in range(0, len(texts), BATCH):
            conditioning = pipeline.encode(texts[i:i + BATCH], [names] * len(texts[i:i + BATCH]), references)
            images += pipeline.sample(conditioning, seeds[i:i + BATCH], steps, guidance)
        rows[f"char_ldm/{captions}"] = score(images)
        # StoryGPT-V: frame k of every story at once, from the frames it drew before
        features: list[list] = [[] for _ in test]
        drawn: list[list] = [[] for _ in test]
        for k in range(n):
            examples = [{"id": s[k]["id"], "captions": [f[field] for f in s[:k + 1]], "frame_features": features[j],
                         "target": s[k]["fused"]} for j, s in enumerate(test)]
            with torch.no_grad():
                conditioning = aligner(collate(examples, aligner))["conditioning"]
            if k == 0 and cfg.evaluate.first_frame == "char_ldm":  # as the evaluation draws frame 1
                conditioning = pipeline.encode([e["captions"][0] for e in examples], [names] * len(examples), references)
            images = pipeline.sample(conditioning, [cfg.seed + 1000 * j + k for j in range(len(test))], steps, guidance)
            for j, (image, feature) in enumerate(zip(images, aligner.frame_features(images))):
                features[j] = features[j] + [feature.tolist()]
                drawn[j].append(image)
        rows[f"storygpt/{captions}"] = score([image for story in drawn for image in story])
        print(captions, rows[f"char_ldm/{captions}"], rows[f"storygpt/{captions}"], flush=True)
    rows["pronoun_share"] = round(float(pronoun.mean()), 4)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "world.yaml"))
    parser.add_argument("--work", required=True, help="work_dir: holds world/ and zoo/")
    parser.add_argument("--char-ldm", required=True, help="a trained Char-LDM export")
    parser.add_argument("--steps", type=int, help="default: aligner.max_steps")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-frames", type=int, default=100, help="held-out frames per kind for reference accuracy")
    parser.add_argument("--test-stories", type=int, default=30, help="0: no drawing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", help="write the trained aligner's new parts here")
    parser.add_argument("--aligner", help="a trained aligner to score instead of training one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import torch

    import storygpt  # noqa: F401  (the torchvision shim, before diffusers/transformers)
    from benchmarks.common import emit
    from storygpt.char_ldm.references import reference_crops
    from storygpt.config import load_config
    from storygpt.data.characters import get_table
    from storygpt.evaluation.report import decomposition
    from storygpt.evaluation.stories import group_stories

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = load_config(args.config, [f"work_dir={args.work}", *args.set])
    char_ldm = Path(args.char_ldm)
    records, targets, encoder = targets_by_split(cfg, char_ldm)
    examples = examples_by_split(targets)
    references = reference_crops(records["train"], cfg.seed)
    probe = ReferenceProbe(examples["val"], encoder, references, get_table(cfg.data.dataset), args.eval_frames)
    steps = args.steps or cfg.aligner.max_steps
    if args.aligner:
        from storygpt.aligner.model import StoryAligner

        aligner, curve, steps = StoryAligner.from_config(cfg, args.aligner).eval(), [], 0
        curve.append(probe(aligner))
    else:
        aligner, curve = train(cfg, examples["train"], probe, steps, args.eval_every)
    if args.save:
        aligner.save_trained(args.save)
    test = group_stories(targets["test"])[:args.test_stories]
    rows = draw_and_score(cfg, char_ldm, aligner, test, references) if test else {}
    emit({"benchmark": "stage2_learning", "config": Path(args.config).name, "overrides": args.set, "steps": steps,
          "gen_loss_weight": cfg.aligner.gen_loss_weight, "referential_rule": cfg.data.referential_rule,
          "curve": curve, "rows": rows, **decomposition(rows), "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
