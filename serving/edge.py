"""The ingress's edge: a pure ASGI middleware in front of FastAPI (:class:`EdgeGuard`).

For every response: ``nosniff``, ``no-referrer`` and ``DENY`` framing headers, and HEAD answered as
the GET without its body. Under ``/v1/stories``: Ray's header that switches off cancellation
(400), the API key (401), a chunked body (411: its size is unknown until read) and a declared
``Content-Length`` over the cap (413) before a byte of body is read; then the body itself, counted
as it arrives: over the cap → 413 at once, not complete within ``serve.limits.body_timeout_s`` →
408. The route then gets the body already read (it is bounded).

Plain ASGI on purpose: ``@app.middleware("http")`` hands over a ``Request`` whose body nothing
bounds, and an exception raised in ``receive`` under FastAPI turns into a generic 400.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets

from serving.api import error_body

API_KEY_HEADER = "X-API-Key"
# Ray Serve's proxy stops watching for a client that went away when a request carries this
# header: its story would draw to the end for nobody. Such requests are refused.
DISCONNECT_DISABLED_HEADER = "x-request-disconnect-disabled"
PROTECTED_PREFIX = "/v1/stories"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

logger = logging.getLogger("ray.serve")  # Serve routes it to the replica's log file


class Settings:
    """What the middleware enforces, set by the replica's constructor (one ingress per process).
    A class, so the app Serve pickles at decoration time and the replica share it (by reference)."""

    api_key: str | None = None
    max_body_bytes: int | None = None
    body_timeout_s: float = 10.0


class _Refused(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def internal_error(where: str, exc: BaseException) -> dict:
    """The body for an unexpected failure: a generic message and a short id. The exception's text
    (a RayTaskError's carries the remote traceback, node IP and PID) only goes to the log, under that id."""
    error_id = secrets.token_hex(4)
    logger.error("internal error %s in %s", error_id, where, exc_info=(type(exc), exc, exc.__traceback__))
    body = error_body([("server", f"internal error (error id {error_id}); the details are in the server log")])
    return {**body, "error_id": error_id}


def page_csp(html: str) -> str:
    """The web page's CSP: its own inline script and style (by hash), same-origin fetches, data: images
    (the frames), nothing else, and no framing."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", html, re.S | re.I)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in blocks if b.strip()) or "'none'"

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


async def _refuse(send, refusal: _Refused) -> None:
    data = json.dumps(error_body([(refusal.field, refusal.message)])).encode()
    # close: the unread rest of the body must not be taken for the next request on this connection
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


class EdgeGuard:
    """The ASGI middleware (``app.add_middleware(EdgeGuard)``); see the module's docstring."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = scope["method"] == "HEAD"
        if head:  # HEAD is the GET without its body (FastAPI routes GET only)
            scope = {**scope, "method": "GET"}
        send = _headed(send, head)
        if PROTECTED_PREFIX not in scope["path"]:  # under any route prefix
            return await self.app(scope, receive, send)
        try:
            _check_headers(scope)
            body = await _read_body(receive)
        except _Refused as refusal:
            return await _refuse(send, refusal)
        if body is None:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: the disconnect a streaming response listens for
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _headed(send, head: bool):
    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {k.lower() for k, _ in headers}
            message = {**message, "headers": headers + [h for h in _RAW_HEADERS if h[0] not in names]}
        elif head and message["type"] == "http.response.body":
            if message.get("more_body"):
                return
            message = {**message, "body": b""}
        await send(message)

    return wrapped


def _check_headers(scope) -> None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    key = Settings.api_key
    if key and not hmac.compare_digest(headers.get(API_KEY_HEADER.lower(), "").encode(), key.encode()):
        raise _Refused(401, API_KEY_HEADER, "missing or wrong API key (header X-API-Key)")
    if DISCONNECT_DISABLED_HEADER in headers:
        raise _Refused(400, DISCONNECT_DISABLED_HEADER, "cancellation cannot be switched off: a story whose client "
                                                        "goes away stops drawing; send the request without this header")
    limit, length = Settings.max_body_bytes, headers.get("content-length", "")
    if "transfer-encoding" in headers and not length:
        # A chunked body's size is known only once read, and Ray Serve's proxy hands a replica
        # all it has buffered at each read: a 100 MB chunked upload, refused at the cap, still
        # grew the ingress by 263 MiB. A declared length is checked before any byte is read.
        raise _Refused(411, "content-length", "send the body with a Content-Length header; "
                                              "chunked request bodies are not accepted")
    if limit and length.isdigit() and int(length) > limit:
        raise _Refused(413, "body", f"request body larger than {limit} bytes")


async def _read_body(receive) -> bytes | None:
    """The whole body, counted as ``receive`` yields it (chunked or not), within the deadline;
    None if the client disconnected."""
    limit, timeout = Settings.max_body_bytes, Settings.body_timeout_s
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if limit and size > limit:  # stop here: the rest is never read
                    raise _Refused(413, "body", f"request body larger than {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise _Refused(408, "body", f"request body not received within {timeout:g} s") from None
