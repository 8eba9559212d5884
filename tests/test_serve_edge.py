"""The ingress's edge (serving/edge.py) over real HTTP on 127.0.0.1, on test_serve's running app:
the body cap whatever the transfer encoding, the body deadline, HEAD, security headers and the
page's CSP, and no internal detail in a 500 or a stream's error event."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from test_serve import BODY_TIMEOUT_S, STORY, post, server  # noqa: F401  (the module's running app)

SECURITY = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}
MIB = 1 << 20


def _head(path: str, **headers: str) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items())]
    return "\r\n".join(lines) + "\r\n\r\n"


def _exchange(url: str, head: str, parts=(), timeout: float = 60) -> tuple[int, dict, float]:
    """Send ``head``, then each of ``parts`` until the server answers or stops reading; the status,
    the JSON body and the seconds from the head to the answer."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        started = time.perf_counter()
        sock.sendall(head.encode())
        try:
            for part in parts:
                if select.select([sock], [], [], 0)[0]:  # answered (or closed): send no more
                    break
                sock.sendall(part)
        except OSError:  # closed after answering: the answer is still there to read
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), time.perf_counter() - started


def _chunks(total: int, size: int = MIB):
    """A chunked JSON-ish body of ``total`` bytes, never terminated (no zero-length chunk)."""
    for _ in range(0, total, size):
        yield b"%x\r\n" % size + b" " * size + b"\r\n"


def _trickle(seconds: float, every: float = 0.5):
    for _ in range(int(seconds / every)):
        time.sleep(every)
        yield b" "


def _replica_rss(name: str) -> int:
    return sum(p.memory_info().rss for p in psutil.process_iter(["name"]) if p.info["name"].endswith(name))


@pytest.mark.slow
def test_a_chunked_body_is_411_and_a_declared_one_over_the_cap_413_before_any_byte_is_read(server):
    """A chunked body's size is known only once read, and Serve's proxy hands the ingress all it
    buffered at each read: a 100 MB chunked upload refused at the cap grew the ingress by 263 MiB.
    Now it is refused on its headers (411), as a declared length over the cap is (413); neither
    the ingress nor the proxy holds the body."""
    import requests

    url, _ = server
    cap = requests.get(url + "/v1/info", timeout=10).json()["max_body_bytes"]
    assert cap and cap < 100 * MIB
    ingress, proxy = _replica_rss("ServeReplica:storygpt:StoryAPI"), _replica_rss("ProxyActor")
    peak = [ingress, proxy]
    with ThreadPoolExecutor(max_workers=1) as pool:  # 100 MB, never terminated
        sending = pool.submit(_exchange, url, _head("/v1/stories", Transfer_Encoding="chunked"), _chunks(100 * MIB))
        while not sending.done():
            peak = [max(peak[0], _replica_rss("ServeReplica:storygpt:StoryAPI")), max(peak[1], _replica_rss("ProxyActor"))]
            time.sleep(0.01)
        status, body, seconds = sending.result()
    assert status == 411 and body["field"] == "content-length" and seconds < BODY_TIMEOUT_S / 2, (body, seconds)
    growth = [(peak[0] - ingress) / MIB, (peak[1] - proxy) / MIB]
    print(f"100 MB chunked upload: 411 in {seconds:.3f} s; RSS growth: ingress {growth[0]:+.0f} MiB, "
          f"proxy {growth[1]:+.0f} MiB (body cap {cap / MIB:.0f} MiB)")
    assert growth[0] < 32 and growth[1] < 32, growth
    # a declared length over the cap: refused on the header, before any body (no deadline to wait for)
    status, body, seconds = _exchange(url, _head("/v1/stories", Content_Length=str(100 * MIB)), _chunks(4 * MIB))
    assert status == 413 and body["field"] == "body" and str(cap) in body["detail"], body
    assert seconds < BODY_TIMEOUT_S / 2, seconds
    # a body that says its length and is under the cap is read whole and served
    r = post(url, "/v1/stories", {"captions": STORY[:2]})
    assert r.status_code == 200 and len(r.json()["frames"]) == 2


@pytest.mark.slow
def test_a_stalled_or_trickled_body_is_408_within_the_deadline(server):
    import requests

    url, _ = server
    head = _head("/v1/stories", Content_Length="1000")
    with ThreadPoolExecutor(max_workers=2) as pool:
        stalled = pool.submit(_exchange, url, head + '{"captions"', ())  # 10 of 1000 bytes, then nothing
        trickled = pool.submit(_exchange, url, head, _trickle(BODY_TIMEOUT_S + 10))  # a byte every 0.5 s
        time.sleep(1)
        started = time.perf_counter()
        assert requests.get(url + "/healthz", timeout=10).status_code == 200  # meanwhile, served at once
        assert time.perf_counter() - started < 2
        results = [stalled.result(), trickled.result()]
    for status, body, seconds in results:
        assert status == 408 and body["field"] == "body", body
        assert f"within {BODY_TIMEOUT_S} s" in body["detail"]
        # a deadline for the whole body: the trickle, never idle for long, is cut off at it too
        assert 0.9 * BODY_TIMEOUT_S <= seconds < BODY_TIMEOUT_S + 5, seconds
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}


SLOW_UPLOADS = 80  # more than the 64 requests the ingress used to hold in all


@pytest.mark.slow
def test_slow_uploads_starve_neither_health_checks_nor_good_stories(server):
    """80 clients that send headers and 10 of 1000 declared bytes, then nothing: each holds an
    ingress slot until the body deadline, and the ingress holds far more than the stories it
    draws, so /healthz and a good story are served meanwhile; every slow one then gets its 408.
    80 more never finish their headers: those stay with Serve's proxy (it has no header deadline),
    which takes no ingress slot, and serve everyone else all the same."""
    import requests

    url, _ = server
    address = urlsplit(url)
    head = _head("/v1/stories", Content_Length="1000") + '{"captions"'
    slow, headers_only = [], []
    for _ in range(SLOW_UPLOADS):
        sock = socket.create_connection((address.hostname, address.port), timeout=BODY_TIMEOUT_S + 30)
        sock.sendall(head.encode())
        slow.append(sock)
    for _ in range(SLOW_UPLOADS):  # and as many that never finish their headers: held by Serve's proxy alone
        sock = socket.create_connection((address.hostname, address.port), timeout=BODY_TIMEOUT_S + 30)
        sock.sendall(b"POST /v1/stories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app")
        headers_only.append(sock)
    opened = time.perf_counter()
    try:
        time.sleep(1)  # all of them in the ingress, reading
        started = time.perf_counter()
        assert requests.get(url + "/healthz", timeout=10).status_code == 200
        health_s = time.perf_counter() - started
        started = time.perf_counter()
        r = post(url, "/v1/stories", {"captions": STORY[:1], "steps": 1})
        story_s = time.perf_counter() - started
        assert r.status_code == 200 and len(r.json()["frames"]) == 1, r.text
        print(f"under {SLOW_UPLOADS} slow uploads: /healthz {health_s:.3f} s, a 1-frame story {story_s:.3f} s")
        assert health_s < 2 and time.perf_counter() - opened < BODY_TIMEOUT_S  # answered before any 408 freed a slot
        for sock in slow:
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 408 and json.loads(response.read())["field"] == "body"
        assert requests.get(url + "/healthz", timeout=10).status_code == 200  # the half-headed ones still open
    finally:
        for sock in slow + headers_only:
            sock.close()
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}


@pytest.mark.slow
def test_stories_over_the_budget_are_503_with_retry_after_and_the_slot_comes_back(server):
    """The ingress draws at most what the LM deployments hold (here 1 story, behind an LM that
    takes 3 s); one more story is a 503 at once, in the error shape, with Retry-After, and
    streams count too. Deployed beside the app under /busy."""
    import requests
    from ray import serve

    from serving.ingress import StoryAPI

    url, cfg = server

    @serve.deployment(name="SlowLLM", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4)
    class SlowLLM:
        async def generate(self, job):
            import asyncio

            await asyncio.sleep(3)
            return []

        async def stream(self, job):
            import asyncio

            await asyncio.sleep(3)
            yield {"index": 0}

    one_slot = cfg.resolved().model_dump(mode="json")
    one_slot["serve"]["llm"].update(max_ongoing_requests=1, min_replicas=1, max_replicas=1, target_ongoing_requests=1)
    api = StoryAPI.options(ray_actor_options={"num_cpus": 0}).bind(SlowLLM.bind(), one_slot)
    serve.run(api, name="edge-busy", route_prefix="/busy")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            drawing = pool.submit(post, url, "/busy/v1/stories", {"captions": STORY[:1]})
            time.sleep(1)
            started = time.perf_counter()
            busy = post(url, "/busy/v1/stories", {"captions": STORY[:1]})
            assert busy.status_code == 503 and time.perf_counter() - started < 1.5
            assert busy.json()["field"] == "server" and "busy" in busy.json()["detail"]
            assert int(busy.headers["Retry-After"]) >= 1
            assert requests.get(url + "/busy/healthz", timeout=5).status_code == 200  # not a story
            assert drawing.result().status_code == 200
        with requests.post(url + "/busy/v1/stories/stream", json={"captions": STORY[:1]}, stream=True,
                           timeout=30) as streamed:  # the freed slot, now held by a stream
            assert streamed.status_code == 200
            time.sleep(0.5)  # the slot is taken as the stream's body starts, just after its headers
            assert post(url, "/busy/v1/stories", {"captions": STORY[:1]}).status_code == 503
            assert "event: frame" in streamed.text
        assert post(url, "/busy/v1/stories", {"captions": STORY[:1]}).status_code == 200  # the stream gave it back
    finally:
        serve.delete("edge-busy")


def _png_of_text_chunks(size: int) -> bytes:
    """A valid 8x8 PNG whose ``size`` bytes are nearly all tiny tEXt chunks ahead of the image:
    legal, within the byte cap, and slow for PIL, which parses every chunk in Python."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    tail = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + b"\x80" * 24 for _ in range(8)))) + chunk(b"IEND", b"")
    text = chunk(b"tEXt", b"a\x00b")
    return head + text * ((size - len(head) - len(tail)) // len(text)) + tail


def test_a_png_with_too_many_chunks_is_refused_before_pil_parses_them():
    from serving.api import MAX_PNG_CHUNKS, RequestError, decode_png
    from storygpt.config import ServeLimits

    limits = ServeLimits(max_frames=1, max_caption_chars=1, max_steps=1, max_guidance=1, max_reference_images=1,
                         max_image_bytes=4_000_000, max_image_side=64)
    bulky = _png_of_text_chunks(3_000_000)
    started = time.perf_counter()
    with pytest.raises(RequestError, match=f"more than {MAX_PNG_CHUNKS} chunks") as err:
        decode_png(base64.b64encode(bulky).decode(), "reference_images['Emma']", limits)
    assert err.value.field == "reference_images['Emma']" and time.perf_counter() - started < 0.5
    few = _png_of_text_chunks(600)  # a handful of metadata chunks: an ordinary PNG
    assert decode_png(base64.b64encode(few).decode(), "x", limits).shape == (8, 8, 3)


@pytest.mark.slow
def test_checking_an_expensive_request_does_not_stall_the_event_loop(server):
    """The request checks run on their own threads: while a legal 28 MB request of seven
    chunk-stuffed PNGs is read and refused, /healthz keeps answering at once."""
    import requests

    url, cfg = server
    names = cfg.resolved().serve.limits.max_reference_images
    image = base64.b64encode(_png_of_text_chunks(cfg.serve.limits.max_image_bytes - 1000)).decode()
    characters = ["Ada", "Bruno", "Cleo", "Dario", "Emma", "Felix", "Gus"][:min(7, names)]
    body = {"captions": [STORY[0]], "steps": 1, "reference_images": {n: image for n in characters}}
    with ThreadPoolExecutor(max_workers=1) as pool:
        heavy = pool.submit(post, url, "/v1/stories", body)
        latencies = []
        while not heavy.done():
            started = time.perf_counter()
            assert requests.get(url + "/healthz", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
        answer = heavy.result()
    print(f"/healthz during the heavy request: {len(latencies)} probes, max {max(latencies, default=0):.3f} s")
    assert answer.status_code == 422 and answer.json()["field"] == f"reference_images[{characters[0]!r}]", answer.text
    assert latencies and max(latencies) < 1.0


@pytest.mark.slow
def test_odd_requests_get_the_documented_error_shape_and_no_redirect(server):
    """Invalid UTF-8, JSON nested past the parser's depth, a trailing slash with a foreign Host:
    each a 4xx in the one error shape; no Location header built from the client's Host."""
    import requests

    url, _ = server
    for raw, status in ((b'{"captions": ["\xff\xfe"]}', 400), (b"[" * 100_000 + b"]" * 100_000, 400)):
        r = requests.post(url + "/v1/stories", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status and r.json()["field"] == "body" and set(r.json()) >= {"detail", "errors"}, r.text
    r = requests.get(url + "/healthz/", headers={"Host": "evil.example"}, allow_redirects=False, timeout=10)
    assert r.status_code == 404 and "location" not in r.headers and r.json()["field"] == "path", (r.status_code, r.text)
    r = requests.delete(url + "/v1/stories", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["field"] == "method"


def _cpu_seconds(name: str) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in psutil.process_iter(["name"]) if p.info["name"].endswith(name))


@pytest.mark.slow
def test_a_dropped_stream_stops_drawing(server):
    """A 12-frame, 50-step story (18 s of drawing here, whole), dropped after its first frame: the
    Char-LDM replicas go quiet within the frame in hand, instead of drawing the other 11."""
    import requests

    url, _ = server
    story = {"captions": [STORY[k % len(STORY)] for k in range(12)], "steps": 50}
    with requests.post(url + "/v1/stories/stream", json=story, stream=True, timeout=120) as streamed:
        assert streamed.status_code == 200
        lines = streamed.iter_lines()
        assert any(line.startswith(b"event: frame") for line in lines)  # frame 1 arrived: drop the rest
    time.sleep(4)  # the frame in hand may finish
    before = _cpu_seconds("ServeReplica:storygpt:CharLDM")
    time.sleep(4)
    busy = _cpu_seconds("ServeReplica:storygpt:CharLDM") - before
    print(f"Char-LDM replicas' CPU in the 4 s window after the drop: {busy:.2f} s")
    assert busy < 1.0, busy  # drawing on, they would use about 4 s of it


@pytest.mark.slow
def test_a_client_cannot_switch_off_cancellation(server):
    """Ray Serve's proxy stops watching for a dropped client when a request says
    ``x-request-disconnect-disabled: ?1``; the edge refuses such a request before drawing anything."""
    import requests

    url, _ = server
    r = requests.post(url + "/v1/stories", json={"captions": [STORY[0]], "steps": 1},
                      headers={"x-request-disconnect-disabled": "?1"}, timeout=30)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "x-request-disconnect-disabled"
    assert "cancellation" in r.json()["errors"][0]["message"]
    assert requests.get(url + "/healthz", timeout=10).status_code == 200


@pytest.mark.slow
def test_head_is_200_on_the_get_routes(server):
    import requests

    url, _ = server
    for path in ("/", "/healthz", "/v1/info"):
        r = requests.head(url + path, timeout=10)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
        assert r.headers["content-type"] == requests.get(url + path, timeout=10).headers["content-type"]
    assert requests.head(url + "/v1/stories", timeout=10).status_code == 405  # HEAD is GET: no way round POST


@pytest.mark.slow
def test_security_headers_on_every_response_and_a_csp_that_fits_the_page(server):
    import requests

    url, _ = server
    answers = {path: requests.get(url + path, timeout=10) for path in ("/", "/healthz", "/v1/info", "/docs",
                                                                       "/openapi.json", "/nothing")}
    answers["422"] = post(url, "/v1/stories", {"captions": []})
    answers["400"] = post(url, "/v1/stories", raw="{")
    assert [answers[k].status_code for k in ("/nothing", "422", "400")] == [404, 422, 400]
    for name, r in answers.items():
        assert {k: r.headers.get(k) for k in SECURITY} == SECURITY, name
    assert "content-security-policy" not in answers["/docs"].headers  # Swagger UI loads from a CDN
    page, csp = answers["/"].text, answers["/"].headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    blocks = {tag: re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S) for tag in ("script", "style")}
    for tag, texts in blocks.items():  # what the browser checks: each inline block's hash is allowed
        assert texts
        directive = re.search(rf"{tag}-src ([^;]*)", csp).group(1)
        for text in texts:
            assert f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'" in directive
    # nothing external to allow: every fetch, image and asset is same-origin or a data: URL
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//|@import|url\(\s*["']?(https?:)?//""", page)
    assert not re.search(r"""fetch\(\s*["'`](https?:)?//""", page)


@pytest.mark.slow
def test_an_internal_error_is_a_generic_500_with_an_id_and_the_log_has_the_detail(server):
    """A real remote failure (its RayTaskError carries the remote traceback, node and PID) behind
    the real ingress, deployed beside the app under /broken."""
    import ray
    import requests
    from ray import serve

    from serving.ingress import StoryAPI

    url, cfg = server
    marker = "secret-detail-4f2a"

    @serve.deployment(name="BrokenLLM", ray_actor_options={"num_cpus": 0})
    class BrokenLLM:
        async def generate(self, job):
            raise RuntimeError(f"{marker} in /opt/model/weights.bin")

        async def stream(self, job):
            raise RuntimeError(f"{marker} in /opt/model/weights.bin")
            yield  # an async generator, as the real one

    data = cfg.resolved().model_dump(mode="json")
    api = StoryAPI.options(ray_actor_options={"num_cpus": 0}).bind(BrokenLLM.bind(), data)
    serve.run(api, name="edge-broken", route_prefix="/broken")
    try:
        r = post(url, "/broken/v1/stories", {"captions": STORY[:1]})
        assert r.status_code == 500 and {k: r.headers.get(k) for k in SECURITY} == SECURITY
        body = r.json()
        assert body["field"] == "server" and re.fullmatch("[0-9a-f]{8}", body["error_id"])
        assert body["error_id"] in body["detail"]
        for leak in (marker, "Traceback", "RuntimeError", "RayTaskError", "pid=", "/opt/model", 'File "'):
            assert leak not in r.text, leak
        with requests.post(url + "/broken/v1/stories/stream", json={"captions": STORY[:1]}, stream=True,
                           timeout=60) as streamed:
            text = streamed.text
        assert streamed.status_code == 200 and text.startswith("event: error\n") and text.count("event:") == 1
        event = json.loads(text.split("data: ", 1)[1])
        assert event["field"] == "server" and event["error_id"] != body["error_id"]
        assert marker not in text and "Traceback" not in text
        # the replica's log carries each id with the exception behind it (in its own record)
        logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
        for _ in range(30):
            log = "\n".join(p.read_text(errors="replace") for p in logs.glob("replica_*.log"))
            if all(f"internal error {i}" in log for i in (body["error_id"], event["error_id"])):
                break
            time.sleep(1)
        for error_id in (body["error_id"], event["error_id"]):
            record = log[log.index(f"internal error {error_id}"):]
            record = re.split(r"\n(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-", record, maxsplit=1)[0]
            assert marker in record and "Traceback" in record, record[:3000]
    finally:
        serve.delete("edge-broken")
    assert post(url, "/v1/stories", {"captions": STORY[:1]}).status_code == 200


def test_internal_error_body_is_generic_and_the_log_record_has_the_exception():
    import logging

    from serving.api import error_body
    from serving.edge import internal_error, logger

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # on the logger itself: Serve may have turned its propagation off
    logger.addHandler(handler)
    try:
        raise RuntimeError("node 10.0.0.7 pid 4242: /srv/secret.py")
    except RuntimeError as caught:
        err = caught
        body = internal_error("POST /v1/stories", err)
    finally:
        logger.removeHandler(handler)
    assert set(body) == set(error_body([("a", "b")])) | {"error_id"}
    assert "10.0.0.7" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    assert len(records) == 1 and body["error_id"] in records[0].getMessage() and records[0].exc_info[1] is err
