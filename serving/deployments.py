"""The two model deployments. Thin: they load the library's models and call them.

- :class:`CharLDMDeployment` draws frames. Requests from every concurrent story meet in
  ``@serve.batch``: one batch = one :meth:`CharLDMPipeline.sample` call, a single UNet pass per
  denoising step over the stacked conditionings, each row with its own seed and guidance (a
  batched frame equals the one drawn alone: same starting noise, per-row maths).
- :class:`StoryLLMDeployment` runs the aligner's KV-cached story loop
  (:class:`~storygpt.aligner.generation.StoryGenerator`, one per request) and asks the Char-LDM
  deployment for each frame through its handle. The loop is synchronous torch code, so each story
  runs on a worker thread; its ``draw`` hops back onto the replica's event loop to await the handle.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

import storygpt  # noqa: F401  (the torchvision shim, before transformers)
from serving.api import StoryJob


def _setup_torch(num_cpus: float, num_gpus: float) -> str:
    import torch

    from storygpt.training import pick_device

    torch.set_num_threads(max(1, math.ceil(num_cpus)))  # what the replica reserved, not the machine
    return pick_device(num_gpus)


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- Char-LDM
@serve.deployment(name="CharLDM")
class CharLDMDeployment:
    def __init__(self, cfg: dict, char_ldm_dir: str):
        from storygpt.char_ldm.pipeline import CharLDMPipeline
        from storygpt.config import StoryConfig

        config = StoryConfig.model_validate(cfg)
        replica = config.serve.char_ldm
        device = _setup_torch(replica.num_cpus, replica.num_gpus)
        self.pipeline = CharLDMPipeline.from_config(config, char_ldm_dir, device=device)
        self._draw_batch.set_max_batch_size(replica.max_batch_size)
        self._draw_batch.set_batch_wait_timeout_s(replica.batch_wait_timeout_s)
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="char-ldm")  # one model user at a time
        self.batch_sizes: Counter[int] = Counter()  # UNet batch sizes seen (rows per sample call)

    async def encode(self, caption: str, characters: list[str], references: dict[str, np.ndarray]):
        """(1, 77, d): the caption's fused conditioning with the named characters' reference images."""
        return await asyncio.get_running_loop().run_in_executor(
            self._model, lambda: self.pipeline.encode([caption], [characters], references).cpu())

    async def draw(self, conditioning, seed: int, steps: int, guidance: float, caption: str) -> np.ndarray:
        """One (R, R, 3) uint8 frame from a (1, L, d) conditioning, batched with concurrent calls
        (``caption``: the text of the delayed-conditioning steps, when the preset has them)."""
        return await self._draw_batch((conditioning, seed, steps, guidance, caption))

    def stats(self) -> dict:
        """This replica's UNet batch sizes so far (a handle call reaches one replica of several)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "batch_sizes": dict(sorted(self.batch_sizes.items()))}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # replaced from config in __init__
    async def _draw_batch(self, requests: list[tuple]) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray | None] = [None] * len(requests)
        by_steps: dict[int, list[int]] = {}
        for i, (_, _, steps, _, _) in enumerate(requests):
            by_steps.setdefault(steps, []).append(i)
        loop = asyncio.get_running_loop()
        for steps, rows in by_steps.items():  # a sampler schedule is shared by the rows of one call
            conditioning = torch.cat([requests[i][0] for i in rows])
            seeds = [requests[i][1] for i in rows]
            guidance = [requests[i][3] for i in rows]
            captions = [requests[i][4] for i in rows]
            self.batch_sizes[len(rows)] += 1
            frames = await loop.run_in_executor(
                self._model, lambda c=conditioning, s=seeds, g=guidance, n=steps, p=captions: self.pipeline.sample(
                    c, s, n, g, plain_captions=p))
            for i, frame in zip(rows, frames):
                out[i] = frame
        return out


# ----------------------------------------------------------------------------- the LM
@serve.deployment(name="StoryLLM")
class StoryLLMDeployment:
    def __init__(self, cfg: dict, aligner_dir: str, char_ldm: DeploymentHandle):
        from storygpt.aligner.model import StoryAligner
        from storygpt.config import StoryConfig
        from storygpt.data.characters import get_table

        self.cfg = StoryConfig.model_validate(cfg)
        replica = self.cfg.serve.llm
        device = _setup_torch(replica.num_cpus, replica.num_gpus)
        self.aligner = StoryAligner.from_config(self.cfg, aligner_dir).to(device).eval()
        self.table = get_table(self.cfg.data.dataset)
        self.char_ldm = char_ldm
        # one thread per story in flight: a story's loop blocks while its frame is drawn
        self._stories = ThreadPoolExecutor(max_workers=replica.max_ongoing_requests, thread_name_prefix="story")

    async def generate(self, job: StoryJob) -> list[dict]:
        return [frame async for frame in self.stream(job)]

    async def stream(self, job: StoryJob) -> AsyncIterator[dict]:
        """Each frame as ``{index, caption, written, image: base64 PNG}``, as soon as it is drawn."""
        from storygpt.pipeline import StoryGPTPipeline

        loop = asyncio.get_running_loop()
        story = StoryGPTPipeline(self.cfg, self.aligner, draw=self._drawer(job, loop))
        if job.k:
            frames = story.continue_story(job.captions, job.k, seed=job.seed)
        else:
            frames = story.stream(job.captions, seed=job.seed)
        try:
            while (frame := await loop.run_in_executor(self._stories, next, frames, None)) is not None:
                image = await loop.run_in_executor(self._stories, png_base64, frame.image)
                yield {"index": frame.index, "caption": frame.caption, "written": frame.written, "image": image}
        finally:  # a client that went away: the story stops after the frame in hand
            try:
                frames.close()
            except ValueError:  # still running on its thread (cancelled mid-frame): it ends with that frame
                pass

    def _drawer(self, job: StoryJob, loop: asyncio.AbstractEventLoop):
        """The story's ``draw(conditioning, seed, caption)`` on the Char-LDM deployment, called on a
        story thread, in frame order; the reference policy is the library's
        (:func:`storygpt.pipeline.referenced`)."""
        from storygpt.pipeline import referenced

        async def draw(conditioning, seed: int, text: str) -> np.ndarray:
            named = referenced(text, job.references, self.table)
            if named:  # the Char-LDM's own fused conditioning: what the aligner imitates
                conditioning = await self.char_ldm.encode.remote(
                    text, named, {n: job.references[n] for n in named})
            frame = await self.char_ldm.draw.remote(conditioning.cpu(), seed, job.steps, job.guidance, text)
            return np.array(frame)  # writable (what Ray hands back is read-only)

        return lambda conditioning, seed, text: asyncio.run_coroutine_threadsafe(
            draw(conditioning, seed, text), loop).result()
