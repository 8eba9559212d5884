"""storygpt demo: the quickstart pipeline on a preset (default: tiny).

Render the story world, build the tiny model zoo, summarise the dataset the way the training
jobs read it, preprocess it into records (Ray Data), train the Char-LDM (Ray Train + DeepSpeed),
precompute the stage-2 targets (Ray Data), train the aligner (Ray Train + DeepSpeed), train the
evaluation's classifier and captioner, score the test stories (Ray Data; the paper's Table 1)
and draw one referential story through the HTTP API of the Ray Serve app (LLM + Char-LDM
deployments): every stage on one local Ray, tracked in MLflow.
On the tiny preset's budget the models learn little: the demo proves the pipeline.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from storygpt.commands import add_config_arguments
from ray_jobs.tracking import tracking_uri
from storygpt.config import ConfigError, StoryConfig, load_config


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--work-dir", help="where everything is written (overrides work_dir)")


def run(args) -> int:
    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    cfg = load_config(args.config, overrides)
    if cfg.data.world is None or cfg.zoo is None:
        raise ConfigError("demo: needs a preset with data.world and zoo (configs/tiny.yaml)")
    started = time.perf_counter()
    steps = [("story world", _world), ("tiny model zoo", _zoo), ("dataset summary", _summary),
             ("preprocess (Ray Data)", _preprocess), ("train Char-LDM (Ray Train + DeepSpeed)", _train_ldm),
             ("precompute stage-2 targets (Ray Data)", _precompute),
             ("train aligner (Ray Train + DeepSpeed)", _train_aligner),
             ("train the evaluation classifier (Inception-v3)", _train_classifier),
             ("train the evaluation captioner (BLIP-2)", _train_captioner),
             ("evaluate the test stories (Ray Data)", _evaluate),
             ("serve, and draw a story over HTTP (Ray Serve)", _serve)]
    results = {}
    for i, (name, step) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {name} ...", flush=True)
        t = time.perf_counter()
        results[name] = step(cfg, results)
        shown = {k: v for k, v in results[name].items() if k not in ("table", "results")}
        print(f"      done in {time.perf_counter() - t:.1f}s: {json.dumps(shown)}", flush=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s (preset '{cfg.preset}', work dir {cfg.work_dir})")
    root = results["story world"]["root"]
    print(f"  dataset:  {root}  (inspect: storygpt data show --referential --root {root})")
    print(f"  models:   {results['tiny model zoo']['zoo']}")
    print(f"  records:  {results['preprocess (Ray Data)']['output']}  (manifest.json, records/, errors/)")
    print(f"  Char-LDM: {results['train Char-LDM (Ray Train + DeepSpeed)']['export']}")
    print(f"  aligner:  {results['train aligner (Ray Train + DeepSpeed)']['export']}")
    evaluation = results["evaluate the test stories (Ray Data)"]
    print(f"  scores:   {evaluation['output']}/table.md  (the paper's Table 1 on the test split):\n")
    print("    " + evaluation["table"].replace("\n", "\n    "))
    served = results["serve, and draw a story over HTTP (Ray Serve)"]
    print(f"  story:    {served['grid']}  (drawn through {served['url']}/v1/stories)")
    print(f"  served:   {served['url']} during the demo; serve it again with: storygpt serve --config "
          f"{args.config} --set work_dir={cfg.work_dir}")
    print(f"  MLflow:   experiment '{cfg.mlflow.experiment}' at {tracking_uri(cfg)}  "
          f"(mlflow ui --backend-store-uri {tracking_uri(cfg)})")
    print("  " + _verdict(evaluation["results"]))
    from storygpt.evaluation.report import referential_verdict

    if (line := referential_verdict(evaluation["results"])) is not None:
        print("  " + line)
    return 0


def _verdict(results: dict) -> str:
    """One line on whether the Char-LDM learned: its exact-detector scores on the original captions
    against the chance row (the train split's most frequent cast and setting for every frame)."""
    drawn, chance = results["char_ldm/original"], results["most_frequent"]
    scores = (f"Char-LDM, exact detector: Char-Acc {100 * drawn['det_char_acc']:.1f} % (chance "
              f"{100 * chance['char_acc']:.1f} %), BG-Acc {100 * drawn['det_bg_acc']:.1f} % (chance "
              f"{100 * chance['bg_acc']:.1f} %)")
    learned = drawn["det_char_acc"] >= 2 * chance["char_acc"] and drawn["det_bg_acc"] >= 2 * chance["bg_acc"]
    return f"({scores}: " + ("both at least twice chance)" if learned else
                             "not both twice chance yet: the frames prove the pipeline, not the method)")


def _world(cfg: StoryConfig, results: dict) -> dict:
    from storygpt.world.generate import generate_world

    w = cfg.data.world
    root = cfg.path(cfg.data.root)
    s = generate_world(root, w.stories, w.seed, w.image_size, w.clip_frames, w.val_fraction, w.test_fraction)
    return {"root": str(root), "stories": s.stories, "frames": s.frames, "splits": s.splits}


def _zoo(cfg: StoryConfig, results: dict) -> dict:
    from storygpt.commands.zoo import build_zoo_quietly

    out = cfg.path("{work_dir}/zoo")
    parts = build_zoo_quietly(cfg, out)
    return {"zoo": str(out), "parts": sorted(parts)}


def _summary(cfg: StoryConfig, results: dict) -> dict:
    from storygpt.data.characters import get_table
    from storygpt.data.readers import ReadOptions, read_stories

    table = get_table(cfg.data.dataset)
    out = {}
    for split in ("train", "val", "test"):
        options = ReadOptions(split, cfg.data.frames_per_story, cfg.data.clip_frame,
                              cfg.data.box_source_size, cfg.data.on_error,
                              referential_rule=cfg.data.referential_rule)
        stories, report = read_stories(cfg.data.format, cfg.path(cfg.data.root), table, options)
        frames = [f for s in stories for f in s.frames]
        out[split] = {
            "stories": report.stories,
            "frames": report.frames,
            "skipped": len(report.skipped),
            "pronoun_frames": sum(f.referential_caption != f.caption for f in frames),
            "with_masks": sum(f.masks is not None for f in frames),
        }
        if split == "train":
            counts = Counter(name for f in frames for name in f.characters)
            out["character_frames"] = dict(sorted(counts.items()))
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.work_dir) / "dataset_summary.json").write_text(json.dumps(out, indent=1))
    return out


def _preprocess(cfg: StoryConfig, results: dict) -> dict:
    from preprocessing.job import preprocess

    manifest = preprocess(cfg)
    return {"output": manifest["output"], **manifest["counts"], "seconds": manifest["timings"]["total_s"]}


def _train_ldm(cfg: StoryConfig, results: dict) -> dict:
    from ray_jobs.train_ldm import fit

    summary = fit(cfg.resolved())
    export = Path(cfg.resolved().work_dir) / "char_ldm" / summary["run"]
    return {"run": summary["run"], "steps": summary["global_step"], "loss": round(summary["loss"], 4),
            "attn_in_mask_ratio": round(summary["attn_in_mask_ratio"], 3), "export": str(export)}


def _targets_dir(results: dict) -> str:
    """One targets dir per Char-LDM run: a re-run of the demo trains a new Char-LDM, and
    precompute (rightly) refuses to mix targets of two models in one dir."""
    export = Path(results["train Char-LDM (Ray Train + DeepSpeed)"]["export"])
    return str(export.parent.parent / "fused" / export.name)


def _precompute(cfg: StoryConfig, results: dict) -> dict:
    from preprocessing.precompute import precompute

    export = results["train Char-LDM (Ray Train + DeepSpeed)"]["export"]
    manifest = precompute(cfg.model_copy(update={"precompute": cfg.precompute.model_copy(
        update={"output": _targets_dir(results)})}), char_ldm=export)
    return {"output": manifest["output"], "targets": manifest["counts"]["targets_out"],
            "seconds": manifest["timings"]["total_s"]}


def _train_aligner(cfg: StoryConfig, results: dict) -> dict:
    from ray_jobs.train_aligner import fit

    summary = fit(cfg.resolved(), targets=_targets_dir(results))
    export = Path(cfg.resolved().work_dir) / "aligner" / summary["run"]
    return {"run": summary["run"], "steps": summary["global_step"], "gen_loss": round(summary["gen_loss"], 3),
            "align_loss": round(summary["align_loss"], 4),
            "reference_accuracy": round(summary.get("reference_accuracy", float("nan")), 3),
            "reference_chance": round(summary.get("reference_chance", float("nan")), 3), "export": str(export)}


def _train_classifier(cfg: StoryConfig, results: dict) -> dict:
    from storygpt.evaluation.classifier import train_classifier

    return train_classifier(cfg.resolved(), results["preprocess (Ray Data)"]["output"])


def _train_captioner(cfg: StoryConfig, results: dict) -> dict:
    from storygpt.evaluation.captioner import train_captioner

    return train_captioner(cfg.resolved(), results["preprocess (Ray Data)"]["output"])


def _evaluate(cfg: StoryConfig, results: dict) -> dict:
    from ray_jobs.evaluate import evaluate

    summary = evaluate(cfg, char_ldm=results["train Char-LDM (Ray Train + DeepSpeed)"]["export"],
                       aligner=results["train aligner (Ray Train + DeepSpeed)"]["export"])
    return {"output": summary["output"], "stories": summary["stories"], "seconds": summary["seconds"],
            "table": summary["table"], "results": summary["results"]}


DEMO_STORY = ["Emma waves hello in the forest.", "Later, she sits down with Bruno in the forest.",
              "Later, they are eating lunch in the forest.", "Later, he runs around in the forest."]


def _serve(cfg: StoryConfig, results: dict) -> dict:
    """Deploy the trained models with Ray Serve on 127.0.0.1 and draw one referential story
    through POST /v1/stories, as a user would; Serve is shut down at the end of the demo."""
    import base64
    import io

    import numpy as np
    import requests
    from PIL import Image
    from ray import serve

    from serving.app import build_app
    from serving.command import start

    resolved = cfg.resolved()
    app = build_app(resolved, results["train Char-LDM (Ray Train + DeepSpeed)"]["export"],
                    results["train aligner (Ray Train + DeepSpeed)"]["export"])
    url = start(app, "127.0.0.1", _free_port(cfg.serve.port))
    try:
        reply = requests.post(f"{url}/v1/stories", json={"captions": DEMO_STORY, "seed": cfg.seed}, timeout=900)
        reply.raise_for_status()
        frames = [np.asarray(Image.open(io.BytesIO(base64.b64decode(f["image"]))).convert("RGB"))
                  for f in reply.json()["frames"]]
    finally:
        serve.shutdown()
    out = Path(resolved.work_dir) / "story"
    out.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(out / f"frame_{i:02d}.png")
    Image.fromarray(np.concatenate(frames, axis=1)).save(out / "story.png")
    (out / "story.json").write_text(json.dumps({"captions": DEMO_STORY, "url": url}, indent=1))
    return {"url": url, "frames": len(frames), "grid": str(out / "story.png")}


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else any free loopback port."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port on 127.0.0.1")
