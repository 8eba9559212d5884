"""The FastAPI ingress: HTTP API (OpenAPI docs at ``/docs``), the web page at ``/``.

Every request is checked here (:mod:`serving.api`) before a model deployment sees it; every
refusal is a 4xx whose JSON ``detail`` names the field, and nothing a client sends takes the
server down. With an API key set (``serve.api_key`` or ``$STORYGPT_API_KEY``) every ``/v1/stories``
call needs the header ``X-API-Key``; ``/``, ``/healthz``, ``/v1/info`` and the docs stay open
(they reveal no model output). Key, body cap and body deadline, security headers and HEAD:
:mod:`serving.edge`. An unexpected failure answers a generic 500 with an error id; the detail
goes to the replica's log under that id.
"""

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.api import (ContinueRequest, RequestError, StoryJob, StoryRequest, check_continuation, check_story,
                         describe_errors, error_body)
from serving.contract import contract
from serving.edge import API_KEY_HEADER, SECURITY_HEADERS, EdgeGuard, Settings, internal_error, page_csp

WEB_PAGE = Path(__file__).with_name("web") / "index.html"
CHECK_THREADS = 2
RETRY_AFTER_S = 2  # a busy server's hint: about one tiny story's drawing time

app = FastAPI(
    redirect_slashes=False,  # its redirect copies the client's Host header into Location: a 404 instead
    title="StoryGPT-V",
    version="1.0",
    summary="Story visualisation: captions in (names and pronouns), consistent frames out.",
    description="Frame i is drawn from the aligner's reading of every earlier generated frame and "
                "caption (it resolves he/she/they), by the character-aware Char-LDM. "
                f"With an API key configured, `/v1/stories*` needs the `{API_KEY_HEADER}` header.",
)
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when the server has a key")
app.add_middleware(EdgeGuard)  # key, body cap and deadline before the route reads a byte; headers; HEAD


def _event(name: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, body = describe_errors(list(exc.errors()))
    return JSONResponse(body, status_code=status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own refusals (a body that is not UTF-8 JSON, an unknown path or
    method) in the one documented error shape; their headers (``Allow`` on a 405) kept."""
    field = {400: "body", 404: "path", 405: "method"}.get(exc.status_code, "request")
    return JSONResponse(error_body([(field, str(exc.detail))]), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    # sent from outside every middleware (Starlette's ServerErrorMiddleware): the headers come with it
    return JSONResponse(internal_error(f"{request.method} {request.url.path}", exc), status_code=500,
                        headers=SECURITY_HEADERS)


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
        # stories drawn at once: what the LM deployments hold. The ingress itself holds many more
        # requests (serve.limits.max_connections), so slow uploads and health checks never wait
        # behind stories, and a story over this budget is a 503 at once, not a hidden queue.
        self.story_slots = config.serve.llm.max_ongoing_requests * config.serve.llm.max_replicas
        self.stories_in_flight = 0
        # the checks of CHECK_THREADS requests at a time: what decoding reference images may take of the CPU
        self.checks = ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="checks")
        Settings.api_key = api_key or config.serve.api_key or os.environ.get("STORYGPT_API_KEY") or None
        Settings.body_timeout_s = limits.body_timeout_s
        # the OpenAPI document at /openapi.json: the limits, statuses and security served here
        app.openapi_schema = None  # FastAPI caches the document: build it from the plain one
        app.openapi_schema = contract(app.openapi(), limits, self.table.names, bool(Settings.api_key))
        # every reference image at its largest, base64-inflated, plus the captions and JSON around them
        Settings.max_body_bytes = (limits.max_reference_images * (4 * limits.max_image_bytes // 3 + 64)
                                  + limits.max_frames * (limits.max_caption_chars * 4 + 16) + 65536)

    # ------------------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        html = WEB_PAGE.read_text()
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html)})

    @app.get("/healthz", summary="liveness: the ingress answers (open even with an API key)")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", summary="limits, defaults and character names a request may use")
    def info(self) -> dict:
        return {"limits": self.limits.model_dump(), "characters": self.table.names,
                "defaults": {"steps": self.defaults[0], "guidance": self.defaults[1], "seed": 0},
                "resolution": self.resolution, "api_key_required": bool(Settings.api_key),
                "max_body_bytes": Settings.max_body_bytes}

    # ------------------------------------------------------------------------- stories
    @app.post("/v1/stories", summary="draw a story: one frame per caption",
              dependencies=[Security(api_key_header)])
    async def stories(self, story: StoryRequest) -> dict:
        job = await self._checked(check_story, story, self.limits, self.table, self.defaults)
        return await self._collect(job)

    @app.post("/v1/stories/continue", summary="draw the captions, then let the LM write and draw k more",
              dependencies=[Security(api_key_header)])
    async def continue_story(self, story: ContinueRequest) -> dict:
        job = await self._checked(check_continuation, story, self.limits, self.defaults)
        return await self._collect(job)

    @app.post("/v1/stories/stream", summary="as /v1/stories, as server-sent events: `frame` per frame, then `done`",
              dependencies=[Security(api_key_header)], response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def stream(self, story: StoryRequest) -> StreamingResponse:
        job = await self._checked(check_story, story, self.limits, self.table, self.defaults)
        self._check_a_slot_is_free()  # taken when the stream starts: a stream never started holds none
        return StreamingResponse(self._events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _checked(self, check, *args) -> StoryJob:
        """A request's checks (PNG decoding included) on the checking threads, not the event loop:
        /healthz and the other requests are served while an expensive one is read."""
        return await asyncio.get_running_loop().run_in_executor(self.checks, check, *args)

    def _check_a_slot_is_free(self) -> None:
        if self.stories_in_flight >= self.story_slots:
            raise RequestError("server", f"busy: {self.story_slots} stories are being drawn, the most this server "
                                         "draws at once; retry shortly", status=503, retry_after_s=RETRY_AFTER_S)

    async def _collect(self, job: StoryJob) -> dict:
        self._check_a_slot_is_free()
        started = time.perf_counter()
        self.stories_in_flight += 1  # the event loop's thread only: no lock needed
        try:
            frames = await self.llm.generate.remote(job)
        finally:
            self.stories_in_flight -= 1
        return {"frames": frames, **self._summary(job, started)}

    async def _events(self, job: StoryJob):
        started, count = time.perf_counter(), 0
        self.stories_in_flight += 1
        try:
            async for frame in self.llm.options(stream=True).stream.remote(job):
                count += 1
                yield _event("frame", frame)
        except Exception as err:  # the stream has started (200 sent): report in band
            yield _event("error", internal_error("stream", err))
            return
        finally:
            self.stories_in_flight -= 1
        yield _event("done", {"count": count, **self._summary(job, started)})

    def _summary(self, job: StoryJob, started: float) -> dict:
        return {"seed": job.seed, "steps": job.steps, "guidance": job.guidance,
                "seconds": round(time.perf_counter() - started, 3)}

