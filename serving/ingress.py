"""The FastAPI ingress: HTTP API (OpenAPI docs at ``/docs``), the web page at ``/``.

Every request is checked here (:mod:`serving.api`) before a model deployment sees it; every
refusal is a 4xx whose JSON ``detail`` names the field, and nothing a client sends takes the
server down. With an API key set (``serve.api_key`` or ``$STORYGPT_API_KEY``) every ``/v1/stories``
call needs the header ``X-API-Key``; ``/``, ``/healthz``, ``/v1/info`` and the docs stay open
(they reveal no model output).
"""

import hmac
import json
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.api import (ContinueRequest, RequestError, StoryJob, StoryRequest, check_continuation, check_story,
                         describe_errors, error_body)

API_KEY_HEADER = "X-API-Key"
PROTECTED_PREFIX = "/v1/stories"
WEB_PAGE = Path(__file__).with_name("web") / "index.html"

app = FastAPI(
    title="StoryGPT-V",
    version="1.0",
    summary="Story visualisation: captions in (names and pronouns), consistent frames out.",
    description="Frame i is drawn from the aligner's reading of every earlier generated frame and "
                "caption (it resolves he/she/they), by the character-aware Char-LDM. "
                f"With an API key configured, `/v1/stories*` needs the `{API_KEY_HEADER}` header.",
)
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when the server has a key")



class _Settings:
    """What the middleware enforces, set by the replica's constructor (one ingress per process).
    A class, so the app Serve pickles at decoration time and the replica share it (by reference)."""

    api_key: str | None = None
    max_body_bytes: int | None = None


def _event(name: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _json_error(status: int, errors: list[tuple[str, str]]) -> JSONResponse:
    return JSONResponse(error_body(errors), status_code=status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, body = describe_errors(list(exc.errors()))
    return JSONResponse(body, status_code=status)


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


@app.middleware("http")
async def _guard(request: Request, call_next):
    """API key and body size, before anything reads the body."""
    if PROTECTED_PREFIX in request.url.path:  # under any route prefix
        key = _Settings.api_key
        if key and not hmac.compare_digest(request.headers.get(API_KEY_HEADER, "").encode(), key.encode()):
            return _json_error(401, [(API_KEY_HEADER, "missing or wrong API key (header X-API-Key)")])
        limit, length = _Settings.max_body_bytes, request.headers.get("content-length")
        if limit and length and length.isdigit() and int(length) > limit:
            return _json_error(413, [("body", f"request body larger than {limit} bytes")])
    return await call_next(request)


@serve.deployment(name="StoryAPI")
@serve.ingress(app)
class StoryAPI:
    def __init__(self, llm: DeploymentHandle, cfg: dict, api_key: str | None = None):
        from storygpt.config import StoryConfig
        from storygpt.data.characters import get_table

        config = StoryConfig.model_validate(cfg)
        self.llm, self.limits = llm, config.serve.limits
        self.table = get_table(config.data.dataset)
        self.defaults = (config.char_ldm.sample_steps, config.char_ldm.guidance_scale)
        self.resolution = config.char_ldm.resolution
        limits = self.limits
        _Settings.api_key = api_key or config.serve.api_key or os.environ.get("STORYGPT_API_KEY") or None
        # every reference image at its largest, base64-inflated, plus the captions and JSON around them
        _Settings.max_body_bytes = (limits.max_reference_images * (4 * limits.max_image_bytes // 3 + 64)
                                       + limits.max_frames * (limits.max_caption_chars * 4 + 16) + 65536)

    # ------------------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(WEB_PAGE.read_text())

    @app.get("/healthz", summary="liveness: the ingress answers (open even with an API key)")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", summary="limits, defaults and character names a request may use")
    def info(self) -> dict:
        return {"limits": self.limits.model_dump(), "characters": self.table.names,
                "defaults": {"steps": self.defaults[0], "guidance": self.defaults[1], "seed": 0},
                "resolution": self.resolution, "api_key_required": bool(_Settings.api_key)}

    # ------------------------------------------------------------------------- stories
    @app.post("/v1/stories", summary="draw a story: one frame per caption",
              dependencies=[Security(api_key_header)])
    async def stories(self, story: StoryRequest) -> dict:
        job = check_story(story, self.limits, self.table, self.defaults)
        return await self._collect(job)

    @app.post("/v1/stories/continue", summary="draw the captions, then let the LM write and draw k more",
              dependencies=[Security(api_key_header)])
    async def continue_story(self, story: ContinueRequest) -> dict:
        job = check_continuation(story, self.limits, self.defaults)
        return await self._collect(job)

    @app.post("/v1/stories/stream", summary="as /v1/stories, as server-sent events: `frame` per frame, then `done`",
              dependencies=[Security(api_key_header)], response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def stream(self, story: StoryRequest) -> StreamingResponse:
        job = check_story(story, self.limits, self.table, self.defaults)
        return StreamingResponse(self._events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(self, job: StoryJob) -> dict:
        started = time.perf_counter()
        frames = await self.llm.generate.remote(job)
        return {"frames": frames, **self._summary(job, started)}

    async def _events(self, job: StoryJob):
        started, count = time.perf_counter(), 0
        try:
            async for frame in self.llm.options(stream=True).stream.remote(job):
                count += 1
                yield _event("frame", frame)
        except Exception as err:  # the stream has started (200 sent): report in band
            yield _event("error", {"detail": f"generation failed: {type(err).__name__}: {err}"})
            return
        yield _event("done", {"count": count, **self._summary(job, started)})

    def _summary(self, job: StoryJob, started: float) -> dict:
        return {"seed": job.seed, "steps": job.steps, "guidance": job.guidance,
                "seconds": round(time.perf_counter() - started, 3)}

