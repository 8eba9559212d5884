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
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.tracking import tracking_uri
from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, StoryConfig, load_config
from storygpt.layout import WorkDir


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
    log = WorkDir.of(cfg).demo_log
    print(f"(Ray's and the libraries' own output goes to {log}; --verbose shows it here)", flush=True)
    with _output_to(log) as terminal:
        _quiet()
        return _run(cfg, terminal)


@dataclass
class Chain:
    """What one step hands the next (and the closing summary reads)."""
    world: Path | None = None
    records: Path | None = None
    char_ldm: Path | None = None   # the Char-LDM export
    targets: Path | None = None    # its stage-2 targets
    aligner: Path | None = None    # the aligner export
    evaluation: dict | None = None  # output dir, table, results
    story: dict | None = None       # url, grid


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
    chain = Chain()
    for i, (name, step) in enumerate(steps, 1):
        say(f"[{i:2d}/{len(steps)}] {name} ...")
        t = time.perf_counter()
        brief = step(cfg, chain)
        say(f"        {time.perf_counter() - t:5.1f}s  {brief}")
    say(f"\ndemo finished in {time.perf_counter() - started:.0f}s (preset '{cfg.preset}', work dir {cfg.work_dir})")
    say(f"  dataset:  {chain.world}  (inspect: storygpt data show --referential --dataset world --root {chain.world})")
    say(f"  records:  {chain.records}  (manifest.json, records/, errors/)")
    say(f"  Char-LDM: {chain.char_ldm}")
    say(f"  aligner:  {chain.aligner}")
    say(f"  scores:   {chain.evaluation['output']}/table.md  (the paper's Table 1 on the test split):\n")
    say("    " + chain.evaluation["table"].strip().replace("\n", "\n    ") + "\n")
    say(f"  story:    {chain.story['grid']}  (drawn through {chain.story['url']}/v1/stories)")
    uri = tracking_uri(cfg.resolved())
    say(f"  MLflow:   experiment '{cfg.mlflow.experiment}' (mlflow ui --backend-store-uri {uri})")
    say(f"  serve it: storygpt serve --model-uri models:/{cfg.mlflow.experiment}-aligner/"
          f"{_latest_version(cfg, uri)} --tracking-uri {uri}")
    say("  " + _verdict(chain.evaluation["results"]))
    from storygpt.evaluation.report import referential_verdict

    if (line := referential_verdict(chain.evaluation["results"])) is not None:
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


def _world(cfg: StoryConfig, chain: Chain) -> str:
    from storygpt.world.generate import generate_world

    w = cfg.data.world
    chain.world = cfg.path(cfg.data.root)
    s = generate_world(chain.world, w.stories, w.seed, w.image_size, w.clip_frames, w.val_fraction, w.test_fraction)
    return f"{s.stories} stories, {s.frames} frames (train/val/test stories: " \
           f"{'/'.join(str(s.splits[k]) for k in ('train', 'val', 'test'))})"


def _zoo(cfg: StoryConfig, chain: Chain) -> str:
    from storygpt.commands.zoo import build_zoo_quietly

    out = WorkDir.of(cfg).zoo
    parts = build_zoo_quietly(cfg, out)
    return f"{len(parts)} parts in {out}"


def _summary(cfg: StoryConfig, chain: Chain) -> str:
    from storygpt.data.characters import get_table
    from storygpt.data.readers import ReadOptions, read_stories

    table = get_table(cfg.data.dataset)
    out = {}
    for split in ("train", "val", "test"):
        options = ReadOptions(split, cfg.data.frames_per_story, cfg.data.clip_frame,
                              cfg.data.box_source_size, cfg.data.on_error,
                              referential_rule=cfg.data.referential_rule)
        stories, report = read_stories(cfg.data.format, chain.world, table, options)
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
    path = WorkDir.of(cfg).dataset_summary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return f"train {out['train']['frames']} frames ({out['train']['pronoun_frames']} with pronouns), " \
           f"val {out['val']['frames']}, test {out['test']['frames']}; frames per character " + \
           ", ".join(f"{k} {v}" for k, v in out["character_frames"].items())


def _preprocess(cfg: StoryConfig, chain: Chain) -> str:
    from preprocessing.job import preprocess

    manifest = preprocess(cfg)
    chain.records = Path(manifest["output"])
    c = manifest["counts"]
    return f"{c['frames_in']} frames -> {c['records_out']} records, {c['errors']} errors"


def _train_ldm(cfg: StoryConfig, chain: Chain) -> str:
    from ray_jobs.train_ldm import fit

    resolved = cfg.resolved()
    summary = fit(resolved)
    chain.char_ldm = Path(summary["export"])
    chain.targets = WorkDir.of(resolved).targets(summary["run"])
    return f"{summary['global_step']} steps, loss {summary['loss']:.4f}, attention-in-mask ratio " \
           f"{summary['attn_in_mask_ratio']:.3f}"


def _precompute(cfg: StoryConfig, chain: Chain) -> str:
    from preprocessing.precompute import precompute

    manifest = precompute(cfg.model_copy(update={"precompute": cfg.precompute.model_copy(
        update={"output": str(chain.targets)})}), char_ldm=str(chain.char_ldm))
    return f"{manifest['counts']['targets_out']} targets"


def _train_aligner(cfg: StoryConfig, chain: Chain) -> str:
    from ray_jobs.train_aligner import fit

    r = fit(cfg.resolved(), targets=str(chain.targets))
    chain.aligner = Path(r["export"])
    return f"{r['global_step']} steps, align loss {r['align_loss']:.4f}, reference accuracy " \
           f"{r.get('reference_accuracy', float('nan')):.3f} (chance {r.get('reference_chance', float('nan')):.3f}), " \
           f"cosine to the fused target {r.get('conditioning_cosine', float('nan')):.3f}"


def _train_classifier(cfg: StoryConfig, chain: Chain) -> str:
    from storygpt.evaluation.classifier_training import train_classifier

    return _trained_evaluator(train_classifier(cfg.resolved(), str(chain.records)))


def _train_captioner(cfg: StoryConfig, chain: Chain) -> str:
    from storygpt.evaluation.captioner_training import train_captioner

    return _trained_evaluator(train_captioner(cfg.resolved(), str(chain.records)))


def _trained_evaluator(r: dict) -> str:
    return f"{r['steps']} steps, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, " \
           f"saved to {r.get('output') or r.get('captioner')}"


def _evaluate(cfg: StoryConfig, chain: Chain) -> str:
    from ray_jobs.evaluate import evaluate

    summary = evaluate(cfg, char_ldm=str(chain.char_ldm), aligner=str(chain.aligner))
    chain.evaluation = {k: summary[k] for k in ("output", "table", "results")}
    return f"{summary['stories']} test stories drawn and scored (table below)"


DEMO_STORY = ["Emma waves hello in the forest.", "Later, she sits down with Bruno in the forest.",
              "Later, they are eating lunch in the forest.", "Later, he runs around in the forest."]


def _serve(cfg: StoryConfig, chain: Chain) -> str:
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
    app = build_app(resolved, str(chain.char_ldm), str(chain.aligner))
    url = start(app, "127.0.0.1", _free_port(cfg.serve.port))
    try:
        reply = requests.post(f"{url}/v1/stories", json={"captions": DEMO_STORY, "seed": cfg.seed}, timeout=900)
        reply.raise_for_status()
        frames = [np.asarray(Image.open(io.BytesIO(base64.b64decode(f["image"]))).convert("RGB"))
                  for f in reply.json()["frames"]]
    finally:
        serve.shutdown()
    out = WorkDir.of(resolved).story
    out.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(out / f"frame_{i:02d}.png")
    story_grid(frames, DEMO_STORY).save(out / "story.png")  # upscaled, each caption under its frame
    (out / "story.json").write_text(json.dumps({"captions": DEMO_STORY, "url": url}, indent=1))
    chain.story = {"url": url, "grid": str(out / "story.png")}
    return f"{len(frames)} frames from {url}/v1/stories"


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
