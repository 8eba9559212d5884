"""storygpt demo: the quickstart pipeline on a preset (default: tiny).

Render the story world, build the tiny model zoo, summarise the dataset the way the training
jobs read it, preprocess it into records (Ray Data), train the Char-LDM (Ray Train + DeepSpeed),
precompute the stage-2 targets (Ray Data), train the aligner (Ray Train + DeepSpeed), train the
evaluation's classifier and captioner, score the test stories (Ray Data; the paper's Table 1)
and draw one referential story through the HTTP API of the Ray Serve app (LLM + Char-LDM
deployments): every stage on one local Ray, tracked in MLflow.
On the tiny preset's budget the models learn little: the demo proves the pipeline.

It prints each step and one line of its results; Ray's own log lines and progress bars (Ray Data,
Ray Train, Serve, MLflow) are kept out of the way unless ``--verbose``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from storygpt.commands import add_config_arguments
from ray_jobs.tracking import tracking_uri
from storygpt.config import ConfigError, StoryConfig, load_config


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--work-dir", help="where everything is written (overrides work_dir)")
    p.add_argument("--verbose", action="store_true", help="show Ray's log lines and progress bars too")


def run(args) -> int:
    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    cfg = load_config(args.config, overrides)
    if cfg.data.world is None or cfg.zoo is None:
        raise ConfigError("demo: needs a preset with data.world and zoo (configs/tiny.yaml)")
    if args.verbose:
        return _run(cfg, sys.stdout)
    log = Path(cfg.work_dir) / "demo.log"
    print(f"(Ray's and the libraries' own output goes to {log}; --verbose shows it here)", flush=True)
    with _output_to(log) as terminal:
        _quiet()
        return _run(cfg, terminal)


def _run(cfg: StoryConfig, out) -> int:
    """The steps, each announced and summed up in one line on ``out``."""
    say = functools.partial(print, file=out)
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
        say(f"[{i:2d}/{len(steps)}] {name} ...")
        t = time.perf_counter()
        results[name] = step(cfg, results)
        say(f"        {time.perf_counter() - t:5.1f}s  {_brief(name, results[name])}")
    say(f"\ndemo finished in {time.perf_counter() - started:.0f}s (preset '{cfg.preset}', work dir {cfg.work_dir})")
    root = results["story world"]["root"]
    say(f"  dataset:  {root}  (inspect: storygpt data show --referential --dataset world --root {root})")
    say(f"  records:  {results['preprocess (Ray Data)']['output']}  (manifest.json, records/, errors/)")
    say(f"  Char-LDM: {results['train Char-LDM (Ray Train + DeepSpeed)']['export']}")
    say(f"  aligner:  {results['train aligner (Ray Train + DeepSpeed)']['export']}")
    evaluation = results["evaluate the test stories (Ray Data)"]
    say(f"  scores:   {evaluation['output']}/table.md  (the paper's Table 1 on the test split):\n")
    say("    " + evaluation["table"].strip().replace("\n", "\n    ") + "\n")
    served = results["serve, and draw a story over HTTP (Ray Serve)"]
    say(f"  story:    {served['grid']}  (drawn through {served['url']}/v1/stories)")
    uri = tracking_uri(cfg.resolved())
    say(f"  MLflow:   experiment '{cfg.mlflow.experiment}' (mlflow ui --backend-store-uri {uri})")
    say(f"  serve it: storygpt serve --model-uri models:/{cfg.mlflow.experiment}-aligner/"
          f"{_latest_version(cfg, uri)} --tracking-uri {uri}")
    say("  " + _verdict(evaluation["results"]))
    from storygpt.evaluation.report import referential_verdict

    if (line := referential_verdict(evaluation["results"])) is not None:
        say("  " + line)
    return 0


@contextlib.contextmanager
def _output_to(path: Path):
    """File descriptors 1 and 2 into ``path`` while inside (Ray's C++ logs and its "(raylet)"
    notices, Python warnings, progress bars alike); yields a stream to the real stdout for the
    demo's own lines. Both are restored on the way out, so an error is reported on the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved):
                os.dup2(original, fd)
                os.close(original)
            terminal.close()


def _quiet() -> None:
    """Ray's progress bars and INFO lines (and MLflow's, DeepSpeed's, HF's) out of the demo's output:
    a local Ray whose workers' output stays in its log files, WARNING and up on the driver."""
    import logging

    import ray
    from ray.data import DataContext

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not ray.is_initialized():
        # the dashboard stays (on 127.0.0.1): Ray Train v2's controller reaches the State API through it
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune", "mlflow", "deepspeed", "py.warnings"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # library deprecation chatter goes to the (quiet) warnings logger


def _brief(step: str, result: dict) -> str:
    """One line of a step's results."""
    r = result
    if step == "story world":
        return f"{r['stories']} stories, {r['frames']} frames (train/val/test stories: " \
               f"{'/'.join(str(r['splits'][s]) for s in ('train', 'val', 'test'))})"
    if step == "tiny model zoo":
        return f"{len(r['parts'])} parts in {r['zoo']}"
    if step == "dataset summary":
        return f"train {r['train']['frames']} frames ({r['train']['pronoun_frames']} with pronouns), " \
               f"val {r['val']['frames']}, test {r['test']['frames']}; frames per character " + \
               ", ".join(f"{k} {v}" for k, v in r["character_frames"].items())
    if step.startswith("preprocess"):
        return f"{r['frames_in']} frames -> {r['records_out']} records, {r['errors']} errors"
    if step.startswith("train Char-LDM"):
        return f"{r['steps']} steps, loss {r['loss']}, attention-in-mask ratio {r['attn_in_mask_ratio']}"
    if step.startswith("train the evaluation"):
        return f"{r['steps']} steps, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, " \
               f"saved to {r.get('output') or r.get('captioner')}"
    if step.startswith("precompute"):
        return f"{r['targets']} targets"
    if step.startswith("train aligner"):
        return f"{r['steps']} steps, align loss {r['align_loss']}, reference accuracy " \
               f"{r['reference_accuracy']} (chance {r['reference_chance']}), cosine to the fused target " \
               f"{r['conditioning_cosine']}"
    if step.startswith("evaluate"):
        return f"{r['stories']} test stories drawn and scored (table below)"
    if step.startswith("serve"):
        return f"{r['frames']} frames from {r['url']}/v1/stories"
    return ", ".join(f"{k} {round(v, 3) if isinstance(v, float) else v}" for k, v in r.items()
                     if isinstance(v, (int, float, str)))[:150]


def _latest_version(cfg: StoryConfig, uri: str) -> str:
    """The story model's newest registered version (what train-aligner just registered)."""
    import mlflow

    versions = mlflow.MlflowClient(uri).search_model_versions(f"name = '{cfg.mlflow.experiment}-aligner'")
    return str(max((int(v.version) for v in versions), default=1))


def _verdict(results: dict) -> str:
    """One line on whether the Char-LDM learned: its exact-detector scores on the original captions
    against the chance row (the train split's most frequent cast and setting for every frame)."""
    drawn, chance = results["char_ldm/original"], results["most_frequent"]
    scores = (f"Char-LDM, exact detector: Char-Acc {100 * drawn['det_char_acc']:.1f} % (chance "
              f"{100 * chance['char_acc']:.1f} %), BG-Acc {100 * drawn['det_bg_acc']:.1f} % (chance "
              f"{100 * chance['bg_acc']:.1f} %)")
    learned = (drawn["det_char_acc"] >= 2 * chance["char_acc"] and drawn["det_bg_acc"] >= 2 * chance["bg_acc"]
               and drawn["det_char_acc"] > 0 and drawn["det_bg_acc"] > 0)  # 0 is never "twice" a chance of 0
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
            "reference_chance": round(summary.get("reference_chance", float("nan")), 3),
            "conditioning_cosine": round(summary.get("conditioning_cosine", float("nan")), 3), "export": str(export)}


def _train_classifier(cfg: StoryConfig, results: dict) -> dict:
    from storygpt.evaluation.classifier_training import train_classifier

    return train_classifier(cfg.resolved(), results["preprocess (Ray Data)"]["output"])


def _train_captioner(cfg: StoryConfig, results: dict) -> dict:
    from storygpt.evaluation.captioner_training import train_captioner

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
    from storygpt.story_grid import story_grid

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
    story_grid(frames, DEMO_STORY).save(out / "story.png")  # upscaled, each caption under its frame
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
