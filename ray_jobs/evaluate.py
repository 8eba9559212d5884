"""storygpt evaluate --config C [--records DIR] [--char-ldm DIR] [--aligner DIR]

The paper's evaluation as a Ray Data job over the test split (``evaluate.*``):

    stories (tasks) -> draw (actor pool: Char-LDM, + aligner for StoryGPT-V rows) ─┐
    ground-truth frames (finished parts) ──────────────────────────────────────────┴-> score
    (actor pool: Inception-v3 classifier, BLIP-2 captioner, FID features, world detector)

Each Table-1 row (``evaluate.rows``, e.g. ``storygpt/referential``) draws every story, plus
the long-story runs (``evaluate.long_story_frames`` consecutive frames, each once; Table 5). The driver
turns the scored frames into figures (:mod:`storygpt.evaluation.report`): ``table.md`` laid out
like the paper's Table 1, ``scores.json``, the generated frames as PNG, and one MLflow run.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import TypedDict

import numpy as np
import pyarrow as pa

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, StoryConfig, load_config

GROUND_TRUTH = "ground_truth"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--records", help="records dir (default: preprocess.output)")
    p.add_argument("--char-ldm", dest="char_ldm", help="trained Char-LDM (default: models.char_ldm, else the latest)")
    p.add_argument("--aligner", help="trained aligner (default: models.aligner, else the latest)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = evaluate(cfg, records=args.records, char_ldm=args.char_ldm, aligner=args.aligner)
    print(summary["table"])
    print(json.dumps({k: v for k, v in summary.items() if k != "table"}))
    return 0


class EvaluationSummary(TypedDict, total=False):
    """What ``evaluate`` returns (``scores.json`` plus the MLflow run and the Markdown table)."""
    output: str            # frames/, scores.json, table.md, reference_captions.json
    split: str
    stories: int
    story_frames: int
    results: dict          # row -> figures (Table 1)
    long_results: dict     # row -> story length -> figures (Table 5)
    decomposition: dict    # storygpt_v_ratio, resolution_gain, mapper_ratio
    seconds: float
    run_id: str
    table: str


def evaluate(cfg: StoryConfig, records: str | Path | None = None, char_ldm: str | Path | None = None,
             aligner: str | Path | None = None) -> EvaluationSummary:
    from ray_jobs.runtime import connect_ray
    from storygpt.char_ldm.references import train_reference_crops
    from storygpt.data.characters import get_table
    from storygpt.data.readers import frame_position
    from storygpt.data.record_schema import read_table
    from storygpt.evaluation.report import decomposition, markdown, most_frequent, summarize
    from storygpt.evaluation.stories import FRAME_FIELDS, long_stories, split_stories
    from storygpt.models.trained import trained_dir

    started = time.perf_counter()
    cfg = cfg.resolved()
    ev = cfg.evaluate
    records_dir = Path(records).resolve() if records else Path(cfg.preprocess.output)
    meta = read_table(records_dir, columns=FRAME_FIELDS + ["split"])
    if meta.num_rows == 0:
        raise ConfigError(f"--records: no records under '{records_dir}' (run `storygpt preprocess` first)")
    story_frames = ev.story_frames or cfg.data.frames_per_story
    stories = split_stories(meta, ev.split, story_frames, ev.max_stories)
    if not stories:
        raise ConfigError(f"evaluate.split: no {ev.split} story of >= {story_frames} frames in '{records_dir}'")
    runs = {story_frames: stories}
    whole = split_stories(meta, ev.split)
    table = get_table(cfg.data.dataset)
    for n in ev.long_story_frames:
        chained = long_stories(whole, n, ev.long_stories, frame_position(cfg.data.format), table,
                               cfg.data.referential_rule)
        if chained:
            runs[n] = chained
    skipped = [n for n in ev.long_story_frames if n not in runs and ev.long_stories]
    char_ldm_dir = trained_dir(cfg, "char_ldm", char_ldm)
    needs_aligner = any(r.startswith("storygpt/") for r in ev.rows)
    aligner_dir = trained_dir(cfg, "aligner", aligner) if needs_aligner else None
    crops = train_reference_crops(records_dir, table.names, cfg.seed)
    references = {name: crop.tolist() for name, crop in crops.items()}

    tasks = [{"row": row, "length": n, "story_id": story[0]["story_id"], "seed": cfg.seed + 1000 * k,
              "frames": json.dumps(story)}
             for n, run_stories in runs.items() for row in ev.rows for k, story in enumerate(run_stories)]
    frame_ids = sorted({f["id"] for run_stories in runs.values() for story in run_stories for f in story})
    output = Path(ev.output) / datetime.now().strftime("%Y%m%d-%H%M%S")
    connect_ray()
    scored = _pipeline(cfg, tasks, records_dir, frame_ids, char_ldm_dir, aligner_dir, references, output).take_all()
    pipeline_s = time.perf_counter() - started

    truth = {r["id"]: r for r in scored if r["row"] == GROUND_TRUTH}
    real = lambda frames: np.stack([truth[f["id"]]["feature"] for f in frames])  # noqa: E731
    results: dict[str, dict] = {}
    results[GROUND_TRUTH] = summarize([truth[i] for i in frame_ids], None)  # human captions only: no self-reference
    truth_captions = {i: json.loads(r["reference_captions"]) for i, r in truth.items()}
    long_results: dict[str, dict[int, dict]] = {}
    for row in ev.rows:
        for n in runs:
            frames = sorted((r for r in scored if r["row"] == row and r["length"] == n),
                            key=lambda r: (r["story_id"], r["frame_index"]))
            figures = summarize(frames, real(frames), truth_captions)  # FID at every length, as Table 5
            if n == story_frames:
                results[row] = figures
            key = "det_char_acc" if "det_char_acc" in figures else "char_acc"
            long_results.setdefault(row, {})[n] = {"char_acc": figures[key], "fid": figures["fid"]}
    train = meta.filter(pa.compute.equal(meta["split"], "train")).select(["characters", "setting"]).to_pylist()
    results["most_frequent"] = most_frequent(train, [truth[i] for i in frame_ids])
    table = markdown(results, long_results if len(runs) > 1 else {}, story_frames, cfg.data.dataset == "world")

    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(table)
    summary: EvaluationSummary = {
        "output": str(output), "split": ev.split, "stories": len(stories), "story_frames": story_frames,
        "long_story_frames": sorted(n for n in runs if n != story_frames), "long_stories_skipped": skipped,
        "char_ldm": str(char_ldm_dir), "aligner": str(aligner_dir) if aligner_dir else None,
        "results": results, "long_results": {r: {str(n): v for n, v in d.items()} for r, d in long_results.items()},
        "referential_rule": cfg.data.referential_rule, "decomposition": decomposition(results),
        "seconds": round(time.perf_counter() - started, 1), "pipeline_s": round(pipeline_s, 1),
    }
    (output / "scores.json").write_text(json.dumps(summary, indent=1))
    # what BLEU4 / CIDEr scored against: the captioner's best beams for each real frame
    (output / "reference_captions.json").write_text(json.dumps({i: truth_captions[i] for i in frame_ids}, indent=1))
    summary["run_id"] = _track(cfg, output, results, long_results, summary["decomposition"])
    summary["table"] = table
    return summary


# ----------------------------------------------------------------------------- the graph
def _pipeline(cfg: StoryConfig, tasks: list[dict], records_dir: Path, frame_ids: list[str], char_ldm_dir: Path,
              aligner_dir: Path | None, references: dict, output: Path):
    import ray
    import ray.data.expressions as E  # noqa: N812
    from ray.data import ActorPoolStrategy

    from storygpt.data.parts import finished_files

    pool = cfg.evaluate.pool
    actors = dict(compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
                  num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, resources=dict(pool.resources))
    settings = dict(cfg=cfg.model_dump(mode="json"), threads=max(1, int(pool.num_cpus)), num_gpus=pool.num_gpus)
    drawn = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
        DrawStories, batch_size=1, batch_format="pyarrow", **actors,
        fn_constructor_kwargs=dict(**settings, char_ldm=str(char_ldm_dir),
                                   aligner=str(aligner_dir) if aligner_dir else None, references=references))
    files = finished_files(records_dir, "records")
    truth = ray.data.read_parquet(files, columns=["id", "story_id", "frame_index", "image", "characters", "setting",
                                                  "caption"]).filter(expr=E.col("id").is_in(frame_ids))
    truth = truth.map_batches(_as_ground_truth, batch_format="pyarrow", num_cpus=cfg.preprocess.task_num_cpus)
    return drawn.union(truth).map_batches(
        ScoreFrames, batch_size=pool.batch_size, batch_format="pyarrow", **actors,
        fn_constructor_kwargs=dict(**settings, output=str(output)))


def _as_ground_truth(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return batch.append_column("row", pa.array([GROUND_TRUTH] * n)).append_column("length", pa.array([0] * n))


def _threads(threads: int, num_gpus: float) -> str:
    import torch

    from storygpt.training import pick_device

    torch.set_num_threads(threads)
    return pick_device(num_gpus)


class DrawStories:
    """The drawing actor: one story (task) in, one row per drawn frame out."""

    def __init__(self, cfg: dict, threads: int, num_gpus: float, char_ldm: str, aligner: str | None, references: dict):
        from storygpt.evaluation.drawing import StoryDrawer

        device = _threads(threads, num_gpus)
        self.drawer = StoryDrawer(StoryConfig.model_validate(cfg), char_ldm, aligner,
                                  {k: np.asarray(v, dtype=np.uint8) for k, v in references.items()}, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from storygpt.data.record_schema import encode_png

        out = []
        for task in batch.to_pylist():
            frames = json.loads(task["frames"])
            images = self.drawer.draw(task["row"], frames, task["seed"])
            out += [{"row": task["row"], "length": task["length"], "story_id": task["story_id"], "id": f["id"],
                     "frame_index": f["frame_index"], "image": encode_png(image), "characters": f["characters"],
                     "setting": f["setting"], "caption": f["caption"],
                     "referential_caption": f["referential_caption"]}  # splits Det. Char-Acc by frame kind
                    for f, image in zip(frames, images)]
        return pa.Table.from_pylist(out)


class ScoreFrames:
    """The scoring actor: frames in, the scorer's outputs out; generated frames saved as PNG."""

    def __init__(self, cfg: dict, threads: int, num_gpus: float, output: str):
        from storygpt.evaluation.scoring import FrameScorer

        cfg = StoryConfig.model_validate(cfg)
        self.scorer = FrameScorer(cfg, _threads(threads, num_gpus))
        self.references = cfg.evaluate.captioner.references
        self.output = Path(output)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from storygpt.data.record_schema import decode_png

        rows = batch.to_pylist()
        images = [decode_png(r.pop("image")) for r in rows]
        truth = [k for k, r in enumerate(rows) if r["row"] == GROUND_TRUTH]
        drawn = [k for k, r in enumerate(rows) if r["row"] != GROUND_TRUTH]
        scored: dict[int, dict] = {}
        for ks, references in ((truth, self.references), (drawn, 0)):  # only real frames get references
            if ks:
                scored.update(zip(ks, self.scorer([images[k] for k in ks], references)))
        for k, (row, image) in enumerate(zip(rows, images)):
            scores = scored[k]
            # a JSON string: one column type whether or not a batch holds ground-truth frames
            scores["reference_captions"] = json.dumps(scores.pop("reference_captions", []))
            row.update(scores, feature=scores["feature"].tolist())
            if row["row"] != GROUND_TRUTH:
                path = self.output / "frames" / row["row"].replace("/", "-") / str(row["length"])
                path.mkdir(parents=True, exist_ok=True)
                from PIL import Image

                Image.fromarray(image).save(path / f"{row['story_id']}_{row['frame_index']:02d}.png")
        return pa.Table.from_pylist(rows)


# ----------------------------------------------------------------------------- helpers
def _track(cfg: StoryConfig, output: Path, results: dict, long_results: dict, ratios: dict) -> str | None:
    from ray_jobs.tracking import Tracker

    tracker = Tracker(cfg, f"evaluate-{output.name}", None, active=True)
    metrics = {f"{row.replace('/', '.')}.{k}": float(v) for row, figures in results.items()
               for k, v in figures.items()}
    metrics |= {f"long.{row.replace('/', '.')}.{n}.{k}": float(v) for row, d in long_results.items()
                for n, figures in d.items() for k, v in figures.items()}
    metrics |= {f"decomposition.{k}": v for k, v in ratios.items() if v is not None}
    tracker.log(metrics, step=0)
    tracker.files([output / "table.md", output / "scores.json", output / "reference_captions.json"],
                  "evaluation")  # frames stay on disk
    tracker.end()
    return tracker.run_id
