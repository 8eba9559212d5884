"""Serving: what batching frames across concurrent stories buys, through the deployed app over HTTP.

The tiny preset's app (StoryAPI → StoryLLM → CharLDM with ``@serve.batch``) on a local Ray, on CPU,
untrained-but-real exports. Stories of ``FRAMES`` captions go to ``/v1/stories/stream`` from
1 client, then from 8 at once (loopback). ``batching_gain`` = frames/s with 8 concurrent stories ÷
frames/s with 1 (target >= 2). Per-frame latency = the gaps between a story's frame events (the
first from the request). Also: the UNet batch sizes the Char-LDM replica saw, and the same
figures with batching off (``max_batch_size=1``) to separate batching from mere concurrency.

A story's frames are sequential (frame i is fed back to the LM before frame i+1), so one story
keeps one Char-LDM replica busy at a time. The tiny preset runs two replicas, one per core of a
2-core machine: 8 stories spread over both and batch within each, so on CPU the gain is
replicas x batching (batching alone gave ~1.1x at 64 px, where a tiny UNet on one core is
compute-bound, and ~1.5x at the tiny preset's 32 px).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 2.0
FRAMES = 4
CAPTIONS = ["Emma waves hello in the forest.", "Later, she sits down with Bruno.", "They eat lunch.",
            "Bruno walks home.", "He opens the door.", "Emma follows him."]


def _story(url: str, seed: int, steps: int) -> list[float]:
    """One story over SSE: seconds from the request to each frame event."""
    import requests

    started, arrivals = time.perf_counter(), []
    body = {"captions": CAPTIONS[:FRAMES], "seed": seed, "steps": steps}
    with requests.post(url + "/v1/stories/stream", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if line == "event: frame":
                arrivals.append(time.perf_counter() - started)
            elif line == "event: error":
                raise RuntimeError("a story failed")
    if len(arrivals) != FRAMES:
        raise RuntimeError(f"expected {FRAMES} frames, got {len(arrivals)}")
    return arrivals


def _load(url: str, clients: int, stories: int, steps: int) -> dict:
    """``stories`` stories per client, ``clients`` at once: frames/s and per-frame latency."""
    def client(c: int) -> list[list[float]]:
        return [_story(url, 1000 * c + s, steps) for s in range(stories)]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        runs = [a for per_client in pool.map(client, range(clients)) for a in per_client]
    seconds = time.perf_counter() - started
    gaps = [b - a for arrivals in runs for a, b in zip([0.0] + arrivals, arrivals)]
    return {"clients": clients, "stories": len(runs), "frames": FRAMES * len(runs), "seconds": round(seconds, 2),
            "frames_per_s": round(FRAMES * len(runs) / seconds, 3),
            "frame_latency_p50_s": round(statistics.median(gaps), 3),
            "frame_latency_p90_s": round(sorted(gaps)[int(0.9 * (len(gaps) - 1))], 3)}


def _batch_sizes(handle, replicas: int) -> dict[int, int]:
    """UNet batch sizes summed over every Char-LDM replica: each call reaches one replica, so ask
    until each has answered."""
    seen: dict[str, dict] = {}
    for _ in range(100 * replicas):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats["batch_sizes"]
        if len(seen) == replicas:
            break
    else:
        raise RuntimeError(f"only {len(seen)} of {replicas} Char-LDM replicas answered")
    total: dict[int, int] = {}
    for sizes in seen.values():
        for size, count in sizes.items():
            total[int(size)] = total.get(int(size), 0) + count
    return total


def _serve(cfg, port: int):
    from ray import serve

    from serving.app import APP_NAME, build_app
    from serving.command import start

    url = start(build_app(cfg), "127.0.0.1", port, ray_init=False)  # a redeploy replaces what changed
    handle = serve.get_deployment_handle("CharLDM", app_name=APP_NAME)
    return url, handle


def run(quick: bool) -> dict:
    import ray
    import torch
    from ray import serve

    from storygpt.aligner.model import StoryAligner
    from storygpt.char_ldm.model import CharLDM
    from storygpt.commands.zoo import build_zoo_quietly
    from storygpt.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"work_dir={work}"])
    build_zoo_quietly(cfg, work / "zoo")
    torch.manual_seed(0)
    CharLDM.from_config(cfg).save_trained(work / "char_ldm" / "char_ldm-1")
    StoryAligner.from_config(cfg).save_trained(work / "aligner" / "aligner-1")
    steps = cfg.char_ldm.sample_steps
    stories = 1 if quick else 2  # per client with 8 clients; the single client runs 2 + stories

    ray.init(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"), include_dashboard=False,
             log_to_driver=False)
    results = {}
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for label, batch in (("batched", cfg.serve.char_ldm.max_batch_size), ("unbatched", 1)):
            run_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
                "char_ldm": cfg.serve.char_ldm.model_copy(update={"max_batch_size": batch})})})
            url, handle = _serve(run_cfg, port)
            _story(url, 0, steps)  # warm-up: first calls build caches, threads, sockets
            one = _load(url, 1, 2 + stories, steps)
            replicas = run_cfg.serve.char_ldm.min_replicas
            before = _batch_sizes(handle, replicas)
            eight = _load(url, 8, stories, steps)
            after = _batch_sizes(handle, replicas)
            sizes = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
            results[label] = {"max_batch_size": batch, "one_story": one, "eight_stories": eight,
                              "unet_batch_sizes_8": sizes,
                              "gain": round(eight["frames_per_s"] / one["frames_per_s"], 3)}
            if quick:
                break
    finally:
        serve.shutdown()
        ray.shutdown()
    batched = results["batched"]
    out = {"benchmark": "serve", "preset": "tiny", "frames_per_story": FRAMES, "steps": steps,
           "resolution": cfg.char_ldm.resolution, "char_ldm_cpus": cfg.serve.char_ldm.num_cpus,
           "char_ldm_replicas": cfg.serve.char_ldm.min_replicas,
           "llm_cpus": cfg.serve.llm.num_cpus, "batch_wait_timeout_s": cfg.serve.char_ldm.batch_wait_timeout_s,
           "frames_per_s_1": batched["one_story"]["frames_per_s"],
           "frames_per_s_8": batched["eight_stories"]["frames_per_s"],
           "frame_latency_p50_s_1": batched["one_story"]["frame_latency_p50_s"],
           "frame_latency_p50_s_8": batched["eight_stories"]["frame_latency_p50_s"],
           "batching_gain": batched["gain"], "target_batching_gain": TARGET, "runs": results}
    if "unbatched" in results:
        out["concurrency_only_gain"] = results["unbatched"]["gain"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer stories, batched run only")
    args = p.parse_args(argv)
    import storygpt  # noqa: F401  (before transformers)
    from benchmarks.common import emit

    result = run(args.quick)
    for label, r in result["runs"].items():
        print(f"{label}: 1 story {r['one_story']['frames_per_s']} frames/s, 8 stories "
              f"{r['eight_stories']['frames_per_s']} frames/s (gain {r['gain']}), UNet batches {r['unet_batch_sizes_8']}",
              flush=True)
    emit(result)


if __name__ == "__main__":
    main()
